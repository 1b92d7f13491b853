"""Workers that start together on a new, empty storage all open it.

Optuna creates its tables on first use; processes that do so at the same instant on
PostgreSQL collide on the `pg_type` index, on a table or `alembic_version` that another
created a moment before, or on the version row; on SQLite, on the file's lock. These
tests start real processes at once on fresh databases (each dropped afterwards) and
files (slow); the retry's rules and the lock are checked in this process. The PostgreSQL
ones skip, with the connection error, where no server answers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy

import mtbert.studies.storage as storage
from conftest import POSTGRES_URL, new_database, postgres_unreachable
from mtbert.errors import ConfigError
from mtbert.studies.storage import StorageError, open_storage, with_driver

PG = POSTGRES_URL
ROOT = Path(__file__).resolve().parents[1]
# `mtbert studies` on an empty storage: the table's header, no study.
HEADER = ("study                    trials complete pruned fail retried running     hours    "
          "budget  size   best")


needs_postgres = pytest.mark.skipif(postgres_unreachable() is not None,
                                    reason=str(postgres_unreachable()))


def _env() -> dict[str, str]:
    # The processes import this checkout's mtbert, one thread each (2-core machine).
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def fresh_database():
    """The URL of a new, empty PostgreSQL database, dropped afterwards."""
    with new_database("mtbert_race", PG) as url:
        yield url


def _start_together(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Popen every command, then wait for all of them."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(), cwd=ROOT) for cmd in commands]
    results = []
    for proc, cmd in zip(procs, commands):
        out, err = proc.communicate(timeout=180)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


# Imports first, then every process waits for the same instant before it opens the
# storage, so that the schema creation of all of them overlaps (imports take seconds).
# With "unlocked", PostgreSQL's advisory lock is left out: the retry alone must win.
CREATE_STUDY = """
import contextlib, sys, time
import optuna
import mtbert.studies.storage
from mtbert.studies.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, start, lock = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if lock == "unlocked":
    mtbert.studies.storage.setup_lock = lambda url, doing: contextlib.nullcontext()
time.sleep(max(0.0, start - time.time()))
rdb = open_storage(url, heartbeat=10)
study = optuna.create_study(study_name="race", storage=rdb, load_if_exists=True)
print(study.study_name, len(optuna.study.get_all_study_names(rdb)))
"""


def _create_study_together(url: str, n: int, lock: str = "locked"
                           ) -> list[subprocess.CompletedProcess]:
    start = time.time() + 4.0 + 0.5 * n  # after every process has imported optuna
    return _start_together([[sys.executable, "-c", CREATE_STUDY, url, str(start), lock]
                            for _ in range(n)])


@pytest.mark.slow
@needs_postgres
@pytest.mark.parametrize("round_", range(3))
def test_five_studies_commands_started_at_once_on_a_new_database_all_list_it(
        round_, fresh_database):
    results = _start_together([[sys.executable, "-m", "mtbert", "studies", "--storage",
                                fresh_database] for _ in range(5)])
    failed = [r.stderr.strip() for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of 5 failed: {failed}"
    assert [r.stdout.splitlines() for r in results] == [[HEADER]] * 5


@pytest.mark.slow
@needs_postgres
@pytest.mark.parametrize("lock", ["locked", "unlocked"])
def test_three_workers_creating_one_study_at_once_on_a_new_database_all_succeed(
        lock, fresh_database):
    results = _create_study_together(fresh_database, 3, lock)
    failed = [r.stderr.strip() for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of 3 failed: {failed}"
    assert [r.stdout.split() for r in results] == [["race", "1"]] * 3


@pytest.mark.slow
def test_four_workers_creating_one_study_at_once_in_a_new_sqlite_file_all_succeed(
        tmp_path):
    url = f"sqlite:///{tmp_path / 'mtbert.db'}"
    results = _create_study_together(url, 4)
    failed = [r.stderr.strip() for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of 4 failed: {failed}"
    assert [r.stdout.split() for r in results] == [["race", "1"]] * 4


@pytest.fixture
def backoffs(monkeypatch) -> list[float]:
    """Every backoff `open_storage` sleeps (it still sleeps them)."""
    slept: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        real(seconds)

    monkeypatch.setattr(storage.time, "sleep", sleep)
    return slept


@needs_postgres
@pytest.mark.parametrize("change, says", [
    (dict(database="mtbert_race_absent"), 'database "mtbert_race_absent" does not exist'),
    (dict(username="mtbert_race_nobody", password="s3cret"),
     'role "mtbert_race_nobody" does not exist'),
    (dict(port=1, password="s3cret"), "port 1 failed"),
])
def test_an_error_that_is_not_the_race_fails_at_once_with_one_line(change, says, backoffs):
    url = sqlalchemy.make_url(PG).set(**change).render_as_string(hide_password=False)
    began = time.monotonic()
    with pytest.raises(StorageError) as caught:
        open_storage(url)
    elapsed = time.monotonic() - began
    message = str(caught.value)
    assert message.startswith(f"cannot reach the study storage {storage.mask_url(url)}: ")
    assert says in message and "\n" not in message and "s3cret" not in message
    assert backoffs == []
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_a_bad_url_is_still_a_config_error(backoffs):
    with pytest.raises(ConfigError, match="bad storage URL nosuchdb://u:\\*\\*\\*@h/db"):
        open_storage("nosuchdb://u:s3cret@h/db")
    assert backoffs == []


@pytest.mark.parametrize("error, race", [
    (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception(
        'duplicate key value violates unique constraint "pg_type_typname_nsp_index"')), True),
    (sqlalchemy.exc.IntegrityError("INSERT", {}, Exception(
        'duplicate key value violates unique constraint "version_info_pkey"')), True),
    (sqlalchemy.exc.ProgrammingError("CREATE TABLE", {}, Exception(
        'relation "studies" already exists')), True),
    (sqlalchemy.exc.ProgrammingError("CREATE TABLE", {}, Exception(
        'relation "alembic_version" already exists')), True),
    (sqlalchemy.exc.OperationalError("CREATE TABLE", {}, Exception(
        "table studies already exists")), True),
    (sqlalchemy.exc.OperationalError("BEGIN", {}, Exception("database is locked")), True),
    (sqlalchemy.exc.OperationalError("connect", {}, Exception(
        'FATAL:  database "x" does not exist')), False),
    (sqlalchemy.exc.OperationalError("connect", {}, Exception(
        'FATAL:  password authentication failed for user "u"')), False),
    (sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception(
        'permission denied for schema public')), False),
    (ImportError("no module named psycopg2"), False),
])
def test_only_the_schema_race_is_retried(error, race):
    assert storage.is_schema_race(error) is race


def _advisory_locks(conn) -> int:
    return conn.execute(sqlalchemy.text(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND "
        "database = (SELECT oid FROM pg_database WHERE datname = current_database())")).scalar()


@needs_postgres
def test_the_schema_lock_is_released_and_a_held_one_is_waited_for_then_named(
        fresh_database, monkeypatch):
    holder = sqlalchemy.create_engine(with_driver(fresh_database), isolation_level="AUTOCOMMIT",
                                      poolclass=sqlalchemy.pool.NullPool)
    try:
        with holder.connect() as conn:
            open_storage(fresh_database)
            assert _advisory_locks(conn) == 0
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                         {"key": storage.SCHEMA_LOCK_KEY})
            monkeypatch.setattr(storage, "SCHEMA_LOCK_WAIT_S", 1)
            with pytest.raises(StorageError, match="waited 1 s for another worker creating "
                                                   "its tables"):
                open_storage(fresh_database)
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                         {"key": storage.SCHEMA_LOCK_KEY})
            open_storage(fresh_database)
            assert _advisory_locks(conn) == 0
    finally:
        holder.dispose()


# Each process takes queued trials until none is left, as a worker's Optuna does, and
# prints the numbers it took. Started at one instant, so that their takes overlap.
TAKE_QUEUED = """
import sys, time
import optuna
from mtbert.studies.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, start = sys.argv[1], float(sys.argv[2])
study = optuna.load_study(study_name="queue", storage=open_storage(url))
time.sleep(max(0.0, start - time.time()))
taken = []
while (trial_id := study._pop_waiting_trial_id()) is not None:
    taken.append(trial_id)
print(*taken)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_four_workers_taking_queued_trials_at_once_never_take_one_twice(
        backend, tmp_path, request):
    # On SQLite two processes took one trial several times in 200 before the storage
    # began its transactions with the write lock (optuna#4002).
    if backend == "postgresql":
        if postgres_unreachable() is not None:
            pytest.skip(str(postgres_unreachable()))
        url = request.getfixturevalue("fresh_database")
    else:
        url = f"sqlite:///{tmp_path / 'mtbert.db'}"
    import optuna

    study = optuna.create_study(study_name="queue", storage=open_storage(url))
    for x in range(120):
        study.enqueue_trial({"x": x})
    start = time.time() + 5.0
    results = _start_together([[sys.executable, "-c", TAKE_QUEUED, url, str(start)]
                               for _ in range(4)])
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    taken = [int(t) for r in results for t in r.stdout.split()]
    assert len(taken) == 120 and len(set(taken)) == 120


# A worker's start: create or load the study and queue the spec's `enqueue:` items.
# Optuna checks that a configuration is absent, then adds it; the pause between the two
# (real ones are milliseconds) lets every worker's check come before any add.
START_SWEEP = """
import sys, time
import optuna
from mtbert.studies.runner import SweepOptions, create_study
from mtbert.studies.spec import load_spec
check = optuna.study.Study._should_skip_enqueue
def slow_check(self, params):
    found = check(self, params)
    time.sleep(0.3)
    return found
optuna.study.Study._should_skip_enqueue = slow_check
spec_path, out, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
spec = load_spec(spec_path)
time.sleep(max(0.0, start - time.time()))
create_study(spec, SweepOptions(trials=1, out=out, device="cpu"))
"""


@pytest.mark.slow
def test_workers_started_together_queue_the_specs_configurations_once(tmp_path):
    import optuna

    spec = tmp_path / "queue.yaml"
    spec.write_text("name: queue\nspace:\n  train.lr: {type: float, low: 1.0e-6, high: 1.0e-4, "
                    "log: true}\nenqueue:\n" + "".join(f"  - {{train.lr: {k}.0e-5}}\n"
                                                       for k in range(1, 7)))
    out = tmp_path / "runs"
    out.mkdir()
    start = time.time() + 6.0
    results = _start_together([[sys.executable, "-c", START_SWEEP, str(spec), str(out),
                                str(start)] for _ in range(3)])
    assert [r.returncode for r in results] == [0] * 3, [r.stderr for r in results]
    study = optuna.load_study(study_name="queue", storage=f"sqlite:///{out / 'mtbert.db'}")
    queued = sorted(t.system_attrs["fixed_params"]["train.lr"] for t in study.trials)
    assert queued == pytest.approx([k * 1e-5 for k in range(1, 7)])


@pytest.mark.slow
def test_trial_threads_of_one_worker_never_take_a_queued_trial_twice(tmp_path):
    # `--trials-per-gpu`: Optuna's threads take queued trials from one study object, each
    # on its own pooled connection; through a plain SQLite URL 4 threads took 35 of 300
    # queued trials twice.
    import threading

    import optuna

    study = optuna.create_study(study_name="queue",
                                storage=open_storage(f"sqlite:///{tmp_path / 'mtbert.db'}"))
    for x in range(120):
        study.enqueue_trial({"x": x})
    taken: list[int] = []

    def take_all() -> None:
        while (trial_id := study._pop_waiting_trial_id()) is not None:
            taken.append(trial_id)

    threads = [threading.Thread(target=take_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 120 and len(set(taken)) == 120
