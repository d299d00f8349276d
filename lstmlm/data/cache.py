"""Where encoded corpora live, and the index that finds them without reading the text.

    $LSTMLM_HOME/encoded/<sha1>-<mode>.tokens           a token store (store.py): vocabulary + ids
    $LSTMLM_HOME/encoded/<sha1>-<mode>-v<vocab>.tokens  the same text under another vocabulary (a resumed run's)
    $LSTMLM_HOME/encoded/index/<signature>.json         a corpus's files as last seen → its content's sha1
    $LSTMLM_HOME/encoded/locks/<signature>.lock         held while that corpus is being encoded

The store is keyed by the content's hash, so an edited corpus is simply a new entry. The index
is keyed by the files' paths, sizes, modification times and inodes (`Selection.signature`), as
git's index is: a second run on an unchanged corpus goes from its files' stat to its store
without reading the text. The cache is only an accelerator: an unreadable entry is rebuilt, and
a cache that cannot be written is worked around (store.py), never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import locked as lock_file
from ..atomic import write_text_atomic
from ..errors import LstmlmError
from ..vocab import Vocab
from .files import Selection, Skipped
from .home import cache_dir

RACY_NS = 2_000_000_000  # a file changed this recently may change again within its timestamp's resolution


def encoded_dir() -> Path:
    return cache_dir() / "encoded"


def store_path(sha1: str, mode: str, vocab: Vocab | None = None) -> Path:
    """The store of a content in a mode; with `vocab`, the store under that vocabulary."""
    suffix = f"-v{hashlib.sha1(vocab.to_json().encode()).hexdigest()[:16]}" if vocab is not None else ""
    return encoded_dir() / f"{sha1}-{mode}{suffix}.tokens"


@dataclass(frozen=True)
class IndexEntry:
    sha1: str  # the content hash of the files read (the skipped ones left out)
    skipped: tuple[Skipped, ...]


def read_index(signature: str) -> IndexEntry | None:
    try:
        raw = json.loads((encoded_dir() / "index" / f"{signature}.json").read_text(encoding="utf-8"))
        skipped = tuple(Skipped(str(p), str(r), int(n)) for p, r, n in raw["skipped"])
        return IndexEntry(str(raw["sha1"]), skipped)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_index(signature: str, selection: Selection, entry: IndexEntry, started_ns: int) -> None:
    """Remember the corpus's content hash for its files as they are, unless a file changed so
    recently (`RACY_NS` before reading began) that a later change could keep its timestamp."""
    if any(f.mtime_ns >= started_ns - RACY_NS for f in selection.files):
        return
    record = {"sha1": entry.sha1, "skipped": [[s.path, s.reason, s.size] for s in entry.skipped], "source": selection.source}
    with contextlib.suppress(OSError, LstmlmError):
        (encoded_dir() / "index").mkdir(parents=True, exist_ok=True)
        write_text_atomic(encoded_dir() / "index" / f"{signature}.json", json.dumps(record), "corpus index")


def locked(signature: str) -> contextlib.AbstractContextManager[bool]:
    """Hold the corpus's lock while it is encoded: a second process (another rank under
    torchrun, another training) waits, then finds the store (atomic.locked)."""
    return lock_file(encoded_dir() / "locks" / f"{signature}.lock")


def now_ns() -> int:
    return time.time_ns()
