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
import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger("mtbert")

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
    itself), and `partial`, a half-written temporary file or directory, is removed. A
    library that reports a failed write in its own words (torch's "unexpected pos", after
    the OSError its file object raised; safetensors' "os error 28") fails the same way."""
    try:
        yield
    except Exception as err:
        failed = _os_error(err)
        if failed is None:
            raise
        if partial is not None:
            _remove(Path(partial))
        if failed is err and err.filename and err.strerror and partial is None:
            raise
        where = failed.filename
        if not where or (partial is not None and str(where).startswith(str(partial))):
            where = path  # the temporary file is gone: name what was being written
        raise OSError(failed.errno, failed.strerror or str(failed), str(where)) from None


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err` (itself, or one it was raised from or during)."""
    if isinstance(err, shutil.Error) and err.args and isinstance(err.args[0], list) \
            and err.args[0]:
        # copytree's list of (source, destination, why) of every file it could not copy
        _, destination, why = err.args[0][0]
        found = re.match(r"\[Errno (\d+)\] (.*?)(?:: '.*')?$", str(why))
        if found:
            return OSError(int(found[1]), found[2], destination)
    seen: BaseException | None = err
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    if "No space left on device" in text or "os error 28" in text:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _remove(partial: Path) -> None:
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        partial.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so that a reader (or a crash) sees the old content or the new, never
    half of it: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with naming(path, partial=tmp):
        # UTF-8 whatever the locale; a path that came in undecodable (LC_ALL=C) goes back
        # out as the bytes it was
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")
        os.replace(tmp, path)


def atomic_write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_metrics(run_dir: Path, record: dict) -> None:
    """One evaluation's record at the end of metrics.jsonl."""
    path = Path(run_dir) / METRICS_FILE
    with naming(path), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _is_evaluation(record) -> bool:
    """A JSON object with an int `epoch` and `step` and numbers for its metrics."""
    if not isinstance(record, dict):
        return False
    if not all(type(record.get(key)) is int for key in ("epoch", "step")):
        return False
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
               for k, v in record.items() if "/" in k)


def read_metrics(run_dir: Path) -> list[dict]:
    """The evaluations in a run's metrics.jsonl, oldest first ([] without the file); a
    line that is no evaluation (cut off by a killed run, damaged) is skipped, and a
    warning names the file and how many lines were."""
    path = Path(run_dir) / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as err:
        log.warning("cannot read %s (%s): its evaluations are left out", path,
                    err.strerror or err)
        return []
    records, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if _is_evaluation(record):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d damaged line%s (no evaluation record)", path, skipped,
                    "" if skipped == 1 else "s")
    return records


def save_summary(run_dir: Path, summary: dict) -> None:
    atomic_write_text(Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2))


def read_json_object(path: Path, what: str) -> dict | None:
    """The JSON object in `path`; None without the file, and None with a warning naming it
    when it cannot be read or holds no JSON object (cut off, damaged): what it would have
    said (`what`) is missing data, not a crash."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        said = getattr(err, "strerror", None) or type(err).__name__
        log.warning("%s is damaged (%s); %s left out", path, said, what)
        return None
    if not isinstance(data, dict):
        log.warning("%s is damaged (no JSON object); %s left out", path, what)
        return None
    return data


def read_summary(run_dir: Path) -> dict | None:
    """A run's summary.json (None without one: the run has not finished; None with a
    warning when it is damaged)."""
    summary = read_json_object(Path(run_dir) / SUMMARY_FILE, "its summary")
    if summary is None:
        return None
    best = summary.get("best")
    metrics = best.get("metrics") if isinstance(best, dict) else None
    if not isinstance(metrics, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        log.warning("%s is damaged (no best evaluation's metrics); its summary left out",
                    Path(run_dir) / SUMMARY_FILE)
        return None
    return summary


def best_metrics(run_dir: Path) -> dict | None:
    """The metrics of a finished run's best evaluation, from its summary.json (None
    without one, or with a damaged one)."""
    summary = read_summary(run_dir)
    return summary["best"]["metrics"] if summary else None
