"""Reading task files, the token cache, batches (padded or packed), and their copy to the
device.

Files are the CS224N ones: tab-separated, a header, columns used by name,
fields quoted CSV-style where needed. One line is one row: every line after
the header is either kept or skipped and counted, so `rows` is always the
file's lines minus the header. Malformed rows (empty text, empty or
out-of-range label, too few or too many fields, a blank line, bytes that are
not UTF-8) are skipped and counted, never kept and never fatal. A quote still
open at the end of its line would make a CSV reader swallow every following
line into one field; such a line is read again with its quotes as plain
characters, still as one row, and counted (`unclosed_quotes`). Quoted fields
spanning lines are therefore not supported; the task files have none. A
missing file, a directory or a missing required column is one `DataError`
naming the file and column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
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
    rows: int  # lines after the header: kept + skipped
    skipped: int
    reasons: dict[str, int] = field(default_factory=dict)
    # Lines whose quote never closed, read with the quote as a character (kept or skipped).
    unclosed_quotes: int = 0

    def to_json(self) -> dict:
        return {"file": self.file, "sha256": self.sha256, "rows": self.rows,
                "skipped": self.skipped, "skip_reasons": self.reasons,
                "unclosed_quotes": self.unclosed_quotes}


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
    raw = _read_task_file(path)
    digest = hashlib.sha256(raw).hexdigest()
    # Undecodable bytes become lone surrogates (one per byte, line breaks untouched), so
    # the lines that hold them can be found, skipped and counted instead of silently
    # carrying U+FFFD into training.
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    not_utf8 = _SURROGATE.search(text) is not None
    # newline="" splits lines where the csv module would (\n, \r\n, \r) and keeps odd
    # separators (\x85, \u2028) inside the text.
    lines = io.StringIO(text, newline="").readlines()
    try:
        columns, _ = _split_line(lines[0]) if lines else ([], False)
    except csv.Error as err:
        raise DataError(f"{path}: the header line cannot be read ({err})") from None
    required = list(task.text_columns) + ([task.label_column] if labelled else [])
    for column in ["id", *required]:
        if column not in columns:
            shown = _printable(", ".join(c for c in columns if c)) or "none"
            raise DataError(f"{path}: missing column '{column}' (found: {shown}); "
                            f"{task.name} needs {', '.join(['id', *required])}")
    index = {name: i for i, name in enumerate(columns)}  # a repeated name: the last one
    last_required = max(index[c] for c in ["id", *required])
    ids, texts, labels = [], [], []
    reasons: Counter[str] = Counter()
    unclosed: list[int] = []
    for number, line in enumerate(lines[1:], start=2):
        if not_utf8 and _SURROGATE.search(line):
            reasons["not UTF-8"] += 1
            continue
        try:
            fields_, open_quote = _split_line(line)
        except csv.Error:  # e.g. a field over csv.field_size_limit
            reasons["unreadable line"] += 1
            continue
        if open_quote:
            unclosed.append(number)
        if not fields_:
            reasons["blank line"] += 1
            continue
        if len(fields_) > len(columns):
            reasons["too many fields"] += 1
            continue
        if len(fields_) <= last_required:
            reasons["short row"] += 1
            continue
        row = tuple(fields_[index[c]].strip() for c in task.text_columns)
        if not all(row):
            reasons["empty text"] += 1
            continue
        if labelled:
            raw_label = fields_[index[task.label_column]].strip()
            label = task.parse_label(raw_label)
            if label is None:
                reasons["label out of range" if raw_label else "empty label"] += 1
                continue
            labels.append(label)
        ids.append(fields_[index["id"]].strip())
        texts.append(row)
    rows = max(len(lines) - 1, 0)
    skipped = sum(reasons.values())
    if skipped:
        detail = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        log.warning("%s: skipped %d of %d rows (%s)", path.name, skipped, rows, detail)
    if unclosed:
        log.warning("%s: %d line(s) open a quote that never closes (line %s); read with the "
                    "quote as a plain character, one row per line", path.name, len(unclosed),
                    ", ".join(map(str, unclosed[:5])) + (", ..." if len(unclosed) > 5 else ""))
    stats = FileStats(file=path.name, sha256=digest, rows=rows, skipped=skipped,
                      reasons=dict(reasons), unclosed_quotes=len(unclosed))
    label_array = np.asarray(labels, dtype=np.float32) if labelled else None
    return Examples(task, ids, texts, label_array, stats, digest)


_SURROGATE = re.compile("[\udc80-\udcff]")


def _read_task_file(path: Path) -> bytes:
    if path.is_dir():
        raise DataError(f"data file {path} is a directory; name a task file in it, or point "
                        "data.dir at it")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist; get the task files with "
                        "`mtbert data download --data-dir DIR` or point data.dir at them"
                        ) from None
    except OSError as err:
        raise DataError(f"data file {path} cannot be read ({err.strerror or err})") from None


def _split_line(line: str) -> tuple[list[str], bool]:
    """The fields of one line, and whether a quote in it never closes.

    csv keeps the line break in a field whose quote is still open at the end of the
    line (it would go on reading the next lines into it); such a line is split again
    with quotes as plain characters.
    """
    if not line.endswith(("\n", "\r")):
        line += "\n"  # the last line: an open quote then shows as a line break too
    fields_ = next(csv.reader((line,), delimiter="\t"), [])
    if any("\n" in f or "\r" in f for f in fields_):
        return next(csv.reader((line,), delimiter="\t", quoting=csv.QUOTE_NONE), []), True
    return fields_, False


def _printable(text: str, limit: int = 80) -> str:
    """A short, printable prefix of `text` for an error message (a header can be 5 MB of
    binary): other characters escaped, undecodable bytes as \\xNN."""
    shown: list[str] = []
    length = 0
    for c in text:
        if "\udc80" <= c <= "\udcff":  # a byte that is not UTF-8 (surrogateescape)
            c = f"\\x{ord(c) - 0xdc00:02x}"
        elif not c.isprintable():
            c = repr(c)[1:-1]
        if length + len(c) > limit:
            return "".join(shown) + "..."
        shown.append(c)
        length += len(c)
    return "".join(shown)


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


# Padded lengths (and the packed grid's) are rounded up to a multiple of this, up to
# model.max_length: with at most max_length / 8 lengths (16 at length 128), a dense
# attention kernel that prepares itself per shape (cuDNN builds a plan per shape) sees
# few shapes instead of nearly one per batch, and bf16 tensor cores get aligned tiles.
# Padded tokens are masked, so outputs do not change (tests/test_fastpath.py).
PAD_MULTIPLE = 8
# Each tensor of a staged batch starts at a multiple of this many bytes of its buffer.
_STAGE_ALIGN = 16


def padded_length(longest: int, multiple: int, limit: int | None = None) -> int:
    """`longest` rounded up to a multiple of `multiple`, but never past `limit` (the
    longest a sequence can be) when that is at least `longest`."""
    rounded = -(-longest // multiple) * multiple
    return min(rounded, limit) if limit is not None and limit >= longest else rounded


@dataclass
class PackedView:
    """The real tokens of a batch's sequences, concatenated without padding.

    Sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]. `pad_index` places each
    token in a (S, grid_len) padded grid, for attention kernels that need one;
    `grid_len` is max_len rounded up (`PAD_MULTIPLE`) so that the grid takes few
    shapes. Built on the host, so the encoder never asks the device where
    sequences end (a `nonzero` on a CUDA mask would be a host-device sync every step).
    """

    ids: torch.Tensor  # (N,)
    types: torch.Tensor  # (N,)
    positions: torch.Tensor  # (N,) position of each token inside its sequence
    cu_seqlens: torch.Tensor  # (S+1,) int32 offsets
    pad_index: torch.Tensor  # (N,) flat index into (S, grid_len)
    max_len: int
    min_len: int
    groups: int = 1  # siamese: 2 stacked views, sentences a first then sentences b
    grid_len: int = 0  # the padded grid's length, >= max_len; 0 = max_len

    def __post_init__(self) -> None:
        self.grid_len = self.grid_len or self.max_len

    @property
    def n_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]  # (S,)

    @property
    def seq_index(self) -> torch.Tensor:
        return self.pad_index // self.grid_len  # (N,) sequence of each token

    def tensors(self) -> list[torch.Tensor]:
        return [self.ids, self.types, self.positions, self.cu_seqlens, self.pad_index]

    def with_tensors(self, tensors: list[torch.Tensor]) -> PackedView:
        """The same view over `tensors` (in the order of `tensors()`)."""
        return replace(self, **dict(zip(("ids", "types", "positions", "cu_seqlens",
                                         "pad_index"), tensors)))


def stage(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """`tensors` on `device` through one host buffer and one copy.

    Their bytes are laid out in one buffer (pinned when the device is CUDA, so that the
    copy runs asynchronously, with one pinned allocation instead of one per tensor),
    copied once, and cut back into views of the right dtype and shape.
    """
    device = torch.device(device)
    sizes = [t.numel() * t.element_size() for t in tensors]
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // _STAGE_ALIGN) * _STAGE_ALIGN
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.type == "cuda")
    for t, start, size in zip(tensors, starts, sizes):
        host[start:start + size].view(t.dtype).view(t.shape).copy_(t)
    moved = host.to(device, non_blocking=True)
    return [moved[start:start + size].view(t.dtype).view(t.shape)
            for t, start, size in zip(tensors, starts, sizes)]


def pad_rows(rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int, *, multiple: int = 1,
             limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, type ids) rows as padded (B, T) ids, attention mask and type ids; T is
    the longest row rounded up to `multiple` (never past `limit`, see `padded_length`)."""
    T = padded_length(max(len(ids) for ids, _ in rows), multiple, limit)
    ids = np.full((len(rows), T), pad_id, dtype=np.int64)
    types = np.zeros((len(rows), T), dtype=np.int64)
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for r, (row_ids, row_types) in enumerate(rows):
        ids[r, : len(row_ids)] = row_ids
        types[r, : len(row_ids)] = row_types
        mask[r, : len(row_ids)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types)


def pack_rows(rows: list[tuple[np.ndarray, np.ndarray]], groups: int = 1, *,
              multiple: int = 1, limit: int | None = None) -> PackedView:
    """A PackedView of (ids, types) rows; its grid is the longest row rounded up to
    `multiple` (never past `limit`)."""
    lengths = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
    T = padded_length(int(lengths.max()), multiple, limit)
    cu = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
    pad_index = np.repeat(np.arange(len(rows)) * T, lengths) + positions
    return PackedView(torch.from_numpy(np.concatenate([r[0] for r in rows])),
                      torch.from_numpy(np.concatenate([r[1] for r in rows])),
                      torch.from_numpy(positions), torch.from_numpy(cu.astype(np.int32)),
                      torch.from_numpy(pad_index), int(lengths.max()), int(lengths.min()),
                      groups, T)


@dataclass
class Batch:
    """One task's batch: one or two views (siamese pairs) of padded token ids, or one
    PackedView of all its sequences (`EncodedSet.packed`)."""

    task: str
    views: list  # [(ids, mask, types)] each (B, T), or [PackedView]
    labels: torch.Tensor | None
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def packed(self) -> bool:
        return isinstance(self.views[0], PackedView)

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`: every tensor through one buffer and one copy (`stage`)."""
        tensors = [t for view in self.views for t in
                   (view.tensors() if isinstance(view, PackedView) else view)]
        if self.labels is not None:
            tensors.append(self.labels)
        moved = iter(stage(tensors, device))
        views = [view.with_tensors([next(moved) for _ in view.tensors()])
                 if isinstance(view, PackedView) else tuple(next(moved) for _ in view)
                 for view in self.views]
        labels = next(moved) if self.labels is not None else None
        return Batch(self.task, views, labels, self.indices)


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
        self.max_length = max_length
        # Padded (and grid) lengths are rounded up to this multiple: few batch shapes.
        self.pad_multiple = PAD_MULTIPLE
        self._by_length: np.ndarray | None = None
        # Batches as PackedView (no padding) instead of padded (B, T) tensors.
        self.packed = False

    def lengths(self) -> np.ndarray:
        """Tokens of each example, all views together."""
        return np.array([sum(len(view[i][0]) for view in self.views) for i in range(len(self))])

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: np.ndarray) -> Batch:
        labels = None if self.labels is None else torch.from_numpy(self.labels[indices])
        if self.packed:
            rows = [view[i] for view in self.views for i in indices]
            view = pack_rows(rows, len(self.views), multiple=self.pad_multiple,
                             limit=self.max_length)
            return Batch(self.task.name, [view], labels, np.asarray(indices))
        views = [pad_rows([view[i] for i in indices], self.pad_id, multiple=self.pad_multiple,
                          limit=self.max_length) for view in self.views]
        return Batch(self.task.name, views, labels, np.asarray(indices))

    def batches(self, batch_size: int):
        """Batches of similar lengths covering every example once (evaluation, prediction).

        Sorting by length leaves almost no padding; `Batch.indices` says where
        each row belongs.
        """
        if self._by_length is None:  # computed once: every epoch evaluates the same set
            self._by_length = np.argsort(self.lengths(), kind="stable")
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


class LengthBucketSampler(TaskSampler):
    """Batches of examples of similar length, in shuffled order, each example once per pass.

    Every pass takes a seeded permutation, cuts it into windows of
    `window` batches, sorts each window by length and cuts it into batches;
    the batches of the whole pass are then shuffled. Padding (and, packed,
    attention work per batch) shrinks, while each batch still mixes examples
    from the whole set. Windows rather than one global sort keep batch
    composition random across passes (as in the "sortish" samplers of
    fairseq and fastai).
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, *, seed: int, task: str,
                 window: int = 50):
        self.lengths = np.asarray(lengths)
        self.window = window
        super().__init__(len(self.lengths), batch_size, seed=seed, task=task)

    def _permutation(self) -> np.ndarray:
        rng = np.random.default_rng(self._seed + [self.epoch_pass])
        order = rng.permutation(self.size)
        span = self.window * self.batch_size
        batches = []
        for start in range(0, self.size, span):
            chunk = order[start:start + span]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        self._batches = [batches[i] for i in rng.permutation(len(batches))]
        # Where each batch starts in the pass, so that `position` (examples served) stays
        # the resume state, as in TaskSampler.
        self._starts = np.concatenate([[0], np.cumsum([len(b) for b in self._batches])])
        return np.concatenate(self._batches)

    @property
    def batches_per_pass(self) -> int:
        return len(self._batches)

    def next(self) -> np.ndarray:
        if self.position >= self.size:
            self.epoch_pass, self.position = self.epoch_pass + 1, 0
            self._order = self._permutation()
        k = int(np.searchsorted(self._starts, self.position, side="right")) - 1
        indices = self._batches[k]
        self.position = int(self._starts[k + 1])
        return indices


def make_task_sampler(dataset: EncodedSet, batch_size: int, *, seed: int,
                      bucket_by_length: bool) -> TaskSampler:
    """The training sampler of one task: shuffled, or length-bucketed (train.bucket_by_length)."""
    name = dataset.task.name
    if bucket_by_length:
        return LengthBucketSampler(dataset.lengths(), batch_size, seed=seed, task=name)
    return TaskSampler(len(dataset), batch_size, seed=seed, task=name)
