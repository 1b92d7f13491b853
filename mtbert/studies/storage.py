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

import random
import re
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import first_line, mask_url
from mtbert.studies.damage import explain
from mtbert.studies.outage import (CONNECT_TIMEOUT_ENV, connect_args, connect_timeout,
                                   in_memory, is_outage, sqlite_file, with_driver)

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
                 max_retries: int = 2, must_exist: bool = False, checked: bool = False,
                 read_only: bool = False):
    """Optuna's RDB storage for `url`; with `heartbeat`, a trial whose worker died is
    queued again (at most `max_retries` times; the worker that takes it resumes it).
    `checked`: the tables exist and their schema was checked (by the worker that started
    this trial process): neither is done again, which saves a trial process about 0.4 s.
    `read_only` (a command that only reads an existing storage: `best`, `studies`,
    `report`): no setup lock and no write lock are taken, so that a study on a read-only
    file system can be read.

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
    if in_memory(url):
        raise ConfigError(f"--storage {mask_url(url)} is SQLite in memory: a study there is "
                          "gone when the command ends and its trial processes cannot reach "
                          "it; use a file, e.g. sqlite:///runs/mtbert.db")
    if (must_exist or read_only) and url.startswith("sqlite:///"):
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
    deadline = time.monotonic() + SCHEMA_RETRY_TOTAL_S
    delay = SCHEMA_RETRY_FIRST_S
    while True:
        try:
            if checked:
                _still_there(url)
                return _serialize(optuna.storages.RDBStorage(
                    with_driver(url), engine_kwargs=engine, skip_compatibility_check=True,
                    skip_table_creation=True, **kwargs))
            if read_only:  # its tables exist: nothing is created, nothing to take turns for
                return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine)
            with setup_lock(url, "creating its tables"):
                return _serialize(optuna.storages.RDBStorage(with_driver(url),
                                                             engine_kwargs=engine, **kwargs))
        except sqlalchemy.exc.ArgumentError:
            raise ConfigError(f"bad storage URL {mask_url(url)}; e.g. sqlite:///runs/mtbert.db "
                              "or postgresql://user:password@host:5432/db") from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError,
                ImportError, OSError, RuntimeError, AssertionError) as err:
            said = explain(err, url) or (_deleted_while_made(err, url) and explain(err, url))
            if said:
                raise StorageError(said) from None
            if isinstance(err, (RuntimeError, AssertionError)):
                raise
            # Jitter: workers that lost together should not collide again together.
            pause = delay * random.uniform(0.5, 1.0)
            if not is_schema_race(err) or time.monotonic() + pause > deadline:
                bound = (f" (connect timeout {connect_timeout():g} s: --storage-timeout or "
                         f"${CONNECT_TIMEOUT_ENV})" if is_outage(err) else "")
                raise StorageError(f"cannot reach the study storage {mask_url(url)}: "
                                   f"{mask_url(_driver_said(err))}{bound}") from None
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
    url = str(engine.url)

    @sqlalchemy.event.listens_for(engine, "do_connect")
    def _never_create_the_file_again(dialect, record, cargs, cparams):
        _still_there(url)  # SQLite would make a new, empty file where it was deleted

    @sqlalchemy.event.listens_for(engine, "connect")
    def _driver_leaves_transactions_alone(dbapi_connection, record):
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_with_the_write_lock(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # the connections Optuna opened so far predate the listeners
    return storage


def _still_there(url: str) -> None:
    """A storage's SQLite file deleted after its tables were made: one line (exit 1)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StorageError(explain(FileNotFoundError(), url))


def _deleted_while_made(err: BaseException, url: str) -> bool:
    """Whether the SQLite file was deleted while its tables were being made: the next
    connection re-created it empty (0 bytes, before the listener of `_serialize` that
    refuses to exists), and Optuna finds no tables there. The empty file is removed,
    so that nothing looks like a study storage that is none."""
    path = sqlite_file(url)
    if path is None or "no such table" not in str(err):
        return False
    try:
        if not path.is_file() or path.stat().st_size != 0:
            return False
        path.unlink()
    except OSError:
        return False
    return True


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
    """A storage that fails while a command uses it: one line, the URL masked, saying what
    to do where a damaged or deleted SQLite file is the cause (`studies.damage`)."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError, AssertionError) as err:
        said = explain(err, url)
        if said is None and isinstance(err, AssertionError):
            raise  # a bug, not the storage
        raise StorageError(said or f"the study storage {mask_url(url)} failed: "
                                   f"{mask_url(_driver_said(err))}") from None


def _driver_said(err: BaseException) -> str:
    """The database's own words where Optuna wrapped them in its generic commit error."""
    cause = err.__cause__ or err.__context__
    orig = getattr(cause, "orig", None)
    return first_line(orig if orig is not None else err)


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


def open_study(storage: str | None, out: Path, study: str | None, *, read_only: bool = False,
               **load: Any):
    """The existing study a command names (`load` goes to `optuna.load_study`, e.g. a
    sampler; `read_only`: `open_storage`'s); returns the study and its storage URL."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(storage, out)
    rdb = open_storage(url, must_exist=True, read_only=read_only)
    with storage_errors(url):
        name = select_study(rdb, study)
        return optuna.load_study(study_name=name, storage=rdb, **load), url
