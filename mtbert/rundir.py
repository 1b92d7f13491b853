"""A run directory's files: their names, one atomic write, and one reader of each file
that more than one module reads. Torch-free, so that training, the sweep worker, the
trial process (and the tests' stand-in for it), export and the report share them.

    RUN_DIR/config.yaml     the resolved run config
    RUN_DIR/metrics.jsonl   one JSON object per evaluation: step, epoch, the metric keys
    RUN_DIR/summary.json    the best evaluation, times, environment, data
    RUN_DIR/resume.pt       the loop state of the last finished epoch (mtbert.train)
    RUN_DIR/model/          the best evaluation's model directory
    RUN_DIR/job.json, trial.json, progress.json, trial.log   a sweep trial's
                            (mtbert.studies.job)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

RUNS_DIR = Path("mtbert-runs")  # where commands put their runs unless told (--out)
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESUME_FILE = "resume.pt"
GRAD_CONFLICT_FILE = "grad_conflict.jsonl"
MODEL_DIR = "model"
TRIAL_LOG = "trial.log"
# What a run writes into its directory (a retry copies these; `existing="replace"` of
# training removes these and nothing else).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RESUME_FILE, GRAD_CONFLICT_FILE,
             MODEL_DIR)


@contextlib.contextmanager
def naming(path: Path, partial: Path | None = None):
    """An OSError inside names `path` (a failed write, e.g. a full disk, names no file by
    itself), and `partial`, a half-written temporary file, is removed."""
    try:
        yield
    except OSError as err:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror or str(err), str(path)) from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so that a reader (or a crash) sees the old content or the new, never
    half of it: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with naming(path, partial=tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(run_dir: Path, record: dict) -> None:
    """One evaluation's record at the end of metrics.jsonl."""
    with open(Path(run_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluations in a run's metrics.jsonl, oldest first ([] without the file); a
    line that is no JSON object (cut off by a killed run, damaged) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def save_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_summary(run_dir: Path) -> dict | None:
    """A run's summary.json (None without one: the run has not finished)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.exists() else None


def best_metrics(run_dir: Path) -> dict | None:
    """The metrics of a finished run's best evaluation, from its summary.json."""
    summary = read_summary(run_dir)
    return summary["best"]["metrics"] if summary else None
