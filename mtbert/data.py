"""Reading task files, the token cache, and batches padded to their longest member.

Files are the CS224N ones: tab-separated, a header, columns used by name.
Malformed rows (empty text, empty or out-of-range label, a short row) are
skipped and counted, never kept and never fatal; a missing file or a missing
required column is one `DataError` naming file and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mtbert.errors import DataError
from mtbert.tasks import Task
from mtbert.tokenize import Tokenizer

log = logging.getLogger("mtbert")

CACHE_VERSION = 1
csv.field_size_limit(2**24)


@dataclass
class FileStats:
    """Provenance of one data file, as written to summary.json."""

    file: str
    sha256: str
    rows: int
    skipped: int
    reasons: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "rows": self.rows,
                "skipped": self.skipped, "skip_reasons": self.reasons}


@dataclass
class Examples:
    """The valid rows of one task file."""

    task: Task
    ids: list[str]
    texts: list[tuple[str, ...]]
    labels: np.ndarray | None
    stats: FileStats
    digest: str  # sha256 of the whole file, the token cache key


def read_examples(path: Path, task: Task, *, labelled: bool = True) -> Examples:
    """The valid rows of `path`; `labelled=False` reads prediction-only files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; get the task files with "
                        "`mtbert data download --data-dir DIR` or point data.dir at them")
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    text = raw.decode("utf-8", errors="replace")
    # newline="" keeps line breaks inside quoted fields and odd separators (\x85,
    # \u2028) in the text, as the csv module expects.
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t")
    columns = [c for c in (reader.fieldnames or [])]
    required = list(task.text_columns) + ([task.label_column] if labelled else [])
    for column in ["id", *required]:
        if column not in columns:
            shown = ", ".join(c for c in columns if c) or "none"
            raise DataError(f"{path}: missing column '{column}' (found: {shown}); "
                            f"{task.name} needs {', '.join(['id', *required])}")
    ids, texts, labels = [], [], []
    reasons: Counter[str] = Counter()
    rows = 0
    try:
        for row in reader:
            rows += 1
            if None in row or any(row.get(c) is None for c in required):
                reasons["short row"] += 1
                continue
            fields_ = tuple(row[c].strip() for c in task.text_columns)
            if not all(fields_):
                reasons["empty text"] += 1
                continue
            if labelled:
                label = task.parse_label(row[task.label_column].strip())
                if label is None:
                    empty = not row[task.label_column].strip()
                    reasons["empty label" if empty else "label out of range"] += 1
                    continue
                labels.append(label)
            ids.append(row["id"].strip())
            texts.append(fields_)
    except csv.Error as err:
        raise DataError(f"{path}: unreadable at row {rows + 1} ({err})") from None
    skipped = sum(reasons.values())
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        log.warning("%s: skipped %d of %d rows (%s)", path.name, skipped, rows, detail)
    stats = FileStats(file=path.name, sha256=digest, rows=rows, skipped=skipped,
                      reasons=dict(reasons))
    label_array = np.asarray(labels, dtype=np.float32) if labelled else None
    return Examples(task, ids, texts, label_array, stats, digest)


def sample_indices(n: int, cap: int, *, seed: int, key: str) -> np.ndarray:
    """A seeded random sample of `cap` of `n` rows (all when cap is 0 or >= n), in file order.

    Never the first rows: the training files are sorted (the first 2,000 SST
    rows are mostly labels 3 and 4).
    """
    if cap <= 0 or cap >= n:
        return np.arange(n)
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    return np.sort(rng.choice(n, size=cap, replace=False))


def tokenize_cached(examples: Examples, tokenizer: Tokenizer,
                    cache_dir: Path | None) -> list[list[np.ndarray]]:
    """Token ids of every text column of every row, tokenized once per file and tokenizer.

    The cache key is the file's content, the tokenizer's files and the column
    names; ids are stored untruncated, so every max_length shares one entry.
    Entries are written to a temporary file and renamed, so several workers
    may fill one cache at once.
    """
    key = hashlib.sha256("|".join([
        str(CACHE_VERSION), examples.digest, tokenizer.fingerprint,
        ",".join(examples.task.text_columns)]).encode()).hexdigest()[:32]
    path = cache_dir / f"{examples.task.name}-{key}.npz" if cache_dir else None
    n_columns = len(examples.task.text_columns)
    if path is not None and path.exists():
        try:
            with np.load(path) as cached:
                columns = [np.split(cached[f"ids{c}"], cached[f"offsets{c}"][1:-1])
                           for c in range(n_columns)]
            if all(len(col) == len(examples.texts) for col in columns):
                return columns
        except (OSError, ValueError, KeyError):
            log.warning("token cache %s is unreadable; tokenizing again", path)
    columns = [tokenizer.encode([t[c] for t in examples.texts]) for c in range(n_columns)]
    if path is not None:
        arrays = {}
        for c, column in enumerate(columns):
            lengths = np.array([len(ids) for ids in column], dtype=np.int64)
            arrays[f"ids{c}"] = np.concatenate(column) if column else np.zeros(0, np.int32)
            arrays[f"offsets{c}"] = np.concatenate([[0], np.cumsum(lengths)])
        _atomic_savez(path, arrays)
    return columns


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("could not write the token cache %s (%s); going on without it", path, err)


@dataclass
class Batch:
    """One task's batch: one or two views (siamese pairs) of padded token ids."""

    task: str
    views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # (ids, mask, types), (B, T)
    labels: torch.Tensor | None
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def to(self, device: torch.device) -> Batch:
        move = (lambda t: t.to(device, non_blocking=True))
        views = [tuple(move(t) for t in view) for view in self.views]
        labels = move(self.labels) if self.labels is not None else None
        return Batch(self.task, views, labels, self.indices)  # type: ignore[arg-type]


class EncodedSet:
    """Model inputs of one task split, built once; batches are cut from it."""

    def __init__(self, examples: Examples, columns: list[list[np.ndarray]],
                 tokenizer: Tokenizer, *, max_length: int, siamese: bool,
                 indices: np.ndarray | None = None):
        self.task = examples.task
        keep = np.arange(len(examples.ids)) if indices is None else indices
        self.ids = [examples.ids[i] for i in keep]
        self.labels = None if examples.labels is None else examples.labels[keep]
        self.stats = examples.stats
        build = tokenizer.build_inputs
        if len(columns) == 1:
            self.views = [[build(columns[0][i], None, max_length) for i in keep]]
        elif siamese:
            self.views = [[build(col[i], None, max_length) for i in keep] for col in columns]
        else:
            self.views = [[build(columns[0][i], columns[1][i], max_length) for i in keep]]
        self.pad_id = tokenizer.pad_id
        self._by_length: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: np.ndarray) -> Batch:
        views = []
        for view in self.views:
            rows = [view[i] for i in indices]
            T = max(len(ids) for ids, _ in rows)
            ids = np.full((len(rows), T), self.pad_id, dtype=np.int64)
            types = np.zeros((len(rows), T), dtype=np.int64)
            mask = np.zeros((len(rows), T), dtype=np.int64)
            for r, (row_ids, row_types) in enumerate(rows):
                ids[r, : len(row_ids)] = row_ids
                types[r, : len(row_ids)] = row_types
                mask[r, : len(row_ids)] = 1
            views.append((torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)))
        labels = None if self.labels is None else torch.from_numpy(self.labels[indices])
        return Batch(self.task.name, views, labels, np.asarray(indices))

    def batches(self, batch_size: int):
        """Batches of similar lengths covering every example once (evaluation, prediction).

        Sorting by length leaves almost no padding; `Batch.indices` says where
        each row belongs.
        """
        if self._by_length is None:  # computed once: every epoch evaluates the same set
            lengths = np.array([sum(len(view[i][0]) for view in self.views)
                                for i in range(len(self))])
            self._by_length = np.argsort(lengths, kind="stable")
        order = self._by_length
        for start in range(0, len(self), batch_size):
            yield self.batch(order[start:start + batch_size])


class TaskSampler:
    """Shuffled batches of one task, a new seeded permutation every pass.

    Its state is two integers (pass, position), saved with the resume state,
    so a resumed run sees exactly the batches the killed run would have seen.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, task: str):
        if size == 0:
            raise DataError(f"task {task} has no training examples")
        self.size, self.batch_size = size, batch_size
        self._seed = [seed, zlib.crc32(task.encode())]
        self.epoch_pass, self.position = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng(self._seed + [self.epoch_pass]).permutation(self.size)

    @property
    def batches_per_pass(self) -> int:
        return -(-self.size // self.batch_size)

    def next(self) -> np.ndarray:
        if self.position >= self.size:
            self.epoch_pass, self.position = self.epoch_pass + 1, 0
            self._order = self._permutation()
        indices = self._order[self.position: self.position + self.batch_size]
        self.position += len(indices)
        return indices

    def state(self) -> dict[str, int]:
        return {"pass": self.epoch_pass, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch_pass, self.position = int(state["pass"]), int(state["position"])
        self._order = self._permutation()
