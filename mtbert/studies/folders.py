"""A study's runs folder: where its trials' run directories go, never over another's.

Every study gets an identity (`study_uid`, written into each trial's job.json)
and a runs folder under a sweep's --out (`runs_folder`): its name, or
`<name>-<id>` when a new study finds there the runs of an earlier study of its
name (deleted, in another storage, an emptied database). A trial's run directory
is new; one that holds a run already is another study's, never written over.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from mtbert.errors import ConfigError, MtbertError
from mtbert.rundir import RUN_FILES
from mtbert.studies.job import JOB_FILE, RUNS_FOLDER, STUDY_UID, TrialJob

log = logging.getLogger("mtbert")


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a trial's run (its job.json or any run file)."""
    return any((Path(run_dir) / name).exists() for name in (JOB_FILE, *RUN_FILES))


def identify(study, out: Path) -> None:
    """Give a study its identity and its runs folder under `out`: its name, unless that
    folder holds trial runs already and the study has none yet (they are another study's
    of the same name: deleted, or in another storage), which are never written over."""
    uid, name = uuid.uuid4().hex, study.study_name
    folder = name
    if not study.get_trials(deepcopy=False) and any(
            holds_a_run(d) for d in (out / name).glob("trial-*")):
        folder = f"{name}-{uid[:8]}"
        log.warning("%s holds the runs of another study named %s (deleted, or in another "
                    "storage); they stay as they are, and this study's runs go to %s",
                    out / name, name, out / folder)
    study.set_user_attr(STUDY_UID, uid)
    study.set_user_attr(RUNS_FOLDER, folder)


def check_not_anothers(run_dir: Path, *, uid: str | None, study: str) -> None:
    """A trial's run directory is new: one that holds a run already is another study's
    (of the same name, in another storage or deleted): one line, and the sweep stops."""
    if not holds_a_run(run_dir):
        return
    try:
        owner = TrialJob.read(run_dir).study_uid
    except (OSError, MtbertError):
        owner = None
    if owner is None or owner != uid:
        raise ConfigError(f"{run_dir} holds a run of another study named {study}; it stays "
                          "as it is and this sweep stops: pass another --out, or move that "
                          "folder away")
