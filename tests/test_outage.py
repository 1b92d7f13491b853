"""A study storage that goes away under a running sweep: a PostgreSQL server of the
test's own (initdb in a temporary directory, on a free port) stopped and started while
a worker runs stand-in trials; a server that accepts TCP and never answers.

Skipped, with the reason, where PostgreSQL's server programs are not installed.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
import pytest

from conftest import silent_server, use_stub_trials, wait_for

pytestmark = pytest.mark.slow

BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateServer:
    """A PostgreSQL server of this test alone, which it may stop and start."""

    def __init__(self, root: Path):
        self.bin = BINARIES[-1].parent
        self.data, self.port = root / "data", _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # initdb refuses root: the server runs as postgres
            shutil.chown(root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync", "-E", "UTF8")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data.parent / "log"), "-w",
                  "-o", f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")


def _reason() -> str | None:
    if not BINARIES:
        return "PostgreSQL's server programs (initdb) are not installed"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL as its own user"
    return None


@pytest.fixture
def server():
    if _reason():
        pytest.skip(_reason())
    # Not under pytest's own temporary folder, which only root may enter.
    root = Path(tempfile.mkdtemp(prefix="mtbert-pg-"))
    pg = PrivateServer(root)
    yield pg
    try:
        pg.stop()
    except subprocess.CalledProcessError:
        pass  # stopped already
    shutil.rmtree(root, ignore_errors=True)


def _spec(out: Path) -> Path:
    """The shipped lr-decay spec with one seed a configuration and the median pruner, so
    that each epoch's report reaches the storage (the shipped spec races 3 seeds with no
    pruner: its trials meet the storage only as they start and end)."""
    printed = subprocess.run([sys.executable, "-m", "mtbert", "sweep", "lr-decay", "--print"],
                             capture_output=True, text=True, check=True).stdout
    spec = yaml.safe_load(printed)
    spec.update(seeds=1, race_alpha=None, pruner={"name": "median", "n_startup_trials": 2})
    spec = {k: v for k, v in spec.items() if v is not None}
    path = out.parent / "lr-decay-median.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _sweep(server, out, *extra):
    cmd = [sys.executable, "-m", "mtbert", "sweep", str(_spec(out)), "--storage",
           server.url, "--study", "s", "--out", str(out), "--wandb-mode", "disabled",
           "--device", "cpu",
           "--heartbeat", "1", "--grace", "4", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trials(server):
    from mtbert.studies.storage import with_driver
    return optuna.load_study(study_name="s", storage=with_driver(server.url)).trials


def _running(out: Path, number: int, epoch: int):
    log = out / "s" / f"trial-{number:04d}" / "trial.log"
    return lambda: log.exists() and f"epoch {epoch}/" in log.read_text()


def _away_during_trial_0(server, out: Path, seconds: float, *extra: str) -> str:
    """A 2-trial sweep whose storage is stopped for `seconds` in trial 0's first epoch;
    its stderr, once it exited 0."""
    worker = _sweep(server, out, "--trials", "2", "--set", "train.epochs=4", *extra)
    wait_for(_running(out, 0, 1), timeout=60, what="trial 0's first epoch")
    server.stop()
    time.sleep(seconds)
    server.start()
    stdout, stderr = worker.communicate(timeout=180)
    assert worker.returncode == 0, stderr
    return stderr


def test_a_blip_loses_nothing_and_the_sweep_ends_as_usual(server, tmp_path, monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=1.0)
    out = tmp_path / "runs"
    stderr = _away_during_trial_0(server, out, 5, "--grace", "30")
    assert "Traceback" not in stderr
    trial_log = (out / "s" / "trial-0000" / "trial.log").read_text()
    assert "is unreachable (" in trial_log and "the study storage is back after" in trial_log
    assert [t.state.name for t in _trials(server)] == ["COMPLETE", "COMPLETE"]
    assert not (out / "s" / "trial-0000" / "resume.pt").exists()  # finished, told


def test_a_trial_whose_heartbeat_stays_away_past_grace_is_stopped_and_resumed(
        server, tmp_path, monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=1.0)
    stderr = _away_during_trial_0(server, tmp_path / "runs", 8)  # --grace 4
    assert "trial 0: its heartbeat could not be recorded for 4 s; stopping it" in stderr
    first, retry = _trials(server)
    assert first.state.name == "FAIL", stderr
    assert first.user_attrs["fail_reason"] == "its heartbeat could not be recorded for 4 s"
    assert retry.state.name == "COMPLETE" and retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["resumed_from_epoch"] >= 1


def test_an_outage_past_the_limit_is_one_line_and_the_next_worker_resumes(server, tmp_path,
                                                                        monkeypatch):
    use_stub_trials(monkeypatch, epoch_s=1.0)
    out = tmp_path / "runs"
    worker = _sweep(server, out, "--trials", "1", "--set", "train.epochs=6",
                    "--storage-outage", "3")
    wait_for(_running(out, 0, 2), timeout=60, what="trial 0's second epoch")
    server.stop()
    stdout, stderr = worker.communicate(timeout=120)
    assert worker.returncode == 1, stderr
    errors = [ln for ln in stderr.splitlines() if ln.startswith("mtbert: error:")]
    assert len(errors) == 1 and "stayed unreachable for 3 s" in errors[0], stderr
    assert "Traceback" not in stderr
    server.start()
    assert [t.state.name for t in _trials(server)] == ["RUNNING"]  # nothing told, nothing lost
    time.sleep(5)  # its heartbeat goes stale
    nxt = _sweep(server, out, "--trials", "1", "--set", "train.epochs=6")
    stdout, stderr = nxt.communicate(timeout=180)
    assert nxt.returncode == 0, stderr
    first, retry = _trials(server)
    assert first.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.user_attrs["retry_of"] == 0
    assert retry.user_attrs["resumed_from_epoch"] >= 2  # from its run directory


def test_a_server_that_never_answers_is_one_line_within_the_timeout(tmp_path):
    listener = silent_server()
    url = f"postgresql://u@127.0.0.1:{listener.getsockname()[1]}/db"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "mtbert", "studies", "--storage", url],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "MTBERT_STORAGE_TIMEOUT": "3"})
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 20
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "connect timeout 3 s" in lines[0]
    listener.close()


def test_sigterm_while_connecting_ends_the_command_within_15_s(tmp_path):
    listener = silent_server()
    url = f"postgresql://u@127.0.0.1:{listener.getsockname()[1]}/db"
    proc = subprocess.Popen([sys.executable, "-m", "mtbert", "best", "--storage", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)  # connecting by now
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert time.monotonic() - sent < 15
    assert proc.returncode == 130
    listener.close()
