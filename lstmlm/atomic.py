"""Every durable write: a temporary file beside the destination, fsynced, then renamed over it.

A crash, a kill -9 or a full disk at any moment leaves either the old file or the new one under
the final name, never a mix; the temporary file is removed on any failure we live through.
A failure is a `WriteError` that names what was being written ("checkpoint", "plot", ...).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import LstmlmError, WriteError


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], what: str = "file") -> None:
    """Write through `write` into a temporary file beside `path`, then rename it to `path`.

    A disk error becomes a WriteError naming `what` and `path`; an LstmlmError that `write`
    raises (a checksum mismatch while a download streams, say) passes through unchanged.
    """
    path = Path(path)
    try:
        _replace(path, write)
    except LstmlmError:
        raise
    except OSError as e:
        raise WriteError(f"cannot write the {what} {path}: {e.strerror or e}") from None


def write_text_atomic(path: Path, text: str, what: str = "file") -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what)


def _replace(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it private; the final file need not be
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
