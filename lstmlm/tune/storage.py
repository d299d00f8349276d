"""Where a study lives: Optuna's RDB storage (SQLite by default, any SQLAlchemy URL), opened so
that processes share it safely, with the database's errors and a URL's secrets kept out of the
one line a user sees; the heartbeat that tells the storage a trial still runs; and the one
place Optuna's warnings are quieted."""

from __future__ import annotations

import contextlib
import math
import os
import re
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from typing import Any

import optuna

from ..errors import TuneError

HEARTBEAT_S, GRACE_S = 60, 600  # a running trial's heartbeat; a trial silent this long is failed


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Optuna's warnings about what lstmlm chose knowingly: features it calls experimental
    (multivariate TPE, the constant liar, the heartbeat's arguments), and a heartbeat used
    outside `study.optimize` (tune beats it itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at `url`, or a TuneError in one line. SQLite waits for another
    process's write (its lock) instead of failing at once; other databases check a pooled
    connection before using it, since a trial can leave one idle for longer than a server keeps it.
    A SQLite database in memory is refused (the study would end with this process, unseen by any
    other), and so is a SQLite file of another program (Optuna would add its tables to it)."""
    shown = hide_password(url)
    check_sqlite(url, shown)
    engine: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        with quiet():
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S)
    except Exception as e:  # SQLAlchemy's and the drivers' errors: a bad URL, a missing driver, no server, no such file
        raise TuneError(f"cannot open the study storage {shown}: {reason(e).replace(url, shown)}") from None


def check_sqlite(url: str, shown: str) -> None:
    """Refuse a SQLite URL whose database is in memory, or a file that holds tables, none of them
    Optuna's (its `version_info`): another program's database. Other URLs pass unchecked."""
    database = _sqlite_database(url)
    if database is None:
        return
    if database == "":
        raise TuneError(
            f"the study storage {shown} is a database in memory: the study would end with this process and no other could join it; "
            "give a file (sqlite:///tune.db), or no --storage for RUNS_DIR/tune-STUDY.db"
        )
    tables = _sqlite_tables(database)
    if tables and "version_info" not in tables:
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TuneError(f"the study storage {shown} is a database of another program (its tables: {listed}): give lstmlm tune a --storage of its own")


def _sqlite_database(url: str) -> str | None:
    """The file a SQLite URL names; "" for a database in memory; None for any other URL."""
    from sqlalchemy.engine import make_url  # Optuna's own dependency

    try:
        parsed = make_url(url)
    except Exception:  # not a URL: opening it says so
        return None
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    return "" if database == ":memory:" or parsed.query.get("mode") == "memory" else database


def _sqlite_tables(path: str) -> set[str]:
    """The tables of an existing SQLite file (none for a missing file, or one that is not SQLite:
    opening it reports that)."""
    if not os.path.isfile(path):
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True)) as db:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return set()


# A URL's query string may carry a password too (?password=, &sslpassword=, &token=, ...).
_SECRET_PARAMETER = re.compile(r"([?&][^=&#]*(?:pass|pwd|secret|token|key)[^=&#]*=)[^&#]*", re.IGNORECASE)


def hide_password(url: str) -> str:
    """`url` with the password of user:password@, and any query parameter named like a secret,
    shown as ***."""
    return _SECRET_PARAMETER.sub(r"\1***", re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url))


def reason(e: BaseException) -> str:
    """SQLAlchemy's message in one line, without its statement and its link to the docs; the
    cause's, where Optuna wrapped it in its own ("An exception is raised during the commit")."""
    e = e.__cause__ or e
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    first = re.sub(r"\s*\(Background on this error at: [^)]*\)", "", first)
    return re.sub(r"^\([\w.]+\)\s*", "", first)[:300] or type(e).__name__


def holds_study(storage: Any, name: str, shown: str) -> bool:
    """Whether the storage holds the study: the first read of its tables, where a database of
    another schema fails (Optuna then says only that a commit failed: its cause says why)."""
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    except Exception as e:
        raise TuneError(f"cannot read the studies in {shown}: {reason(e)}; is it a storage of lstmlm tune? give it a --storage of its own") from None
    return True


class Heartbeat:
    """Tells the storage, at most every HEARTBEAT_S, that the trial still runs (called on every
    event of its training: a step takes far less than GRACE_S)."""

    def __init__(self, storage: Any, study: str, number: int) -> None:
        self.storage = storage
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study), number)
        self.last = -math.inf

    def __call__(self) -> None:
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_S:
            self.storage.record_heartbeat(self.trial_id)
            self.last = now
