"""Weights & Biases as a logger: one run per training, never a reason for it to fail.

wandb is imported lazily: `disabled` needs no wandb installed. Without an API
key the default mode is `offline`; offline runs land under $WANDB_DIR (else
the sweep's out dir), ready for `wandb sync`. So do the files of a model
artifact (`log_model_artifact`), which W&B would otherwise stage under the
user's home.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError
from mtbert.formatting import first_line
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")
MODES = ("online", "offline", "disabled")
# How long W&B online may take to answer before a run goes offline: wandb's own
# $WANDB_INIT_TIMEOUT when set, else this (seconds); the sweep's one check of the
# server takes at most REACH_TIMEOUT_S.
INIT_TIMEOUT_S = 30
REACH_TIMEOUT_S = 10


def unreachable(timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why the W&B server ($WANDB_BASE_URL, else api.wandb.ai) cannot be reached within
    `timeout` seconds; None when it accepts a connection."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "", port), timeout=timeout).close()
    except OSError as err:
        return f"{url.hostname}:{port}: {first_line(err) or type(err).__name__}"
    return None


def online_or_offline(mode: str) -> str:
    """`mode`, except that online with a W&B server out of reach is offline, said once: a
    sweep checks before its first trial, so that no trial waits on the server."""
    if mode != "online":
        return mode
    reason = unreachable()
    if reason is None:
        return mode
    log.warning("W&B online: the server is out of reach (%s); this sweep's runs are "
                "logged offline, to upload later with `wandb sync`", reason)
    return "offline"


def api_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None) -> str:
    """The W&B mode to use; checked before any trial runs."""
    if mode is None:
        mode = os.environ.get("WANDB_MODE") or ("online" if api_key_configured() else "offline")
    if mode not in MODES:
        raise ConfigError(f"bad W&B mode '{mode}'; valid: {', '.join(MODES)}")
    if mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"--wandb-mode {mode} needs the wandb package: pip install wandb "
                          "(or --wandb-mode disabled)")
    return mode


class Tracker:
    """One W&B run; every call is a no-op once W&B is disabled or has failed."""

    def __init__(self, *, mode: str, project: str, group: str | None, job_type: str | None,
                 name: str | None, config: dict[str, Any], tags: list[str], directory: Path,
                 resume_id: str | None = None):
        """`resume_id`: online, continue that run (a retried trial's); offline W&B cannot
        resume a run, so a new one starts."""
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            directory.mkdir(parents=True, exist_ok=True)
            resume = {"id": resume_id, "resume": "allow"} if resume_id and mode == "online" \
                else {}
            kwargs = dict(project=project, group=group, job_type=job_type, name=name,
                          config=config, tags=tags, dir=str(directory), **resume)
            timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT_S)
            try:
                self.run = wandb.init(mode=mode, settings=wandb.Settings(
                    init_timeout=timeout), **kwargs)
            except Exception as err:  # noqa: BLE001 - online out of reach: offline
                if mode != "online":
                    raise
                log.warning("W&B online did not start within %g s (%s); this run is logged "
                            "offline", timeout, first_line(err))
                kwargs.pop("id", None), kwargs.pop("resume", None)
                self.run = wandb.init(mode="offline", **kwargs)
            self.run.define_metric("step")
            for key in METRIC_KEYS:
                self.run.define_metric(key, step_metric="step", summary="max")
            self.run.define_metric("train/loss", step_metric="step", summary="min")
        except Exception as err:  # noqa: BLE001 - W&B must never kill a trial
            self._fail("could not start a run", err)

    @property
    def run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def _fail(self, what: str, err: BaseException) -> None:
        log.warning("W&B: %s (%s: %s); training goes on without it", what,
                    type(err).__name__, first_line(err))
        self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**metrics, "step": step})
        except Exception as err:  # noqa: BLE001 - W&B must never kill a trial
            self._fail("logging failed", err)

    def finish(self, exit_code: int = 0, summary: dict[str, Any] | None = None,
               tags: list[str] | None = None) -> None:
        """End the run with `summary` added to its summary and, when given, `tags` as its
        tags (a run resumed online keeps none of its earlier outcome)."""
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(summary)
            if tags is not None:
                self.run.tags = tuple(tags)
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - W&B must never kill a trial
            self._fail("finishing the run failed", err)


def train_tracked(config, *, run_dir: Path, tracker: Tracker, device: str = "auto",
                  resume: bool = False, progress: bool = False, on_eval=None, on_step=None,
                  clean_stops: tuple[type[BaseException], ...] = (),
                  finish: bool = True) -> dict:
    """One training logged as one W&B run (sweep trials and `mtbert compare` alike).

    Every evaluation is logged, then passed on to `on_eval` (a sweep reports it to
    Optuna there and may raise to prune); `on_step` goes to `train` as is. The run
    finishes with the best metrics in its summary, as failed when the training raised,
    or as finished when it raised one of `clean_stops` (a pruned trial ended as
    planned). Without `finish` the run stays open for the caller to finish with its
    outcome (a sweep trial's state, and `best_summary`). Returns summary.json's content.
    """
    from mtbert.train import train

    def log_then_pass_on(epoch: int, step: int, metrics: dict[str, float]) -> None:
        tracker.log({**metrics, "epoch": epoch + 1}, step)
        if on_eval is not None:
            on_eval(epoch, step, metrics)

    try:
        summary = train(config, run_dir=run_dir, device=device, resume=resume,
                        progress=progress, on_eval=log_then_pass_on, on_step=on_step)
    except BaseException as err:
        if finish:
            tracker.finish(0 if isinstance(err, clean_stops) else 1)
        raise
    if finish:
        tracker.finish(0, best_summary(summary))
    return summary


def best_summary(summary: dict) -> dict[str, float]:
    """A run's W&B summary keys from its summary.json: the metrics of its best evaluation."""
    return {f"best/{k}": v for k, v in summary["best"]["metrics"].items()}


@contextlib.contextmanager
def staged_under(directory: Path):
    """W&B copies an artifact's files into $WANDB_DATA_DIR (default ~/.local/share/wandb)
    before an upload, and an offline run's record points at those copies: unless the user
    set it, stage them under `directory`, the runs' directory, so that `wandb sync` of it
    (on a shared file system, from another machine too) finds every file."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(Path(directory).resolve() / "wandb" / "data")
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


def log_model_artifact(model_dir: Path, *, mode: str, project: str, group: str,
                       run_name: str, artifact: str, aliases: list[str],
                       metadata: dict[str, Any], directory: Path) -> str | None:
    """Log `model_dir` as the W&B artifact `artifact` (type `model`, `aliases`, `metadata`)
    in one run of job type `export` in `group`, written under `directory`. Returns the
    run id; a W&B failure is a warning, never an error (the model directory is written)."""
    if mode == "disabled":
        return None
    run = None
    try:
        import wandb

        with staged_under(directory):
            directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(project=project, group=group, job_type="export", name=run_name,
                             config=metadata, tags=["export"], dir=str(directory), mode=mode)
            model = wandb.Artifact(artifact, type="model", metadata=metadata)
            model.add_dir(str(model_dir))
            run.log_artifact(model, aliases=aliases)
            run_id = run.id
            run.finish()
        return run_id
    except Exception as err:  # noqa: BLE001 - the export is done; W&B only records it
        return failed_run(run, err, "the model artifact", "the model directory is written")


def failed_run(run, err: BaseException, what: str, kept: str) -> None:
    """A W&B run that failed after the real work was done: one warning naming `what` could
    not be logged and what was `kept`, and the run (if it started) finished as failed."""
    log.warning("W&B: could not log %s (%s: %s); %s", what, type(err).__name__,
                first_line(err), kept)
    if run is not None:
        try:
            run.finish(exit_code=1)
        except Exception:  # noqa: BLE001 - already failing; the warning above says why
            log.debug("W&B: finishing the failed run failed too")
    return None
