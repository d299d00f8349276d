"""What a cache of compiled code (native.py's) is trusted with: what is loaded from it runs
inside this process, so it is trusted no further than this.

- The directory must be this user's and writable by no one else (it is made 0700): another
  user's, or a group- or world-writable one, is refused (`Untrusted`).
- Beside each library its build writes a manifest (size, SHA-256, `write_manifest`); a library
  that does not match it (cut short by a full disk or a crash), is another user's, is writable
  by others or is reached through a symbolic link is not `intact`, and is never loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


class Untrusted(Exception):
    """A cache directory that someone other than this user could write to; the message says whose and how."""


def private_directory(directory: Path) -> Path:
    """`directory`, made private (0700) where it is missing; Untrusted where it is not private."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise Untrusted(f"cannot make the cache directory {directory}: {e.strerror or e}") from None
    check_directory(directory)
    return directory


def check_directory(directory: Path) -> None:
    try:
        why = unsafe(os.stat(directory))
    except OSError as e:
        raise Untrusted(f"cannot read the cache directory {directory}: {e.strerror or e}") from None
    if why is not None:
        raise Untrusted(
            f"the cache directory {directory} {why}: refused, since whoever may write there could run code in this process; "
            "chmod go-w it, or set LSTMLM_NATIVE_DIR to a directory of your own"
        )


def unsafe(st: os.stat_result) -> str | None:
    """Why someone other than this user could have put a file there, if anyone could."""
    if st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    if st.st_mode & stat.S_IWOTH:
        return "is world-writable"
    if st.st_mode & stat.S_IWGRP:
        return "is group-writable"
    return None


def intact(library: Path, manifest: Path) -> bool:
    """Whether `library` is this user's, writable by no one else, and exactly what its build
    made (its manifest's size and SHA-256, the manifest held to the same rules)."""
    try:
        with open_private(manifest) as f:
            record = json.loads(f.read(1 << 16))
        with open_private(library) as f:
            if not isinstance(record, dict) or os.fstat(f.fileno()).st_size != record.get("size"):
                return False
            return bool(_sha256(f) == record.get("sha256"))
    except (OSError, ValueError):
        return False


def write_manifest(built: Path, manifest: Path, **about: Any) -> None:
    """The manifest of `built` (its size and SHA-256, and `about` it), written to `manifest`,
    fsynced, readable by all."""
    with open(built, "rb") as f:
        record = {"size": os.fstat(f.fileno()).st_size, "sha256": _sha256(f), **about}
    with open(manifest, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(manifest, 0o644)


@contextlib.contextmanager
def open_private(path: Path) -> Iterator[IO[bytes]]:
    """`path` opened for reading if it is a regular file (not through a symbolic link), this
    user's, and writable by no one else; OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or unsafe(st) is not None:
            raise OSError(errno.EPERM, f"not a private regular file: {path}")
        yield f


def _sha256(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()
