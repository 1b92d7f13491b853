"""A stand-in trial program for the orchestration tests: `python tests/stub_trial.py RUN_DIR`.

The worker runs it instead of `python -m mtbert.studies.trial` when a test sets
$MTBERT_TRIAL_PROGRAM to this file (`stub_trials` in conftest.py). It is the
real trial process (`mtbert.studies.trial.run`: the job read, the progress
file, reports to Optuna and pruning, the race, signals, the outcome, trial.json,
exit codes 0/3/1 and death by signal) around a training without a model: it
calls `on_step` as `mtbert.train` does (where each epoch starts and after every
step, the loss every train.log_every steps), and every epoch it writes what
`mtbert.train` writes for its worker (a metrics.jsonl record, an `epoch N/M:
...` line in trial.log, the best evaluation's model/, a resume.pt in PyTorch's
file format holding the loop state), and summary.json at the end.
It imports no torch, so a trial costs a Python start instead of a training.

Its metrics are a fixed function of the configuration (the job's params), the
seed and the epoch; a resumed run ends exactly as an uninterrupted one. A test
steers it through $MTBERT_STUB_TRIAL, a JSON object:

    epoch_s   seconds each epoch takes before its steps (default 0), to stop or kill a
              trial mid-run
    step_s    seconds each of its train.steps_per_epoch steps takes (default 0)
    fail      {run directory name: message}: that run fails in its first epoch with a
              TrainingError of the message (e.g. "out of GPU memory ...")
    values    {str(value of params[key]): [objective value per seed, from seed 0]}
              with `key`: the objective's value at every epoch, for controlled races
    finish_s  seconds the run takes to finish once its training has (as W&B's finish
              does), to stop a trial whose result is already written
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import zipfile
import zlib
from pathlib import Path

import yaml

from mtbert.errors import TrainingError
from mtbert.rundir import (CONFIG_FILE, METRICS_FILE, MODEL_DIR, RESUME_FILE, append_metrics,
                           atomic_write_jsonl, save_summary)
from mtbert.studies.job import TrialJob
from mtbert.studies.trial import main

STUB_ENV = "MTBERT_STUB_TRIAL"
log = logging.getLogger("mtbert")


def _unit(*parts) -> float:
    """A number in [0, 1) fixed by `parts`."""
    return zlib.crc32(json.dumps(parts, sort_keys=True, default=str).encode()) / 2 ** 32


def stub_metrics(params: dict, seed: int, epoch: int, behaviour: dict) -> dict[str, float]:
    """The five metric keys of a configuration's seed run after `epoch` (0-based): a level
    fixed by the configuration, a small seed effect, a rise over the epochs."""
    level = 0.35 + 0.4 * _unit(params) + 0.02 * (_unit(seed) - 0.5)
    level += 0.05 * (1 - 0.5 ** (epoch + 1))
    values = behaviour.get("values")
    if values:
        key = values["key"]
        level = values[str(params[key])][seed - values.get("first_seed", 0)]
    sst, qqp, sts = level, min(level + 0.2, 0.99), level
    return {"sst/acc": sst, "qqp/acc": qqp, "sts/pearson": sts,
            "overall/arithmetic": (sst + qqp + (1 + sts) / 2) / 3,
            "overall/geometric": (sst * qqp * max(sts, 0.0)) ** (1 / 3)}


def write_resume_state(path: Path, state: dict) -> None:
    """resume.pt in PyTorch's zip format (data.pkl, byteorder, version), holding only plain
    values: what `torch.load(weights_only=True)` reads back, written without torch."""
    partial = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"state": state}, protocol=2))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    os.replace(partial, path)


def read_resume_state(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        return pickle.loads(archive.read("archive/data.pkl"))["state"]


class StubTraining:
    """`mtbert.studies.trial.TrackedTraining`'s part, without a model or W&B."""

    def __init__(self, job: TrialJob, run_dir: Path):
        self.job, self.run_dir = job, run_dir
        self.config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
        self.behaviour = json.loads(os.environ.get(STUB_ENV) or "{}")
        self.run_id = None

    def __call__(self, on_eval, on_step) -> dict:
        train, started = self.config["train"], time.monotonic()
        epochs, select = train["epochs"], train["select_metric"]
        steps = train.get("steps_per_epoch") or 10
        log_every = train.get("log_every") or 1
        state = {"epoch": -1, "best": None, "history": []}
        if self.job.resume and (self.run_dir / RESUME_FILE).exists():
            state = read_resume_state(self.run_dir / RESUME_FILE)
            log.info("resuming %s after epoch %d of %d", self.run_dir, state["epoch"] + 1,
                     epochs)
        log.info("training sst, qqp, sts on the stand-in: %d optimizer steps in %d epochs",
                 epochs * steps, epochs)
        step_s = self.behaviour.get("step_s", 0)
        # The killed run may have logged an evaluation after its last saved state.
        atomic_write_jsonl(self.run_dir / METRICS_FILE, state["history"])
        for epoch in range(state["epoch"] + 1, epochs):
            time.sleep(self.behaviour.get("epoch_s", 0))
            failure = self.behaviour.get("fail", {}).get(self.run_dir.name)
            if failure:
                raise TrainingError(failure)
            position = {"epoch": epoch, "epochs": epochs, "steps": epochs * steps}
            on_step(**position, step=epoch * steps, loss=None)
            for step in range(epoch * steps + 1, (epoch + 1) * steps + 1):
                time.sleep(step_s)
                read = step % log_every == 0 or step == (epoch + 1) * steps
                on_step(**position, step=step, loss=1 / (epoch + 2) if read else None)
            metrics = stub_metrics(self.job.params, train["seed"], epoch, self.behaviour)
            record = {"step": (epoch + 1) * steps, "epoch": epoch + 1, **metrics,
                      "train/loss": 1 / (epoch + 2)}
            state["history"].append(record)
            append_metrics(self.run_dir, record)
            log.info("epoch %d/%d: %s", epoch + 1, epochs,
                     "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            best = state["best"]
            if best is None or metrics[select] > best["metrics"][select]:
                state["best"] = {"step": record["step"], "epoch": epoch + 1, "metrics": metrics}
                model = self.run_dir / MODEL_DIR
                model.mkdir(exist_ok=True)
                (model / "metrics.json").write_text(json.dumps(metrics))
            state["epoch"] = epoch
            write_resume_state(self.run_dir / RESUME_FILE, state)
            # What train passes: the record less its step and epoch, train/loss included.
            on_eval(epoch, record["step"], {**metrics, "train/loss": record["train/loss"]})
        summary = {"selection_metric": select, "best": state["best"],
                   "wall_time_s": round(time.monotonic() - started, 2),
                   "steps": epochs * steps, "epochs_completed": state["epoch"] + 1,
                   "stopped_early": False}
        save_summary(self.run_dir, summary)
        return {f"best/{k}": v for k, v in summary["best"]["metrics"].items()}

    def finish(self, ended, summary: dict) -> None:
        """No W&B run to end: `finish_s` seconds of nothing instead."""
        time.sleep(self.behaviour.get("finish_s", 0))


if __name__ == "__main__":
    main(StubTraining)
