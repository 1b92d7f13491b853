"""Study storage: the Optuna RDB storage every worker of a study shares.

A URL names it (SQLite by default, `<out>/mtbert.db`; PostgreSQL for many
workers). This module turns a URL into a working storage (the driver mtbert
installs, heartbeats, one retry of a dead worker's trial), opens the study a
command names, masks every credential before a URL is shown or written, and
says which study names may become directory names.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mtbert.errors import ConfigError, MtbertError
from mtbert.formatting import first_line, mask_url

STORAGE_FILE = "mtbert.db"
# Study names become directory names (<out>/<study>/trial-NNNN): letters, digits, '.', '_'
# and '-', starting with a letter or digit, so that no name is absolute, '..' or hidden.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


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
                 max_retries: int = 2, must_exist: bool = False):
    """Optuna's RDB storage for `url`; with `heartbeat`, a trial whose worker died is
    queued again (at most `max_retries` times; the worker that takes it resumes it)."""
    import optuna
    import sqlalchemy.exc

    # Heartbeats are "experimental" in Optuna since v2.9; mtbert relies on them on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    _check_url(url)
    if must_exist and url.startswith("sqlite:///") and not Path(url[10:]).exists():
        raise ConfigError(f"no study storage at {url[10:]}; run `mtbert sweep` first or pass "
                          "--storage / --out")
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=heartbeat, grace_period=grace or 3 * heartbeat,
                      heartbeat_stale_trial_callback=(
                          optuna.storages.RetryHeartbeatStaleTrialCallback(
                              max_retry=max_retries)))
    engine: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Workers on one machine wait for SQLite's lock instead of failing at once.
        engine = {"connect_args": {"timeout": 60}}
    try:
        return optuna.storages.RDBStorage(with_driver(url), engine_kwargs=engine, **kwargs)
    except sqlalchemy.exc.ArgumentError:
        raise ConfigError(f"bad storage URL {mask_url(url)}; e.g. sqlite:///runs/mtbert.db or "
                          "postgresql://user:password@host:5432/db") from None
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as err:
        raise StorageError(f"cannot reach the study storage {mask_url(url)}: "
                           f"{mask_url(first_line(err))}") from None


@contextmanager
def storage_errors(url: str):
    """A storage that fails while a study runs: one line, the URL masked."""
    import sqlalchemy.exc

    try:
        yield
    except sqlalchemy.exc.SQLAlchemyError as err:
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
