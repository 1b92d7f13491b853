"""`mtbert data download`: fetch the official CS224N minBERT task files.

Every file is checked against its git blob id (what `git hash-object` prints),
so a file is only ever written when it is byte-for-byte the official one.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from mtbert.errors import MtbertError

logger = logging.getLogger("mtbert")

# The CS224N starter repository; blob ids are taken from its git tree, so they
# can be checked against the repository itself (`git ls-tree main data/`).
DEFAULT_URL = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data/"
URL_ENV_VAR = "MTBERT_DATA_URL"

OFFICIAL_FILES: dict[str, str] = {
    "ids-sst-train.csv": "9cb7333cb1dae49c2bd2a4b56a24882a6e8704b5",
    "ids-sst-dev.csv": "3171aa629a340809d2db4a50df8f6e5ec9420ab0",
    "ids-sst-test-student.csv": "bbd2313758825f86e24416d6aad64cd93370cf7a",
    "quora-train.csv": "a3b5546f6a0e65b60a328a5d294d1038f5bed1da",
    "quora-dev.csv": "de7cfa32428fd470b93f778fccc45a619e01336f",
    "quora-test-student.csv": "f257ef00558555afb50819578a58205732b16354",
    "sts-train.csv": "12b17760e7795fee35aeeabc290d5651de02622a",
    "sts-dev.csv": "9392860e584717976b8d817cc40c9e6ceeec27e0",
    "sts-test-student.csv": "25f0cf8fafdd1f82b9e2bb460c708af34341ce60",
}

_CHUNK = 1 << 16


class DownloadError(MtbertError):
    """The data directory cannot be prepared (a runtime failure, not bad input)."""

    exit_code = 1


@dataclass(frozen=True)
class FileResult:
    """Outcome for one file: status is "downloaded", "present" or "failed"."""

    name: str
    status: str
    detail: str = ""


def git_blob_id(data: bytes) -> str:
    """Return the git blob id of `data`, as `git hash-object` prints it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_blob_id(path: Path) -> str:
    # Chunked so that large files are never held in memory at once.
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch(url: str, dest: Path, *, name: str, progress: bool, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "mtbert"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with dest.open("wb") as out, tqdm(
            total=total, desc=name, unit="B", unit_scale=True,
            file=sys.stderr, disable=not progress, leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def _download_one(
    name: str, expected: str, data_dir: Path, url: str, *, progress: bool, timeout: float
) -> FileResult:
    # The temp file lives in data_dir so that os.replace is an atomic rename,
    # never a cross-device copy that could leave half a file behind.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=data_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _fetch(url, tmp, name=name, progress=progress, timeout=timeout)
        got = _file_blob_id(tmp)
        if got != expected:
            return FileResult(name, "failed", f"blob id mismatch: expected {expected}, got {got}")
        size = tmp.stat().st_size
        os.replace(tmp, data_dir / name)
        return FileResult(name, "downloaded", f"{size} bytes from {url}")
    except urllib.error.HTTPError as e:
        return FileResult(name, "failed", f"HTTP {e.code} {e.reason} for {url}")
    except urllib.error.URLError as e:
        return FileResult(name, "failed", f"cannot reach {url}: {e.reason}")
    except (OSError, http.client.HTTPException) as e:
        # Timeouts, dropped connections and disk errors mid-stream.
        return FileResult(name, "failed", f"{type(e).__name__} while fetching {url}: {e}")
    finally:
        tmp.unlink(missing_ok=True)


def download_data(
    data_dir: Path,
    *,
    base_url: str | None = None,
    files: dict[str, str] | None = None,
    force: bool = False,
    progress: bool = True,
    timeout: float = 60,
) -> list[FileResult]:
    """Download and verify `files` (default: OFFICIAL_FILES) into `data_dir`.

    A failure on one file does not stop the others; the caller decides the
    exit code from the returned results.
    """
    base = base_url or os.environ.get(URL_ENV_VAR) or DEFAULT_URL
    base = base.rstrip("/") + "/"
    files = OFFICIAL_FILES if files is None else files
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create data directory {data_dir}: {e.strerror}") from e

    results = []
    for name, expected in files.items():
        target = data_dir / name
        if not force and target.is_file() and _file_blob_id(target) == expected:
            result = FileResult(name, "present", str(target))
        else:
            result = _download_one(
                name, expected, data_dir, base + name, progress=progress, timeout=timeout
            )
        log = logger.warning if result.status == "failed" else logger.info
        log("%s: %s (%s)", name, result.status, result.detail)
        results.append(result)
    return results
