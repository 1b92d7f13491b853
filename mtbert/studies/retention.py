"""What a study keeps on disk, and what deleting a study may remove.

A sweep keeps the model directories of its best trials only (`--keep-top`),
so that hundreds of trials do not fill the disk; every seed run of the best
configurations by mean stays, and so does everything a running or queued
trial still needs (a queued retry resumes from the run of the trial it
retries). `studies --delete --runs` removes run directories only when they
are what a sweep wrote, strictly inside the directory the command was given:
a study name or a stored path never reaches anywhere else.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mtbert.studies.job import (CHECKPOINT, JOB_FILE, RESEED_OF, RUN_DIR, RUNS_FOLDER,
                                retried_from)
from mtbert.studies.configurations import seed_groups, study_seeds
from mtbert.studies.results import pareto_front, ranked
from mtbert.studies.storage import STUDY_NAME, mask_url


def prune_checkpoints(study, *, keep_top: int, multi_objective: bool) -> int:
    """Remove the model directories of every finished trial outside the top `keep_top`
    (and, for multi-objective studies, the Pareto front). Returns how many were removed."""
    from optuna.trial import TrialState

    # Snapshot first, rank second: a trial that finishes in between (another thread,
    # another worker) is RUNNING in the snapshot and left alone, never removed unranked.
    trials = study.get_trials(deepcopy=False)
    # A raced study ranks configurations only: a raced-out one's lucky seed keeps nothing.
    raced = study_seeds(study) > 1
    keep = set() if raced else {t.number for t in ranked(study)[:keep_top]}
    # Reseeded configurations compete by their mean: every seed run of the best
    # `keep_top` of them keeps its model, and so does every member of a group whose
    # seeds are still running (its mean, and so its rank, is not known yet).
    for group in (seed_groups(study, reseeded_only=True)[:keep_top]
                  if not multi_objective else []):
        if not group.raced_out:
            keep |= {t.number for t in group.trials}
    for t in trials:
        if t.state not in (TrialState.RUNNING, TrialState.WAITING):
            continue
        if RESEED_OF in t.user_attrs:
            keep.add(t.user_attrs[RESEED_OF])
            keep |= {u.number for u in trials
                     if u.user_attrs.get(RESEED_OF) == t.user_attrs[RESEED_OF]}
        if retried_from(t) is not None:  # a queued retry resumes from that trial's run
            keep.add(retried_from(t))
    if multi_objective:
        keep |= {t.number for t in pareto_front(study)}
    removed = 0
    for t in trials:
        if t.state == TrialState.RUNNING or t.state == TrialState.WAITING or t.number in keep:
            continue
        checkpoint = t.user_attrs.get(CHECKPOINT)
        if checkpoint and Path(checkpoint).is_dir():
            shutil.rmtree(checkpoint, ignore_errors=True)
            removed += 1
        if t.user_attrs.get(RUN_DIR):  # the state of a killed worker's trial
            (Path(t.user_attrs[RUN_DIR]) / "resume.pt").unlink(missing_ok=True)
    return removed


def strictly_inside(path: Path, parent: Path) -> bool:
    """Whether `path` lies below `parent` (not `parent` itself), links resolved."""
    path, parent = Path(path).resolve(), Path(parent).resolve()
    return path != parent and parent in path.parents


@dataclass
class DeletionPlan:
    """What `studies --delete NAME [--runs]` would remove, and what it leaves."""

    study: str
    n_trials: int
    storage: str  # masked URL
    runs: bool = False  # the run directories too
    folders: list[Path] = field(default_factory=list)
    study_dir: Path | None = None  # <out>/<study>, when it exists and is safe
    running: int = 0  # trials RUNNING: a worker may be training them right now
    left: list[str] = field(default_factory=list)  # what is not removed, and why

    def all(self) -> list[Path]:
        return self.folders + ([self.study_dir] if self.study_dir else [])

    def describe(self) -> str:
        what = f"study {self.study} ({self.n_trials} trials) from {self.storage}"
        if self.runs:
            n = len(self.folders)
            what += f", the run directories of {n} trial{'s' * (n != 1)}"
            if self.study_dir:
                what += f" and {self.study_dir}"
        return what

    def execute(self, rdb) -> None:
        import optuna

        optuna.delete_study(study_name=self.study, storage=rdb)
        for folder in self.all():
            shutil.rmtree(folder, ignore_errors=True)


def plan_deletion(rdb, name: str, *, url: str, out: Path, runs: bool) -> DeletionPlan:
    """What deleting study `name` removes: its record in the storage and, with `runs`,
    the run directories of its trials and <out>/<name> that may be removed: what a
    sweep wrote (a run directory holds its job.json), strictly inside `out`."""
    import optuna

    study = optuna.load_study(study_name=name, storage=rdb)
    trials = study.get_trials(deepcopy=False)
    plan = DeletionPlan(name, len(trials), mask_url(url), runs=runs,
                        running=sum(t.state == optuna.trial.TrialState.RUNNING for t in trials))
    if runs:
        _plan_folders(plan, trials, study.user_attrs.get(RUNS_FOLDER, name), Path(out))
    return plan


def _plan_folders(plan: DeletionPlan, trials: list, folder: str, out: Path) -> None:
    outside = 0
    for t in trials:
        run_dir = t.user_attrs.get(RUN_DIR)
        if not run_dir or not (Path(run_dir) / JOB_FILE).is_file():
            continue
        if strictly_inside(Path(run_dir), out):
            plan.folders.append(Path(run_dir))
        else:
            outside += 1
    if outside:
        plan.left.append(f"{outside} run director{'ies' if outside != 1 else 'y'} outside "
                         f"{out} left in place")
    study_dir = out / folder
    if not STUDY_NAME.fullmatch(folder):
        plan.left.append(f"the study's folder {folder!r} is not a safe directory name: no "
                         f"directory named after it is removed")
    elif study_dir.is_dir() and strictly_inside(study_dir, out):
        plan.study_dir = study_dir
