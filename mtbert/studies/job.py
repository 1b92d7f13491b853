"""The contract between a sweep worker and its trial processes, and the names both write
into the study.

The worker writes RUN_DIR/config.yaml and RUN_DIR/job.json (a `TrialJob`),
passes the storage URL in $MTBERT_STORAGE_URL (never on disk or a command
line, where a password would leak) and waits. The trial process
(`python -m mtbert.studies.trial RUN_DIR`) trains, keeps RUN_DIR/progress.json
(a `TrialProgress`) up to date for the worker's display, writes
RUN_DIR/trial.json (a `TrialResult`) and exits 0 (complete), 3 (pruned) or 1
(failed). Both sides import this module, so a field renamed here is renamed for
both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError
from mtbert.formatting import first_line
from mtbert.rundir import atomic_write_text, read_json_object

EXIT_PRUNED = 3
# The trial's storage stayed away past the outage limit: queued again, to resume from
# its run directory, as a trial killed from outside is.
EXIT_STORAGE_OUTAGE = 75
STORAGE_ENV = "MTBERT_STORAGE_URL"
PARENT_ENV = "MTBERT_WORKER_PID"
JOB_FILE = "job.json"
RESULT_FILE = "trial.json"
PROGRESS_FILE = "progress.json"
# The trial process rewrites its progress file at most this often (and after each
# evaluation at once): a display refreshed every few seconds needs no more.
PROGRESS_EVERY_S = 2.0
# The orchestration tests name a stand-in trial program here (tests/stub_trial.py: the
# same contract, no model, no torch); a user never sets it.
TRIAL_PROGRAM_ENV = "MTBERT_TRIAL_PROGRAM"

# Trial user attributes (README "Sweep"): besides the metric keys at the trial's best evaluation,
RUN_DIR = "run_dir"  # the trial's run directory (absolute)
CHECKPOINT = "checkpoint"  # its model directory (absolute), removed outside --keep-top
WANDB_RUN_ID = "wandb_run_id"
FAIL_REASON = "fail_reason"
RESEED_OF = "reseed_of"  # a reseed: the number of the trial whose configuration it repeats
SEED = "seed"  # the train.seed of the trial's run (every trial)
CONFIG_ID = "config_id"  # the configuration's first trial: shared by its seed runs
RACED_OUT = "raced_out"  # True: this seed run ended its configuration's race (--seeds)
FEASIBLE = "feasible"  # whether the trial's metrics meet the spec's constraints
RETRY_OF = "retry_of"  # a retry: the number of the trial it takes over (killed or stopped)
RESUMED_FROM_EPOCH = "resumed_from_epoch"  # epochs the retry took over; 0 = started fresh
RETRY_REASON = "retry_reason"  # "oom": out of memory beside other trials, retried alone
GPU = "gpu"  # the CUDA_VISIBLE_DEVICES value the trial ran with (--gpus)
# System attributes of a retry, as Optuna's RetryHeartbeatStaleTrialCallback writes them:
# the first trial of the series, and every trial of it before this one, oldest first.
FAILED_TRIAL = "failed_trial"
RETRY_HISTORY = "retry_history"
# Study user attributes: the spec's name, its objectives and the resolved spec itself (base
# with the sweep's --set), so that `best --reseed` runs new trials as the sweep ran its own.
STUDY_SPEC_NAME = "spec"
STUDY_OBJECTIVES = "objectives"
STUDY_SPEC = "spec_def"
STUDY_CONSTRAINTS = "constraints"  # the spec's constraints, thresholds resolved
# The size of the spec folded into its stored base (`studies.sizes`): every later worker
# runs it. Absent: a study made before sizes, or from a spec without them.
STUDY_SIZE = "size"
WORKERS_STARTED = "workers_started"  # sweeps started on the study (each its sampler seed)
# A study's identity (a random hex id, set once) and the folder under --out its trials'
# run directories go in: its name, or name-<id> where that folder holds the runs of
# another study of the same name (deleted, or in another storage).
STUDY_UID = "study_uid"
RUNS_FOLDER = "runs_folder"


@dataclass
class WandbSettings:
    mode: str = "disabled"
    project: str = "mtbert"
    dir: str = "."


@dataclass
class TrialJob:
    """What a trial process needs besides its config.yaml."""

    study: str
    trial_id: int  # Optuna's storage id, to report intermediate values and prune
    number: int
    spec: str
    objectives: list[str]
    prune: bool  # report every evaluation and let the pruner stop the trial
    pruner: dict[str, Any]
    params: dict[str, Any]
    seed: int
    device: str = "auto"
    reseed_of: int | None = None
    config_id: int | None = None  # the configuration's first trial (its seed runs share it)
    seeds: int = 1  # > 1: the configuration races over this many seeds (studies.racing)
    race_alpha: float = 0.1
    direction: str = "maximize"  # of the first objective, for the race
    size: str | None = None  # the spec's size (studies.sizes); None: its base as written
    retry_of: int | None = None  # a retry: the trial it takes over
    resume: bool = False  # the run directory holds the taken-over trial's resume state
    wandb_resume_id: str | None = None  # the W&B run to continue (online mode)
    wandb: WandbSettings = field(default_factory=WandbSettings)
    study_uid: str | None = None  # the study's identity: whose run directory this is

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrialJob:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{JOB_FILE} holds no JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{JOB_FILE} has unknown keys {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(known))}")
        return cls(**{**data, "wandb": WandbSettings(**data.get("wandb", {}))})

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / JOB_FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> TrialJob:
        """The job of `run_dir`; a damaged job.json is one line naming it."""
        path = Path(run_dir) / JOB_FILE
        try:
            return cls.from_json(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as err:
            raise ConfigError(f"{path} is damaged ({first_line(err)}); it is written by "
                              "the sweep worker before its trial starts") from None


@dataclass
class TrialResult:
    """What a trial process leaves for its worker: its W&B run and why it stopped.

    The reason travels in a file because W&B prints its own lines after ours on stderr.
    """

    wandb_run_id: str | None = None
    reason: str | None = None
    race: str | None = None  # a raced study's decision after this seed (studies.racing)
    race_note: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        data = json.loads(text)
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / RESULT_FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> TrialResult:
        """The result a trial process wrote; an empty one if it wrote none (it was killed),
        or a damaged one (with a warning naming it)."""
        data = read_json_object(Path(run_dir) / RESULT_FILE, "the trial's result (its W&B "
                                                               "run, why it ended)")
        if data is None:
            return cls()
        return cls(**{f.name: data[f.name] if isinstance(data.get(f.name), str) else None
                      for f in dataclasses.fields(cls)})


@dataclass
class TrialProgress:
    """Where a running trial stands, for its worker's display (`studies.progress`).

    The trial process rewrites RUN_DIR/progress.json atomically, at most every
    PROGRESS_EVERY_S seconds and after each evaluation; the worker reads it as it
    redraws. Never through the storage: a database write per step of every trial of
    every worker would load the study's one coordinator for a display.
    """

    started: float  # time.time() when the trial process started
    gpu: str | None = None  # the process's CUDA_VISIBLE_DEVICES (--gpus), else None
    epoch: int = 0  # the epoch in training, from 1; 0 before its first step (loading)
    epochs: int = 0
    step: int = 0  # optimizer steps taken, those of a resumed run's earlier epochs included
    steps: int = 0  # optimizer steps of all epochs
    loss: float | None = None  # the latest training-loss reading
    eta_s: float | None = None  # seconds left at the rate since training started
    updated: float = 0.0  # time.time() of this write
    # This process's evaluations, oldest first: epoch, step, elapsed_s (since `started`),
    # eta_s, the metric keys and train/loss. A plain display prints each once.
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrialProgress:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    def write(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / PROGRESS_FILE, self.to_json())

    @classmethod
    def read(cls, run_dir: Path) -> TrialProgress | None:
        """The progress a trial process wrote; None before it wrote any (or if it is no
        progress file of this version)."""
        try:
            return cls.from_json((Path(run_dir) / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError):
            return None


def trial_dir(folder: Path, number: int) -> Path:
    """The run directory of trial `number` in its study's runs folder (absolute)."""
    return (Path(folder) / f"trial-{number:04d}").resolve()


def trial_command(run_dir: Path) -> list[str]:
    """The command line of the trial process for `run_dir`."""
    program = os.environ.get(TRIAL_PROGRAM_ENV)
    entry = [program] if program else ["-m", "mtbert.studies.trial"]
    return [sys.executable, *entry, str(run_dir)]


def retried_from(trial) -> int | None:
    """The trial a retry takes over (the last of its retry history), else None."""
    history = trial.system_attrs.get(RETRY_HISTORY)
    return history[-1] if history else None
