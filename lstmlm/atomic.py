"""Every durable write: a temporary file beside the destination, fsynced, then renamed over it.

A crash, a kill -9 or a full disk at any moment leaves either the old file or the new one under
the final name, never a mix; the temporary file is removed on any failure we live through.
A failure is a `WriteError` that names what was being written ("checkpoint", "plot", ...),
whatever the writer raised: torch's zip writer turns a failed write into a RuntimeError.

A file that several processes fill at their own offsets (the token store) cannot be written
through one callback; its writer makes the temporary file itself, in the destination's
directory, and ends with `publish`, the same last step as `write_atomic`'s.

A file a user names for a command's output (`export -o`, `inspect --html`, `plot -o`,
`tune --output`) is written by `write_output`, after `check_output` (the same rule, run before
the work, so that a refusal comes first):

    inside a run's directory         refused, --force or not: a run's files are its own
    a FIFO, a character device       written through, never replaced (/dev/null stays /dev/null)
    a directory, a socket, a block   refused
    device
    an existing regular file         refused without --force; with it, replaced atomically
    nothing yet                      created atomically

An atomic write removes what a writer of the same file killed midway left beside it.

A symbolic link is followed: the file it names is the one judged, and replaced.

Only the holder of a file's lock (`locked`) writes its temporaries: one found by the holder was
left by a writer killed midway (`remove_leftovers`), as large as the file it was to become.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from .errors import LstmlmError, WriteError


def write_atomic(path: Path, write: Callable[[IO[bytes]], object], what: str = "file", replace: bool = True) -> None:
    """Write through `write` into a temporary file beside `path`, then rename it to `path`; with
    `replace=False`, link it there instead, which fails with FileExistsError (and leaves the
    file there alone) if `path` exists: a claim that two writers cannot both win.

    Any failure becomes a WriteError naming `what`, `path` and the OS's reason where there is
    one; an LstmlmError that `write` raises (a checksum mismatch while a download streams,
    say) passes through unchanged.
    """
    path = Path(path)
    try:
        _replace(path, write, replace)
    except _Taken:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except LstmlmError:
        raise
    except Exception as e:
        raise WriteError(f"cannot write the {what} {path}: {_reason(e)}") from None


@contextlib.contextmanager
def locked(lock: Path) -> Iterator[bool]:
    """Hold the lock on `lock`, a lock file (made if need be) or a directory: a second process
    writing the same file waits, then finds it written. No lock where none can be taken; whether
    it is held is what it yields."""
    fd = None
    held = False
    with contextlib.suppress(OSError):
        if lock.is_dir():
            fd = os.open(lock, os.O_RDONLY | os.O_DIRECTORY)
        else:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held = True
    try:
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock


def remove_leftovers(path: Path, mark: str = "") -> None:
    """Remove the temporaries of `path` (those `write_atomic` names, `.NAME.[MARK.]XXXX.tmp`) that
    killed writers left: call it holding the file's lock, so that no live writer has one."""
    for stale in path.parent.glob(f".{path.name}.{mark + '.' if mark else ''}*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _reason(e: BaseException) -> str:
    """The OS error behind `e` ("No space left on device"), even where a library wrapped it in
    its own exception (the OSError is then its cause or context); else `e` in a few words."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def write_text_atomic(path: Path, text: str, what: str = "file", replace: bool = True) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")), what, replace)


class _Taken(Exception):
    """`path` existed when it was to be created, not replaced."""


def _replace(path: Path, write: Callable[[IO[bytes]], object], replace: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp made it private; the final file need not be
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and never over an existing name
            except FileExistsError:
                raise _Taken from None
            with contextlib.suppress(OSError):  # the claim is made; a leftover is swept as a stale temporary
                tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def publish(tmp: Path, path: Path) -> None:
    """Rename `tmp` — complete, fsynced, in `path`'s directory — over `path`, and make the rename
    durable: a reader sees the old file or the whole new one. OSError on failure."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def file_mode() -> int:
    """The mode a new file gets from this process's umask (mkstemp makes temporaries 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- a command's output, at a path the user chose ---------------------------------------------------

RUN_FILES = ("config.json", "vocab.json")  # every run directory holds both from the moment it is made (runs.py)


def check_output(path: Path, force: bool = False) -> Path:
    """The file `path` names (symbolic links resolved), if a command may write its output there
    (the table above); else a WriteError saying why."""
    real = Path(os.path.realpath(path))
    if all((real.parent / name).is_file() for name in RUN_FILES):
        raise WriteError(f"refusing to write {path}: {real.parent} is a run's directory, whose files are the run's own; choose another path")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return real
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from None
    if stat.S_ISREG(mode) and not force:
        raise WriteError(f"refusing to replace {path}: it exists (--force replaces it)")
    if not (stat.S_ISREG(mode) or _written_through(mode)):
        raise WriteError(f"refusing to write {path}: it is {_kind(mode)}, not a file")
    return real


def write_output(path: Path, write: Callable[[IO[bytes]], object], what: str = "file", force: bool = False) -> None:
    """Write a command's output to the file the user named, by `check_output`'s rule: through a
    FIFO or a character device, else atomically (`write_atomic`)."""
    real = check_output(path, force)
    fd = _open_through(real, path, what)
    if fd is None:
        # Writers into one folder take turns (its lock), so the holder knows that a temporary of
        # this file is a killed writer's, as large as the file, and no one else's to clear
        with locked(real.parent) as held:
            if held:
                remove_leftovers(real)
            write_atomic(real, write, what)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
    except LstmlmError:
        raise
    except Exception as e:
        raise WriteError(f"cannot write the {what} {path}: {_reason(e)}") from None


def write_text_output(path: Path, text: str, what: str = "file", force: bool = False) -> None:
    write_output(path, lambda f: f.write(text.encode("utf-8")), what, force)


def _open_through(real: Path, path: Path, what: str) -> int | None:
    """A descriptor to write through, where `real` is a FIFO or a character device (opening a
    FIFO waits for its reader, as a shell's redirection does); None for a file to write anew."""
    try:
        if not _written_through(os.stat(real).st_mode):
            return None
        fd = os.open(real, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)  # no O_CREAT, no O_TRUNC: it is not ours to make or cut
    except FileNotFoundError:
        return None
    except OSError as e:
        raise WriteError(f"cannot write the {what} {path}: {e.strerror or e}") from None
    if not _written_through(os.fstat(fd).st_mode):  # replaced since: judged again as what it is now
        os.close(fd)
        raise WriteError(f"refusing to write {path}: it changed while it was opened")
    return fd


def _written_through(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"
