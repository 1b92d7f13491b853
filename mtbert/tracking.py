"""Weights & Biases as a logger: one run per trial, never a reason for a trial to fail.

wandb is imported lazily: `disabled` needs no wandb installed. Without an API
key the default mode is `offline`; offline runs land under $WANDB_DIR (else
the sweep's out dir), ready for `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import logging
import netrc
import os
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError
from mtbert.tasks import METRIC_KEYS

log = logging.getLogger("mtbert")
MODES = ("online", "offline", "disabled")


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
                 name: str | None, config: dict[str, Any], tags: list[str], directory: Path):
        self.run = None
        if mode == "disabled":
            return
        try:
            import wandb

            directory.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=project, group=group, job_type=job_type, name=name,
                                  config=config, tags=tags, dir=str(directory), mode=mode)
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
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        self.run = None

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log({**metrics, "step": step})
        except Exception as err:  # noqa: BLE001 - W&B must never kill a trial
            self._fail("logging failed", err)

    def finish(self, exit_code: int = 0, summary: dict[str, Any] | None = None) -> None:
        if self.run is None:
            return
        try:
            if summary:
                self.run.summary.update(summary)
            self.run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - W&B must never kill a trial
            self._fail("finishing the run failed", err)


def log_study_report(report, *, mode: str, project: str, directory: Path) -> str | None:
    """Log a study report as one extra W&B run in the study's group: the trials table and
    every figure. Returns the run id; a W&B failure is a warning, never an error."""
    from mtbert.report import table_columns, table_values

    if mode == "disabled":
        return None
    run = None
    try:
        import wandb

        directory.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=project, group=report.study, job_type="report",
                         name=f"{report.study}-report", dir=str(directory), mode=mode,
                         config={"study": report.study, "objectives": report.objectives},
                         tags=["report"])
        # One type per column for W&B's table schema: numbers stay numbers, the rest text.
        columns = table_columns(report)
        rows = [[v if v is None or isinstance(v, (int, float)) else str(v)
                 for v in table_values(report, row)] for row in report.rows]
        run.log({"trials": wandb.Table(columns=columns, data=rows),
                 **{f"report/{name}": wandb.Image(str(path))
                    for name, path in report.figures.items()}})
        counts: dict[str, int] = {}
        for row in report.rows:
            counts[row.state] = counts.get(row.state, 0) + 1
        run.summary.update({f"trials/{state.lower()}": n for state, n in counts.items()})
        run_id = run.id
        run.finish()
        return run_id
    except Exception as err:  # noqa: BLE001 - a W&B failure must not lose the report
        log.warning("W&B: could not log the report (%s: %s); the report files are written",
                    type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the warning above says why
                log.debug("W&B: finishing the failed report run failed too")
        return None
