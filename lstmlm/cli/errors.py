"""The one place that decides what a failure looks like: one red line on stderr and an exit code.

Library errors (`LstmlmError`) and OS errors print as they are, out-of-memory with a hint,
anything unexpected as an internal error; exit code 1 (130 on Ctrl-C, 143 on SIGTERM; Typer's
usage errors are 2). A reader that closes the pipe early ends the command quietly, with 141 as SIGPIPE
would. LSTMLM_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, NoReturn, TypeVar

import typer
from rich.markup import escape

from ..errors import LstmlmError
from .console import err, visible

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    one = visible(message).replace("\n", "\u240a")  # one line, whatever a path or a name held
    err.print(f"[bold red]error:[/] {escape(one)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


class Began:
    """Whether a command's handler began: before it, while Typer parses the command line, a
    Ctrl-C is Typer's to end (exit 130, without a word)."""

    command = False


def friendly(command: F, torch: bool = False) -> F:
    """Run `command`, turning every error into one line and an exit code; `torch`: the command
    loads torch, which is then loaded first, whole (`load_torch`)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        Began.command = True
        try:
            with terminable():
                if torch:
                    load_torch()
                return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):  # a command's usage error is Typer's to report (exit code 2)
            raise
        except BrokenPipeError:  # the reader went away (`lstmlm generate | head`): nothing to say
            _discard_stdout()
            raise typer.Exit(128 + signal.SIGPIPE) from None  # as a program killed by SIGPIPE exits
        except BaseException as e:
            if os.environ.get("LSTMLM_DEBUG") == "1" or isinstance(e, SystemExit):
                raise
            cause = interruption(e) or e
            raise fail(one_line(cause, command.__name__), exit_code(cause)) from None

    return wrapper  # type: ignore[return-value]


def interruption(e: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM behind `e`, if any. An extension module whose initialisation is
    interrupted (pybind11's: onnxruntime, onnx) fails as ImportError("initialization failed")
    from the KeyboardInterrupt, and the `except ImportError` that names a missing extra then
    told the user to install what they have, exit code 1."""
    seen: set[int] = set()
    link: BaseException | None = e
    while link is not None and id(link) not in seen:
        if isinstance(link, (KeyboardInterrupt, Terminated)):
            return link
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return None


def exit_code(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 128 + signal.SIGTERM if isinstance(e, Terminated) else 1


class Terminated(BaseException):
    """SIGTERM, raised where the command is as Ctrl-C raises KeyboardInterrupt (and, like it, no
    `except Exception` takes it for a failure). Killed where it stood, a command left what it
    was making: a corpus's token store half-encoded in the cache, a download's or an export's
    temporary file, the encoding's worker processes running on. Unwinding removes each."""


def _terminate(_signum: int, _frame: FrameType | None) -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (a service manager repeats it) would cut the cleanup short
    raise Terminated


@contextlib.contextmanager
def terminable() -> Iterator[None]:
    """SIGTERM raises `Terminated` while a command runs (training's own handler takes over while
    it trains: it saves, then stops)."""
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (a test's runner): SIGTERM keeps what it had
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def load_torch() -> None:
    """Import torch with Ctrl-C and SIGTERM held until it is loaded, then taken as they came.
    Raised inside torch's extension while it loads (a second or so), either was lost: taken for
    numpy failing to load, cleared, and the command ran on to its end (SIGTERM, ignored from then
    on, never came back), or it aborted the process through pybind11 (exit 134, no line). Its
    threads are then cut to OMP_THREAD_LIMIT (device.within_thread_limit)."""
    if "torch" not in sys.modules:
        masks = hasattr(signal, "pthread_sigmask")  # not on Windows: loaded as it is
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM}) if masks else set()
        try:
            import torch  # noqa: F401
        finally:
            if masks:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)  # a signal held meanwhile is raised here
    from ..device import within_thread_limit

    within_thread_limit()


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush on the way out does not fail
    on the closed pipe again (and say so on stderr)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a test's stdout has no descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


# What to lower where an allocation fails, by command: each names options of its own
SMALLER = "lower --hidden, --embedding, --batch-size or --num-steps"
MEMORY_HINTS = {"train": SMALLER, "tune": SMALLER, "generate": "lower --num-samples", "bench": "lower --vocab-size, or the config's sizes"}


def one_line(e: BaseException, command: str = "") -> str:
    """`e` as the one line a command prints (`command`: its name, for an out-of-memory hint)."""
    if isinstance(e, LstmlmError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, Terminated):
        return "terminated"
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, (MemoryError, RuntimeError)) and _out_of_memory(e):  # torch's allocators raise RuntimeError
        size = re.search(r"tried to allocate (\d+) bytes", str(e))
        what = f" allocating {int(size.group(1)):,} bytes" if size else ""
        return f"out of memory{what}: " + MEMORY_HINTS.get(command, "more than this machine has")
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"internal error: {type(e).__name__}: {first} (LSTMLM_DEBUG=1 shows the traceback; please report it)"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed, or whose size does not even fit torch's integers (not any
    overflow: an lr past float32's range is 'cannot be converted to type float without overflow')."""
    message = str(e).lower()
    sizes = ("out of memory", "can't allocate memory", "size calculation overflow", "multiplication overflow")
    return isinstance(e, MemoryError) or any(s in message for s in sizes)
