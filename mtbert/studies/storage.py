"""Study storage: the Optuna RDB storage every worker of a study shares.

A URL names it (SQLite by default, `<out>/mtbert.db`; PostgreSQL for many
workers). This module turns a URL into a working storage (the driver mtbert
installs, heartbeats, one retry of a dead worker's trial), lets any number of
workers create a new storage's tables at the same instant, lets workers share
one SQLite file without two of them taking the same queued trial, queues a
configuration once however many workers start together, opens the study a
command names, masks every credential before a URL is shown or written, and
says which study names may become directory names.
"""

from __future__ import annotations

import importlib.util
import random
import re
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import first_line, mask_url
from mtbert.studies.outage import (CONNECT_TIMEOUT_ENV, connect_args, connect_timeout,
                                   is_outage)

STORAGE_FILE = "mtbert.db"
# Study names become directory names (<out>/<study>/trial-NNNN): letters, digits, '.', '_'
# and '-', starting with a letter or digit, so that no name is absolute, '..' or hidden.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Optuna creates its tables on first use; workers started together on a new database
# (docker/compose.yaml starts two) would all create them at once, and each queues the
# spec's `enqueue:` configurations. They take turns (`setup_lock`): on PostgreSQL under
# this session advisory lock (the key spells "mtbert"; every database has its own advisory
# locks), on SQLite under a file lock beside the database; on every backend the losers of
# the schema race retry a few times.
SCHEMA_LOCK_KEY = int.from_bytes(b"mtbert", "big")
SCHEMA_LOCK_WAIT_S = 120
SQLITE_LOCK_SUFFIX = ".lock"
SCHEMA_RETRY_FIRST_S = 0.2
SCHEMA_RETRY_TOTAL_S = 30.0
# What a lost race says, besides an IntegrityError (the pg_type row of a table, the version
# row or alembic's revision inserted twice): a table created a moment before by another
# worker, or SQLite's lock on a file another process is creating.
_RACE_WORDS = ("already exists", "duplicate", "locked")


class StorageError(MtbertError):
    """The study storage cannot be reached."""

    exit_code = 1


def check_study_name(name: str) -> str:
    """`name` if it may become a directory name; else one line naming the valid set."""
    if not STUDY_NAME.fullmatch(name):
        raise ConfigError(f"bad study name {name!r}: use letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit, at most 128 characters")
    return name


def with_driver(url: str) -> str:
    """`postgresql://` through psycopg2 (a core dependency) when psycopg 3 is absent.

    SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; users write the
    bare form, and it must work with the driver mtbert installs.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme in ("postgresql", "postgres") and \
            importlib.util.find_spec("psycopg") is None:
        return f"postgresql+psycopg2://{rest}"
    return url


def default_storage(out: Path) -> str:
    return f"sqlite:///{(Path(out) / STORAGE_FILE).resolve()}"


def storage_url(storage: str | None, out: Path) -> str:
    """--storage, else the SQLite file of --out."""
    return storage or default_storage(out)


def _check_url(url: str) -> None:
    """A URL SQLAlchemy cannot parse (no scheme, a port that is no number) is bad input."""
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    example = "e.g. sqlite:///runs/mtbert.db or postgresql://user:password@host:5432/db"
    try:
        make_url(url).port  # noqa: B018 - reading the port parses it
    except ValueError:
        raise ConfigError(f"bad storage URL {mask_url(url)}: its port is not a number; "
                          f"{example}") from None
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"bad storage URL {mask_url(url)}; {example}") from None


def open_storage(url: str, *, heartbeat: int | None = None, grace: int | None = None,
                 max_retries: int = 2, must_exist: bool = False, checked: bool = False):
    """Optuna's RDB storage for `url`; with `heartbeat`, a trial whose worker died is
    queued again (at most `max_retries` times; the worker that takes it resumes it).
    `checked`: the tables exist and their schema was checked (by the worker that started
    this trial process): neither is done again, which saves a trial process about 0.4 s.

    Workers that open a new storage together take turns creating its tables
    (`setup_lock`); one that still loses that race retries with a growing pause for up to
    SCHEMA_RETRY_TOTAL_S. Any other error fails at once, as one line with the URL masked.
    On SQLite every transaction takes the write lock when it begins (`_serialize`).
    """
    import optuna
    import sqlalchemy.exc

    # Heartbeats are "experimental" in Optuna since v2.9; mtbert relies on them on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _check_url(url)
    if must_exist and url.startswith("sqlite:///"):
        path = Path(url[10:])
        if not path.exists():
            raise ConfigError(f"no study storage at {path}; run `mtbert sweep` first or pass "
                              "--storage / --out")
        if path.is_file() and path.stat().st_size == 0:  # never re-created by a reader
            raise ConfigError(f"the study storage {path} is empty (0 bytes): its studies are "
                              "gone; restore it from a copy, or start over with `mtbert sweep`")
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=grace or 3 * heartbeat,
                      heartbeat_stale_trial_callback=(
                          optuna.storages.RetryHeartbeatStaleTrialCallback(
                              max_retry=max_retries)))
    # Workers on one machine wait for SQLite's lock instead of failing at once; a
    # server's connections are bounded (connect, statements, keepalives).
    engine: dict[str, Any] = {"connect_args": connect_args(url)}
    if not url.startswith("sqlite"):
        engine["pool_pre_ping"] = True
    if checked:
        return _serialize(optuna.storages.RDBStorage(
            with_driver(url), engine_kwargs=engine, skip_compatibility_check=True,
            skip_table_creation=True, **kwargs))
    deadline = time.monotonic() + SCHEMA_RETRY_TOTAL_S
    delay = SCHEMA_RETRY_FIRST_S
    while True:
        try:
            with setup_lock(url, "creating its tables"):
                return _serialize(optuna.storages.RDBStorage(with_driver(url),
                                                             engine_kwargs=engine, **kwargs))
        except sqlalchemy.exc.ArgumentError:
            raise ConfigError(f"bad storage URL {mask_url(url)}; e.g. sqlite:///runs/mtbert.db "
                              "or postgresql://user:password@host:5432/db") from None
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as err:
            # Jitter: workers that lost together should not collide again together.
            pause = delay * random.uniform(0.5, 1.0)
            if not is_schema_race(err) or time.monotonic() + pause > deadline:
                bound = (f" (connect timeout {connect_timeout():g} s: --storage-timeout or "
                         f"${CONNECT_TIMEOUT_ENV})" if is_outage(err) else "")
                raise StorageError(f"cannot reach the study storage {mask_url(url)}: "
                                   f"{mask_url(first_line(err))}{bound}") from None
        time.sleep(pause)
        delay *= 2


def is_schema_race(err: BaseException) -> bool:
    """Whether `err` is another worker creating the same tables at the same moment."""
    import sqlalchemy.exc

    if isinstance(err, sqlalchemy.exc.IntegrityError):
        return True
    if isinstance(err, (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError)):
        # The driver's message only: the SQL statement SQLAlchemy appends may hold any word.
        text = first_line(err.orig if err.orig is not None else err).lower()
        return any(word in text for word in _RACE_WORDS)
    return False


def _serialize(storage):
    """On SQLite, begin every transaction of `storage` with BEGIN IMMEDIATE.

    Optuna takes a queued trial by reading that it is WAITING and then writing RUNNING,
    in one transaction that on PostgreSQL holds the row (SELECT ... FOR UPDATE). SQLite
    ignores FOR UPDATE and Python's driver begins a transaction only at its first write,
    so two worker processes on one file (or two trial threads of one worker, each on its
    own pooled connection) both read WAITING and both run the trial; the second to
    finish then fails on a trial already finished (optuna#4002). A transaction
    that takes the write lock when it begins makes the read and the write one step: the
    other worker waits (the connection's timeout) and then reads RUNNING. The SQLAlchemy
    documentation's recipe for the pysqlite driver, with IMMEDIATE.
    """
    import sqlalchemy

    engine = storage.engine
    if engine.dialect.name != "sqlite":
        return storage

    @sqlalchemy.event.listens_for(engine, "connect")
    def _driver_leaves_transactions_alone(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_with_the_write_lock(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections Optuna opened so far predate the listeners
    return storage


@contextmanager
def setup_lock(url: str, doing: str):
    """Hold the study storage's setup lock: one worker at a time creates its tables or
    queues configurations (`doing` says which, for the message of a lock waited for too
    long). PostgreSQL: mtbert's session advisory lock, on its own short-lived connection,
    so that no transaction of Optuna's ends it early. SQLite: a file lock beside the
    database file. Either is released when its process dies: a killed worker never
    leaves it held. Other storages (SQLite in memory) have one process: no lock."""
    import sqlalchemy

    parsed = sqlalchemy.make_url(with_driver(url))
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = Path(parsed.database or ":memory:")
        if str(database) == ":memory:" or not database.parent.is_dir():
            yield  # a missing folder: SQLite's own error says so
            return
        with _file_lock(database.with_name(database.name + SQLITE_LOCK_SUFFIX), url, doing):
            yield
        return
    if backend != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(with_driver(url), poolclass=sqlalchemy.pool.NullPool,
                                      isolation_level="AUTOCOMMIT",
                                      connect_args=connect_args(url))
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f"SET lock_timeout = '{SCHEMA_LOCK_WAIT_S}s'"))
            try:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"),
                             {"key": SCHEMA_LOCK_KEY})
            except sqlalchemy.exc.OperationalError as err:
                if "lock timeout" not in first_line(err):
                    raise
                raise _waited(url, doing, f"advisory lock {SCHEMA_LOCK_KEY}; see pg_locks") \
                    from None
            try:
                yield
            finally:
                # A connection that broke meanwhile released the lock with its session.
                with suppress(sqlalchemy.exc.DBAPIError):
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"),
                                 {"key": SCHEMA_LOCK_KEY})
    finally:
        engine.dispose()


@contextmanager
def _file_lock(path: Path, url: str, doing: str):
    import filelock

    lock = filelock.FileLock(path, timeout=SCHEMA_LOCK_WAIT_S)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise _waited(url, doing, str(path)) from None
    try:
        yield
    finally:
        lock.release()


def _waited(url: str, doing: str, held: str) -> StorageError:
    return StorageError(f"cannot reach the study storage {mask_url(url)}: waited "
                        f"{SCHEMA_LOCK_WAIT_S} s for another worker {doing} (it holds "
                        f"{held})")


def enqueue_once(study, url: str, params: dict[str, Any]) -> bool:
    """Queue `params` as a trial of `study` unless the study holds that configuration
    (queued, running or finished; Optuna's `skip_if_exists`); whether it was queued.
    Under the setup lock: workers started together queue it once between them."""
    with setup_lock(url, f"queuing configurations of study {study.study_name}"):
        count = len(study.get_trials(deepcopy=False))
        study.enqueue_trial(params, skip_if_exists=True)
        return len(study.get_trials(deepcopy=False)) > count


@contextmanager
def storage_errors(url: str):
    """A storage that fails while a study runs: one line, the URL masked."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as err:
        raise StorageError(f"the study storage {mask_url(url)} failed: "
                           f"{mask_url(first_line(err))}") from None


def select_study(storage, study: str | None) -> str:
    """`study`, else the storage's only study; several -> exit 2 listing them."""
    import optuna

    names = optuna.study.get_all_study_names(storage)
    if study is not None:
        if study not in names:
            raise ConfigError(f"no study '{study}' in this storage; studies: "
                              f"{', '.join(names) or 'none'}")
        return study
    if len(names) == 1:
        return names[0]
    if not names:
        raise ConfigError("this storage holds no study yet; run `mtbert sweep` first")
    raise ConfigError(f"this storage holds {len(names)} studies, pick one with --study: "
                      f"{', '.join(names)}")


def open_study(storage: str | None, out: Path, study: str | None, **load: Any):
    """The existing study a command names (`load` goes to `optuna.load_study`, e.g. a
    sampler); returns the study and its storage URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage, out)
    rdb = open_storage(url, must_exist=True)
    with storage_errors(url):
        name = select_study(rdb, study)
        return optuna.load_study(study_name=name, storage=rdb, **load), url
