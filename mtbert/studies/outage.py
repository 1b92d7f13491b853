"""Riding out a study storage that goes away: a database restarted, a network blip.

Every storage call of a worker goes through `Outage.call`: an error that says the
database cannot be reached (a dropped or refused connection) is retried, with a
growing pause, for up to `limit` seconds from the first failure, said once on stderr
when the storage goes away and once when it is back. Past the limit the worker ends
with one line (`StorageOutage`, exit 1); its running trial stays RUNNING, its
heartbeat stops, and the next worker fails it and queues its retry, which resumes
from the trial's run directory.

Connections are bounded too (`connect_args`): a connect timeout (a server that
accepts TCP and never answers), a statement timeout and TCP keepalives on
PostgreSQL, a lock wait on SQLite. A URL's driver (`with_driver`) and its SQLite
file (`sqlite_file`) are read here too. A SQLite file deleted under a running
worker is no outage: no wait brings it back (`studies.damage` says so).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mtbert.errors import MtbertError
from mtbert.formatting import first_line, mask_url

log = logging.getLogger("mtbert")

# How long a connection may take unless --storage-timeout or $MTBERT_STORAGE_TIMEOUT
# says otherwise; a signal waits for a connection (SIGTERM ends a command within 15 s),
# so it stays under that. (How long an outage is ridden out: SweepOptions.)
CONNECT_TIMEOUT_S = 10.0
OUTAGE_ENV = "MTBERT_STORAGE_OUTAGE"
CONNECT_TIMEOUT_ENV = "MTBERT_STORAGE_TIMEOUT"
STATEMENT_TIMEOUT_S = 120  # one statement of Optuna's; a hung one is an outage
FIRST_PAUSE_S, LONGEST_PAUSE_S = 0.5, 5.0


class StorageOutage(MtbertError):
    """The study storage stayed unreachable past the outage limit."""

    exit_code = 1


def is_outage(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says the database cannot be
    reached, as opposed to a bad request, which retrying would not mend."""
    return _outage_cause(err) is not None


def _outage_cause(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s chain that says the database cannot be reached (Optuna
    wraps the driver's in a StorageInternalError of its own words)."""
    import sqlalchemy.exc

    for _ in range(10):
        if err is None:
            return None
        if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError,
                            sqlalchemy.exc.DisconnectionError, ConnectionError,
                            TimeoutError)):
            return err
        if isinstance(err, sqlalchemy.exc.DBAPIError) and err.connection_invalidated:
            return err
        err = err.__cause__ or err.__context__
    return None


def _said(err: BaseException) -> str:
    cause = _outage_cause(err) or err
    return mask_url(first_line(getattr(cause, "orig", None) or cause))


class Outage:
    """The retry policy of one worker's storage calls (every thread of the worker)."""

    def __init__(self, url: str, limit: float):
        self.url, self.limit = url, limit
        self._lock = threading.Lock()
        self._down_since: float | None = None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        pause, deadline = FIRST_PAUSE_S, None
        while True:
            try:
                result = fn(*args, **kwargs)
            except Exception as err:
                if not is_outage(err) or self._file_gone():
                    raise
                deadline = deadline or self._went_away(err)
                now = time.monotonic()
                if now >= deadline:
                    raise StorageOutage(
                        f"the study storage {mask_url(self.url)} stayed unreachable for "
                        f"{self.limit:g} s ({_said(err)}); this worker's "
                        "running trials are failed and queued again by the next worker "
                        f"(their heartbeats stop); raise the wait with --storage-outage or "
                        f"${OUTAGE_ENV}") from None
                time.sleep(min(pause, deadline - now))
                pause = min(pause * 2, LONGEST_PAUSE_S)
            else:
                if deadline is not None:
                    self._came_back()
                return result

    def _file_gone(self) -> bool:
        path = sqlite_file(self.url)
        return path is not None and not path.exists()

    def _went_away(self, err: BaseException) -> float:
        """The deadline of this call; said once per outage, whichever thread sees it."""
        with self._lock:
            if self._down_since is None:
                self._down_since = time.monotonic()
                log.warning("the study storage %s is unreachable (%s); retrying for up to "
                            "%g s", mask_url(self.url), _said(err), self.limit)
        return time.monotonic() + self.limit

    def _came_back(self) -> None:
        with self._lock:
            if self._down_since is not None:
                log.warning("the study storage is back after %.0f s",
                            time.monotonic() - self._down_since)
                self._down_since = None


def connect_timeout() -> float:
    """Seconds a connection may take: $MTBERT_STORAGE_TIMEOUT (which `mtbert sweep
    --storage-timeout` sets for itself and its trial processes), else the default."""
    return float(os.environ.get(CONNECT_TIMEOUT_ENV) or CONNECT_TIMEOUT_S)


def connect_args(url: str) -> dict[str, Any]:
    """The driver's bounds on a connection to `url`: nothing waits forever."""
    timeout = connect_timeout()
    if url.startswith("sqlite"):
        return {"timeout": 60}  # the wait for another worker's write lock
    if url.startswith(("postgresql", "postgres")):
        return {"connect_timeout": max(1, round(timeout)),
                "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                "keepalives_count": 3,
                "options": f"-c statement_timeout={STATEMENT_TIMEOUT_S * 1000}"}
    if url.startswith("mysql"):
        return {"connect_timeout": max(1, round(timeout))}
    return {}


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


def sqlite_file(url: str) -> Path | None:
    """The file of a `sqlite:///PATH` URL (any driver); None for another database or
    SQLite in memory."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.split("+")[0] != "sqlite":
        return None
    path = rest[1:].split("?")[0] if rest.startswith("/") else ""
    return Path(path) if path and path != ":memory:" else None


def in_memory(url: str) -> bool:
    """Whether `url` is SQLite in memory (`sqlite://`, `sqlite:///:memory:`)."""
    scheme = url.partition("://")[0]
    return scheme.split("+")[0] == "sqlite" and sqlite_file(url) is None
