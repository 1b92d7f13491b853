"""What a study costs, the budget every worker obeys, and a stop asked for.

A trial's cost is its process's wall time times its share of the device
(trial user attributes `wall_s`, `device`, `gpu_share`: 1/K of a GPU with
`--trials-per-gpu K`, a CPU trial counts whole), and a study's `hours` are the
sum over its trials, a running trial's time so far included. The budget
(`sweep --budget-hours`) and a stop (`studies --stop`) are study user
attributes, so that every worker of the study reads them from the storage
before its first trial and after each one, also workers started without the
option; `stop_reason` says why no new trial may start. A trial without
`wall_s` (its worker died, or an older mtbert ran it) counts its duration in
the storage.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

from mtbert.errors import ConfigError
from mtbert.studies.storage import open_study, storage_errors

# Trial user attributes, set by the worker (process.record_cost).
WALL_S = "wall_s"  # seconds the trial process ran
DEVICE = "device"  # the torch device type it trained on: "cpu", "cuda"
GPU_SHARE = "gpu_share"  # 1/K with --trials-per-gpu K on a GPU; 1.0 on the CPU
# Study user attributes, read by every worker.
BUDGET_HOURS = "budget_hours"
STOP_REQUESTED = "stop_requested"
FLAT_STOP = "flat_stop"  # why `--stop-after-flat` stopped the study (studies.flat)


def check_budget(hours: float) -> float:
    """`hours` if it is a usable budget; else one line with the value received."""
    if not (math.isfinite(hours) and hours > 0):
        raise ConfigError(f"bad --budget-hours {hours}; valid: a finite number of hours > 0")
    return hours


def device_share(device: str, trials_per_gpu: int) -> float:
    """The share of its device one trial counts for: K trials share one GPU; CPU time is
    counted whole (its cores are what the trial used)."""
    return 1.0 if device == "cpu" else 1.0 / trials_per_gpu


def trial_hours(trial, now: datetime | None = None) -> float:
    """One trial's device-hours: wall time × share; a running trial's time so far, a
    waiting one's nothing."""
    share = float(trial.user_attrs.get(GPU_SHARE, 1.0))
    seconds = trial.user_attrs.get(WALL_S)
    if seconds is None:
        if trial.datetime_start is None:
            return 0.0
        # Optuna stamps trials with the local naive time: so does `now`.
        end = trial.datetime_complete or now or datetime.now()
        seconds = (end - trial.datetime_start).total_seconds()
    return max(float(seconds), 0.0) * share / 3600


def study_hours(study, now: datetime | None = None) -> float:
    """The study's device-hours so far: every trial of every worker, running ones too."""
    now = now or datetime.now()
    return sum(trial_hours(t, now) for t in study.get_trials(deepcopy=False))


def format_hours(hours: float) -> str:
    return f"{hours:.4f}"


def stop_reason(study) -> str | None:
    """Why no new trial of `study` may start (one line), or None: a stop was asked for
    (`mtbert studies --stop`) or the study's hours reached its budget."""
    attrs = study.user_attrs  # read from the storage: another worker may have set them
    name = study.study_name
    if attrs.get(STOP_REQUESTED) and attrs.get(FLAT_STOP):
        return f"{attrs[FLAT_STOP]} (`mtbert studies --resume {name}` lifts it)"
    if attrs.get(STOP_REQUESTED):
        return (f"study {name} was asked to stop (mtbert studies --stop); no new trial "
                f"starts until `mtbert studies --resume {name}`")
    budget = attrs.get(BUDGET_HOURS)
    if budget is not None:
        spent = study_hours(study)
        if spent >= budget:
            return (f"study {name} has spent its budget: {format_hours(spent)} of "
                    f"{format_hours(budget)} hours; no new trial starts (a higher "
                    "--budget-hours raises it)")
    return None


def set_budget(study, hours: float) -> None:
    """Store the budget in the study, replacing an earlier one: every worker obeys it."""
    study.set_user_attr(BUDGET_HOURS, check_budget(hours))


def set_stop(storage: str | None, out: Path, name: str, *, requested: bool) -> str:
    """Ask every worker of the study `name` to start no new trial (running trials
    finish), or lift that request; returns what was done, one line."""
    study, url = open_study(storage, out, name)
    with storage_errors(url):
        study.set_user_attr(STOP_REQUESTED, requested)
        if not requested:
            study.set_user_attr(FLAT_STOP, None)
    if requested:
        return (f"study {name}: asked to stop; its workers start no new trial, running "
                f"trials finish (`mtbert studies --resume {name}` lifts it)")
    return f"study {name}: resumed; `mtbert sweep` starts trials in it again"
