"""One sweep trial, run in its own process: `python -m mtbert.trial RUN_DIR`.

The sweep worker writes RUN_DIR/config.yaml and RUN_DIR/job.json, passes the
storage URL in $MTBERT_STORAGE_URL (never on disk or a command line, where a
password would leak) and waits. This process trains, reports every evaluation
to Optuna for pruning, logs to W&B, and exits 0 (complete), 3 (pruned) or 1
(failed, the reason on its last stderr line). A fresh process per trial
carries no GPU memory from one trial to the next.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

EXIT_PRUNED = 3
STORAGE_ENV = "MTBERT_STORAGE_URL"
PARENT_ENV = "MTBERT_WORKER_PID"
RESULT_FILE = "trial.json"


def die_with_parent() -> None:
    """Get SIGKILL when the sweep worker dies, so that no orphan keeps training (or a GPU).

    Set here rather than in a pre-exec hook: forking a process whose other
    threads (Optuna's heartbeat) may hold locks leaves only async-signal-safe
    work to do before exec.
    """
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG, Linux
    except (OSError, AttributeError):
        return
    if os.environ.get(PARENT_ENV) and os.getppid() != int(os.environ[PARENT_ENV]):
        sys.exit(1)  # the worker died before the signal was armed


def run(run_dir: Path) -> int:
    import optuna

    from mtbert.config import load_config
    from mtbert.errors import MtbertError
    from mtbert.spec import make_pruner
    from mtbert.sweep import open_storage
    from mtbert.tracking import Tracker
    from mtbert.train import train

    job = json.loads((run_dir / "job.json").read_text())
    config = load_config(run_dir / "config.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job["study"],
                              storage=open_storage(os.environ[STORAGE_ENV]),
                              pruner=make_pruner(job["pruner"]))
    trial = optuna.trial.Trial(study, job["trial_id"])
    objective = job["objectives"][0]
    reseed_of = job.get("reseed_of")
    name = f"{job['study']}-trial-{job['number']}"
    tracker = Tracker(
        mode=job["wandb"]["mode"], project=job["wandb"]["project"], group=job["study"],
        job_type=job["spec"],
        name=name if reseed_of is None else f"{name}-reseed-of-{reseed_of}",
        config={**config.to_dict(), "params": job["params"], "study": job["study"],
                "trial": job["number"], "reseed_of": reseed_of},
        tags=[config.train.schedule, config.loss.method] + (["reseed"] if reseed_of is not None
                                                            else []),
        directory=Path(job["wandb"]["dir"]))
    result = {"wandb_run_id": tracker.run_id, "reason": None}

    def on_eval(epoch: int, step: int, metrics: dict[str, float]) -> None:
        tracker.log({**metrics, "epoch": epoch + 1}, step)
        if job["prune"]:
            trial.report(metrics[objective], epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {objective} "
                                         f"{metrics[objective]:.4f}")

    code = 1
    try:
        summary = train(config, run_dir=run_dir, device=job["device"], progress=False,
                        on_eval=on_eval)
        code = 0
        tracker.finish(0, {f"best/{k}": v for k, v in summary["best"]["metrics"].items()})
    except optuna.TrialPruned as err:
        code, result["reason"] = EXIT_PRUNED, str(err)
        tracker.finish(0)
    except MtbertError as err:
        result["reason"] = str(err)
        print(f"error: {err}", file=sys.stderr)
        tracker.finish(1)
    # The reason travels in a file: W&B prints its own lines after ours on stderr.
    (run_dir / RESULT_FILE).write_text(json.dumps(result))
    return code


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if len(sys.argv) != 2 or STORAGE_ENV not in os.environ:
        print("usage: MTBERT_STORAGE_URL=... python -m mtbert.trial RUN_DIR (started by "
              "`mtbert sweep`)", file=sys.stderr)
        sys.exit(2)
    die_with_parent()
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
