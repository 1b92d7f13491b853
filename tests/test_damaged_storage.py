"""A study storage that no retry mends: tables of another Optuna version, a damaged
SQLite file, one deleted while a sweep runs, SQLite in memory. Every command says so in
one line with what to do (`mtbert.studies.damage`), never a traceback."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from conftest import one_line_error, use_stub_trials, wait_for
from mtbert.cli import app

runner = CliRunner()
COMMANDS = [["best"], ["studies"], ["report"], ["best", "--top", "2"], ["studies", "--json"],
            ["sweep", "default", "--trials", "1", "--study", "lw"]]


@pytest.fixture
def study_out(tmp_path) -> Path:
    """A study of two finished trials in <out>/mtbert.db, as a sweep leaves it."""
    out = tmp_path / "out"
    out.mkdir()
    study = optuna.create_study(study_name="lw", storage=f"sqlite:///{out / 'mtbert.db'}",
                                direction="maximize")
    for value in (0.4, 0.6):
        study.add_trial(optuna.trial.create_trial(
            value=value, params={"x": value},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    return out


def _set_versions(db: Path, revision: str, library: str | None = None) -> None:
    with sqlite3.connect(db) as con:
        con.execute("UPDATE alembic_version SET version_num = ?", (revision,))
        if library is not None:
            con.execute("UPDATE version_info SET library_version = ?", (library,))


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_tables_of_an_older_optuna_say_how_to_upgrade(study_out, command):
    _set_versions(study_out / "mtbert.db", "v3.0.0.a", "3.0.0")
    line = one_line_error(runner.invoke(app, [*command, "--out", str(study_out)]), 1)
    url = f"sqlite:///{(study_out / 'mtbert.db').resolve()}"
    assert "an older Optuna (schema v3.0.0.a, made by Optuna 3.0.0)" in line
    assert f"`optuna storage upgrade --storage {url}`" in line


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_tables_of_a_newer_optuna_name_the_version_needed(study_out, command):
    _set_versions(study_out / "mtbert.db", "v99.1.0.a", "99.1.2")
    line = one_line_error(runner.invoke(app, [*command, "--out", str(study_out)]), 1)
    assert "written by a newer Optuna (schema v99.1.0.a, Optuna 99.1.2)" in line
    assert "install Optuna 99.1.0 or newer (`pip install 'optuna>=99.1.0'`)" in line


@pytest.mark.parametrize("revision", ["not-a-revision", "v1.0.0.a", ""])
def test_tables_of_an_unknown_schema_are_named_damaged(study_out, revision):
    _set_versions(study_out / "mtbert.db", revision)
    for command in (["best"], ["studies"], ["report"]):
        line = one_line_error(runner.invoke(app, [*command, "--out", str(study_out)]), 1)
        assert f"unknown schema version {revision!r}" in line
        assert "damaged or not an Optuna storage" in line


def _garbage(db: Path, start: int, length: int | None = None) -> None:
    data = bytearray(db.read_bytes())
    end = len(data) if length is None else start + length
    data[start:end] = os.urandom(end - start)
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["after the header page", "the header"])
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_damaged_sqlite_file_is_named_as_such(study_out, command, where):
    db = study_out / "mtbert.db"
    before = db.stat().st_size
    _garbage(db, 4096) if where == "after the header page" else _garbage(db, 0, 100)
    line = one_line_error(runner.invoke(app, [*command, "--out", str(study_out)]), 1)
    assert f"the study storage {db.resolve()} is a damaged SQLite file (" in line
    assert "restore it from a copy" in line
    assert db.stat().st_size == before  # nothing written over what is left


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite+pysqlite://"])
@pytest.mark.parametrize("command", [["sweep", "default", "--trials", "1"], ["best"],
                                     ["studies"], ["report"]], ids=" ".join)
def test_sqlite_in_memory_is_refused(url, command, tmp_path):
    result = runner.invoke(app, [*command, "--storage", url, "--out", str(tmp_path / "o")])
    line = one_line_error(result, 2)
    assert "is SQLite in memory" in line and "use a file, e.g. sqlite:///" in line


def test_a_worker_whose_sqlite_file_is_gone_stops_at_once_instead_of_waiting(tmp_path):
    """SQLite says "attempt to write a readonly database" once its file is unlinked: an
    outage to the retry policy, unless the file is gone."""
    import sqlalchemy.exc

    from mtbert.studies.outage import Outage

    gone = tmp_path / "mtbert.db"
    calls = []

    def write():
        calls.append(1)
        raise sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(
            "attempt to write a readonly database"))

    started = time.monotonic()
    with pytest.raises(sqlalchemy.exc.OperationalError):
        Outage(f"sqlite:///{gone}", limit=30).call(write)
    assert len(calls) == 1 and time.monotonic() - started < 5


@pytest.mark.slow
@pytest.mark.parametrize("when", ["as the sweep starts", "while a trial runs"])
def test_a_sqlite_file_deleted_mid_sweep_is_one_line_at_once(tmp_path, monkeypatch, when):
    use_stub_trials(monkeypatch, epoch_s=1.0)
    (tmp_path / "s.yaml").write_text(
        "space:\n  train.lr: {type: float, low: 1.0e-5, high: 1.0e-4}\n")
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "mtbert", "-q", "sweep",
                             str(tmp_path / "s.yaml"), "--trials", "3", "--out", str(out),
                             "--wandb-mode", "disabled", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    db = out / "mtbert.db"
    ready = (lambda: db.exists()) if when == "as the sweep starts" else \
        (lambda: (out / "s" / "trial-0000" / "trial.log").exists())
    wait_for(ready, timeout=120, what=when)
    db.unlink()
    deleted = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr
    assert time.monotonic() - deleted < 30  # not the 60 s an outage is waited for
    errors = [ln for ln in stderr.splitlines() if ln.startswith("mtbert: error:")]
    assert errors == [f"mtbert: error: the study storage {db.resolve()} was deleted while "
                      "this command ran: its studies are gone (the run directories stay); "
                      "restore it from a copy, or start over with `mtbert sweep`"], stderr
    assert "Traceback" not in stderr
    assert not db.exists()  # not re-created empty behind the user's back


@pytest.mark.slow
def test_damage_anywhere_in_the_file_is_no_traceback(study_out):
    """Garbage over each page in turn: a command reads the study (a page it never needs)
    or says the file is damaged; never a traceback."""
    db = study_out / "mtbert.db"
    pristine = db.read_bytes()
    damaged = 0
    for page in range(1, len(pristine) // 4096):
        db.write_bytes(pristine)
        _garbage(db, page * 4096, 4096)
        for command in (["best"], ["studies"], ["report", "--to", str(study_out / f"r{page}")]):
            result = runner.invoke(app, [*command, "--out", str(study_out)])
            if result.exit_code == 0:
                continue
            damaged += 1
            assert "is a damaged SQLite file" in one_line_error(result, 1), page
    assert damaged > 0


def test_a_file_deleted_while_its_tables_were_made_is_named_deleted(tmp_path):
    """Deleted between two of Optuna's setup connections, the file comes back empty from
    the next one (no listener refuses it yet): that empty file goes, the line says
    deleted; a file that holds anything is never removed."""
    from mtbert.studies.storage import _deleted_while_made

    empty = tmp_path / "mtbert.db"
    empty.write_bytes(b"")
    missing = Exception("(sqlite3.OperationalError) no such table: version_info")
    assert _deleted_while_made(missing, f"sqlite:///{empty}") and not empty.exists()
    kept = tmp_path / "kept.db"
    kept.write_bytes(b"SQLite format 3\0" + b"\0" * 100)
    assert not _deleted_while_made(missing, f"sqlite:///{kept}") and kept.exists()
    empty.write_bytes(b"")
    assert not _deleted_while_made(Exception("database is locked"), f"sqlite:///{empty}")
    assert empty.exists()
