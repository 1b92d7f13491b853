"""`mtbert data download` against a local HTTP server: no internet needed."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import pytest

from mtbert.download import (
    OFFICIAL_FILES,
    DownloadError,
    FileResult,
    download_data,
    git_blob_id,
)
from mtbert.errors import MtbertError

SHARED_DATA = Path(__file__).parents[2] / "shared" / "data" / "cs224n-qqp16k"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"shared data folder {SHARED_DATA} is absent"
)

ALPHA = b"id\tsentence\tsentiment\n0\ta fine film\t3\n"
BETA = b"id\tsentence1\tsentence2\tsimilarity\n0\ta\tb\t2.5\n"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep pytest output clean
        pass


class LocalServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving one directory."""

    def __init__(self, directory: Path):
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join()
            self.running = False


@pytest.fixture
def serve():
    servers: list[LocalServer] = []

    def start(directory: Path) -> LocalServer:
        servers.append(LocalServer(directory))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def remote(tmp_path, serve):
    """A served folder holding a.csv (ALPHA) and b.csv (BETA)."""
    folder = tmp_path / "remote"
    folder.mkdir()
    (folder / "a.csv").write_bytes(ALPHA)
    (folder / "b.csv").write_bytes(BETA)
    return serve(folder)


MANIFEST = {"a.csv": git_blob_id(ALPHA), "b.csv": git_blob_id(BETA)}


def statuses(results: list[FileResult]) -> dict[str, str]:
    return {r.name: r.status for r in results}


def test_git_blob_id_matches_git_hash_object():
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"


def test_official_manifest_lists_the_nine_task_files():
    assert len(OFFICIAL_FILES) == 9
    assert OFFICIAL_FILES["sts-dev.csv"] == "9392860e584717976b8d817cc40c9e6ceeec27e0"
    assert all(len(blob) == 40 for blob in OFFICIAL_FILES.values())


def test_downloads_and_verifies_synthetic_files(tmp_path, remote):
    data_dir = tmp_path / "data" / "nested"
    results = download_data(data_dir, base_url=remote.base_url, files=MANIFEST, progress=False)

    assert statuses(results) == {"a.csv": "downloaded", "b.csv": "downloaded"}
    assert (data_dir / "a.csv").read_bytes() == ALPHA
    assert (data_dir / "b.csv").read_bytes() == BETA
    assert sorted(p.name for p in data_dir.iterdir()) == ["a.csv", "b.csv"]


def test_second_call_reports_present_without_network(tmp_path, remote):
    download_data(tmp_path, base_url=remote.base_url, files=MANIFEST, progress=False)
    remote.stop()

    results = download_data(tmp_path, base_url=remote.base_url, files=MANIFEST, progress=False)

    assert statuses(results) == {"a.csv": "present", "b.csv": "present"}
    assert (tmp_path / "a.csv").read_bytes() == ALPHA


def test_wrong_content_fails_and_others_still_download(tmp_path, remote):
    manifest = {"a.csv": git_blob_id(b"something else"), "b.csv": MANIFEST["b.csv"]}
    data_dir = tmp_path / "data"

    results = download_data(data_dir, base_url=remote.base_url, files=manifest, progress=False)

    assert statuses(results) == {"a.csv": "failed", "b.csv": "downloaded"}
    detail = results[0].detail
    assert manifest["a.csv"] in detail and git_blob_id(ALPHA) in detail
    assert "\n" not in detail
    # Neither the wrong file nor a leftover temp file is written.
    assert [p.name for p in data_dir.iterdir()] == ["b.csv"]


def test_missing_remote_file_fails_with_http_status(tmp_path, remote):
    manifest = {"missing.csv": git_blob_id(b"x"), **MANIFEST}
    data_dir = tmp_path / "data"

    results = download_data(data_dir, base_url=remote.base_url, files=manifest, progress=False)

    assert statuses(results) == {
        "missing.csv": "failed",
        "a.csv": "downloaded",
        "b.csv": "downloaded",
    }
    assert results[0].detail.startswith("HTTP 404")
    assert not (data_dir / "missing.csv").exists()


def test_unreachable_server_fails_every_file(tmp_path, remote):
    remote.stop()

    data_dir = tmp_path / "d"
    results = download_data(data_dir, base_url=remote.base_url, files=MANIFEST, progress=False)

    assert statuses(results) == {"a.csv": "failed", "b.csv": "failed"}
    assert all("cannot reach" in r.detail for r in results)
    assert list(data_dir.iterdir()) == []


def test_correct_local_file_survives_a_bad_server_copy(tmp_path, serve):
    bad_remote = tmp_path / "remote"
    bad_remote.mkdir()
    (bad_remote / "a.csv").write_bytes(b"tampered")
    server = serve(bad_remote)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "a.csv").write_bytes(ALPHA)
    manifest = {"a.csv": MANIFEST["a.csv"]}

    kept = download_data(data_dir, base_url=server.base_url, files=manifest, progress=False)
    forced = download_data(
        data_dir, base_url=server.base_url, files=manifest, force=True, progress=False
    )

    assert statuses(kept) == {"a.csv": "present"}
    assert statuses(forced) == {"a.csv": "failed"}
    assert (data_dir / "a.csv").read_bytes() == ALPHA
    assert [p.name for p in data_dir.iterdir()] == ["a.csv"]


def test_wrong_local_file_is_replaced_by_the_verified_download(tmp_path, remote):
    (tmp_path / "a.csv").write_bytes(b"stale copy")

    results = download_data(tmp_path, base_url=remote.base_url, files=MANIFEST, progress=False)

    assert statuses(results) == {"a.csv": "downloaded", "b.csv": "downloaded"}
    assert (tmp_path / "a.csv").read_bytes() == ALPHA


def test_force_downloads_again_even_when_present(tmp_path, remote):
    download_data(tmp_path, base_url=remote.base_url, files=MANIFEST, progress=False)

    results = download_data(
        tmp_path, base_url=remote.base_url, files=MANIFEST, force=True, progress=False
    )

    assert statuses(results) == {"a.csv": "downloaded", "b.csv": "downloaded"}


def test_base_url_comes_from_environment(tmp_path, remote, monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_URL", remote.base_url.rstrip("/"))

    results = download_data(tmp_path, files={"a.csv": MANIFEST["a.csv"]}, progress=False)

    assert statuses(results) == {"a.csv": "downloaded"}
    assert (tmp_path / "a.csv").read_bytes() == ALPHA


def test_logs_one_line_per_file(tmp_path, remote, caplog):
    manifest = {"missing.csv": git_blob_id(b"x"), **MANIFEST}
    with caplog.at_level("INFO", logger="mtbert"):
        download_data(tmp_path, base_url=remote.base_url, files=manifest, progress=False)

    lines = [r.getMessage() for r in caplog.records if r.name == "mtbert"]
    assert len(lines) == 3
    assert lines[0].startswith("missing.csv: failed (HTTP 404")
    assert lines[1].startswith("a.csv: downloaded")


def test_data_dir_that_is_a_file_raises_download_error(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("occupied")

    with pytest.raises(DownloadError, match="cannot create data directory"):
        download_data(not_a_dir, base_url="http://127.0.0.1:9/", files=MANIFEST, progress=False)
    assert issubclass(DownloadError, MtbertError)
    assert DownloadError.exit_code == 1


@needs_shared_data
def test_official_sst_and_sts_files_verify(tmp_path, serve):
    server = serve(SHARED_DATA)
    manifest = {n: b for n, b in OFFICIAL_FILES.items() if n.startswith(("ids-sst-", "sts-"))}
    data_dir = tmp_path / "data"

    results = download_data(data_dir, base_url=server.base_url, files=manifest, progress=False)

    assert len(results) == 6
    assert all(r.status == "downloaded" for r in results), results
    for name in manifest:
        assert (data_dir / name).read_bytes() == (SHARED_DATA / name).read_bytes()


@needs_shared_data
def test_quora_subset_fails_the_official_blob_id(tmp_path, serve):
    server = serve(SHARED_DATA)
    data_dir = tmp_path / "data"

    results = download_data(
        data_dir,
        base_url=server.base_url,
        files={"quora-dev.csv": OFFICIAL_FILES["quora-dev.csv"]},
        progress=False,
    )

    assert statuses(results) == {"quora-dev.csv": "failed"}
    assert f"expected {OFFICIAL_FILES['quora-dev.csv']}" in results[0].detail
    assert git_blob_id((SHARED_DATA / "quora-dev.csv").read_bytes()) in results[0].detail
    assert list(data_dir.iterdir()) == []
