"""A study storage that no retry mends, said in one line with what to do.

Optuna refuses tables of another schema version with a RuntimeError that names
neither the URL nor the version needed; SQLite answers a damaged file with
"database disk image is malformed" deep inside Optuna's StorageInternalError;
a SQLite file deleted while a sweep runs makes every later write fail as
"attempt to write a readonly database", which would otherwise be waited for as
an outage; a writer's lock file on a read-only file system is refused. `explain`
turns each into one line; everything else is left to the
caller (an outage is retried, `studies.outage`).
"""

from __future__ import annotations

import errno
import re
import sqlite3

from mtbert.formatting import first_line, mask_url
from mtbert.studies.outage import connect_args, sqlite_file, with_driver

# Optuna's alembic revisions are named after the release that introduced them (v3.2.0.a).
_REVISION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
_SCHEMA_WORDS = "compatible with the table schema"
_UPGRADE_WORDS = "storage upgrade"
# What SQLite says of a file that is no database, or one whose pages are damaged.
_DAMAGE_WORDS = ("malformed", "not a database", "corrupt")


def explain(err: BaseException, url: str) -> str | None:
    """One line for a storage failure that no retry mends, saying what to do; None when
    `err` is no such failure."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        return (f"the study storage {path} was deleted while this command ran: its studies "
                "are gone (the run directories stay); restore it from a copy, or start over "
                "with `mtbert sweep`")
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return (f"the study storage {mask_url(url)} is on a read-only file system "
                f"({err.filename or err.strerror}): this command writes to it; `best`, "
                "`studies`, `report --to DIR` and `best --export DIR` only read it")
    if isinstance(err, RuntimeError) and _SCHEMA_WORDS in str(err):
        return _schema(err, url)
    damage = _sqlite_damage(err)
    if damage is not None and path is not None:
        return (f"the study storage {path} is a damaged SQLite file ({damage}); restore it "
                f"from a copy (`sqlite3 {path} .recover` may save what is left)")
    return None


def _sqlite_damage(err: BaseException | None) -> str | None:
    """SQLite's words where `err` (or an error it came from) says the file is damaged."""
    for _ in range(10):
        if err is None:
            return None
        cause = getattr(err, "orig", None) or err
        if isinstance(cause, sqlite3.DatabaseError):
            text = first_line(cause)
            if any(word in text.lower() for word in _DAMAGE_WORDS):
                return text
        err = err.__cause__ or err.__context__
    return None


def _schema(err: RuntimeError, url: str) -> str:
    """Tables of another Optuna version: older ones can be upgraded in place, newer ones
    need that Optuna, unknown ones are no Optuna storage (or a damaged one)."""
    from importlib.metadata import version

    shown, ours = mask_url(url), version("optuna")
    revision, made_by = _stored_versions(url)
    if _UPGRADE_WORDS in str(err):  # a revision this Optuna knows: older tables
        return (f"the study storage {shown} has the tables of an older Optuna (schema "
                f"{revision or '?'}, made by Optuna {made_by or '?'}); this is Optuna {ours}: "
                f"back it up, then run `optuna storage upgrade --storage {shown}`")
    found = _REVISION.fullmatch((revision or "").rsplit(".", 1)[0])
    if found and _newer(found.groups(), ours):
        needed = ".".join(found.groups())
        return (f"the study storage {shown} was written by a newer Optuna (schema {revision}"
                f"{f', Optuna {made_by}' if made_by else ''}); this is Optuna {ours}: "
                f"install Optuna {needed} or newer (`pip install 'optuna>={needed}'`), or "
                "use another --storage")
    return (f"the study storage {shown} has tables of an unknown schema version "
            f"{revision!r} that no Optuna release made: it is damaged or not an Optuna "
            "storage; restore it from a copy, or use another --storage")


def _newer(found: tuple[str, ...], ours: str) -> bool:
    mine = tuple(int(p) for p in re.findall(r"\d+", ours)[:3])
    return tuple(int(p) for p in found) > mine


def _stored_versions(url: str) -> tuple[str | None, str | None]:
    """The schema revision and the Optuna version a storage's tables record (None where
    they cannot be read)."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(with_driver(url), poolclass=sqlalchemy.pool.NullPool,
                                          connect_args=connect_args(url))
        with engine.connect() as conn:
            revision = conn.execute(sqlalchemy.text(
                "SELECT version_num FROM alembic_version")).scalar()
            made_by = conn.execute(sqlalchemy.text(
                "SELECT library_version FROM version_info")).scalar()
        engine.dispose()
    except sqlalchemy.exc.SQLAlchemyError:
        return None, None
    return revision, made_by

