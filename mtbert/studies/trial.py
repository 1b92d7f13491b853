"""One sweep trial, run in its own process: `python -m mtbert.studies.trial RUN_DIR`.

The child side of the contract in `mtbert.studies.job`: it reads the job,
trains, reports every evaluation to Optuna for pruning, logs to W&B, writes
its `TrialResult` and exits 0 (complete), 3 (pruned) or 1 (failed). A fresh
process per trial carries no GPU memory from one trial to the next.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from mtbert.studies.job import EXIT_PRUNED, PARENT_ENV, STORAGE_ENV, TrialJob, TrialResult


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


def _tracker(job: TrialJob, config):
    from mtbert.tracking import Tracker

    name = f"{job.study}-trial-{job.number}"
    if job.reseed_of is not None:
        name += f"-reseed-of-{job.reseed_of}"
    if job.retry_of is not None:
        name += f"-retry-of-{job.retry_of}"
    tags = [config.train.schedule, config.loss.method]
    tags += ["reseed"] * (job.reseed_of is not None) + ["retry"] * (job.retry_of is not None)
    return Tracker(
        mode=job.wandb.mode, project=job.wandb.project, group=job.study, job_type=job.spec,
        name=name, config={**config.to_dict(), "params": job.params, "study": job.study,
                           "trial": job.number, "reseed_of": job.reseed_of,
                           "retry_of": job.retry_of},
        tags=tags, directory=Path(job.wandb.dir), resume_id=job.wandb_resume_id)


def _history(run_dir: Path, objective: str) -> list[tuple[int, float]]:
    """(epoch, objective value) of the evaluations in the run's metrics.jsonl: what a
    resumed retry took over."""
    path = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    return [(r["epoch"], r[objective]) for r in records if objective in r]


def _race(study, trial, job: TrialJob, run_dir: Path, result: TrialResult) -> None:
    """A raced study: decide, before this seed run ends, whether its configuration gets
    another seed; the worker queues it (studies.racing)."""
    from mtbert.studies.job import RACED_OUT
    from mtbert.studies.racing import RACED, decide

    summary = json.loads((run_dir / "summary.json").read_text())
    decision = decide(study, config=job.config_id if job.config_id is not None else job.number,
                      value=summary["best"]["metrics"][job.objectives[0]], seeds=job.seeds,
                      alpha=job.race_alpha, direction=job.direction)
    result.race, result.race_note = decision.state, decision.note
    if decision.state == RACED:
        trial.set_user_attr(RACED_OUT, True)


def run(run_dir: Path) -> int:
    import optuna

    from mtbert.config import load_config
    from mtbert.errors import MtbertError
    from mtbert.studies.spec import make_pruner
    from mtbert.studies.storage import open_storage
    from mtbert.tracking import train_tracked

    job = TrialJob.read(run_dir)
    config = load_config(run_dir / "config.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=job.study,
                              storage=open_storage(os.environ[STORAGE_ENV]),
                              pruner=make_pruner(job.pruner))
    trial = optuna.trial.Trial(study, job.trial_id)
    objective = job.objectives[0]
    tracker = _tracker(job, config)
    result = TrialResult(wandb_run_id=tracker.run_id)

    taken_over = _history(run_dir, objective) if job.resume else []

    def report(epoch: int, step: int, metrics: dict[str, float]) -> None:
        if not job.prune:
            return
        # First the evaluations of the epochs taken over (an evaluation the dead trial made
        # after its last saved state is made again), so that the pruner sees one curve.
        for earlier, value in taken_over:
            if earlier <= epoch:
                trial.report(value, earlier)
        taken_over.clear()
        trial.report(metrics[objective], epoch + 1)
        if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: {objective} "
                                         f"{metrics[objective]:.4f}")

    code = 1
    try:
        train_tracked(config, run_dir=run_dir, tracker=tracker, device=job.device,
                      resume=job.resume, on_eval=report, clean_stops=(optuna.TrialPruned,))
        code = 0
        if job.seeds > 1:
            _race(study, trial, job, run_dir, result)
    except optuna.TrialPruned as err:
        code, result.reason = EXIT_PRUNED, str(err)
    except MtbertError as err:
        result.reason = str(err)
        print(f"error: {err}", file=sys.stderr)
    result.write(run_dir)
    return code


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if len(sys.argv) != 2 or STORAGE_ENV not in os.environ:
        print("usage: MTBERT_STORAGE_URL=... python -m mtbert.studies.trial RUN_DIR (started "
              "by `mtbert sweep`)", file=sys.stderr)
        sys.exit(2)
    die_with_parent()
    sys.exit(run(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
