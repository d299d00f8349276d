"""Running the encoding's jobs on every core: one process per core, started on first use and
shared by both passes (scan, then encode), each job's result in order and the bytes done
reported per stage."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar, cast

from .download import StageProgress
from .encode import Piece

WORKERS = 0  # processes encoding at once; 0 = one per core this process may use


def cores() -> int:
    """The cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_setup() -> None:
    """Workers leave Ctrl-C to the parent, which stops them (no traceback from each); and
    hand each piece's buffers back to the kernel when done with them. A piece's text, decoded
    and widened to code points, is some 50-100 MB of short-lived blocks; glibc's malloc, by
    default, raises its mmap threshold after the first such free and serves the next ones from
    the heap, where they fragment: a worker grew to ~900 MB over a 10 GB corpus of non-ASCII
    text. A fixed threshold maps every large block and unmaps it at its free."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_R = TypeVar("_R")


def _trimmed(job: Callable[..., _R], *args: Any) -> _R:
    """`job(*args)` in a worker, then the heap's free memory handed back to the kernel. A
    piece's text, decoded and widened to code points, is some 50-100 MB of short-lived blocks
    that glibc's malloc serves from the heap after the first such free, where they fragment: a
    worker grew to ~900 MB over a 10 GB corpus of non-ASCII text. malloc_trim after each piece
    keeps it at about a piece's worth (~320 MB with the interpreter and numpy), for some 25%
    more encoding time on such text (a 10 GB corpus: 89 s against 70)."""
    try:
        return job(*args)
    finally:
        if _malloc_trim is not None:
            _malloc_trim(0)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError):
        return cast(Callable[[int], int], ctypes.CDLL("libc.so.6").malloc_trim)
    return None


_malloc_trim = _libc_malloc_trim()


def _start_pool(workers: int) -> Executor:
    # spawn, not fork: this process has torch's threads (and maybe a progress bar's) running
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup)


def _terminate(pool: Executor) -> None:
    """End the pool's processes now rather than after the pieces they hold. Waiting for them,
    a second Ctrl-C landed in the wait: the pool was left unjoined, and the interpreter's exit
    then joined workers that never end (they ignore SIGINT and hold their queue's writing end
    themselves), so the command hung; interrupted again, it left them running. (Python 3.14's
    `ProcessPoolExecutor.terminate_workers`, earlier.)"""
    processes: dict[int, multiprocessing.process.BaseProcess] = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):  # already ended, or closed
            process.terminate()


def _let_go(futures: Sequence[Future[Any]]) -> None:
    """Release the futures' locks this thread still holds. A second Ctrl-C raised as the wait
    for a piece let go of that piece's lock (Python raises it wherever it lands, in a `with`'s
    exit too) left it held, and the pool's thread, cancelling the piece, waited for it for ever:
    so did the shutdown, which waits for that thread."""
    for future in futures:
        condition: Any = future._condition  # the lock `result` waits under
        while condition._is_owned():
            condition.release()


class Workers:
    """The processes encoding runs on — one per core, started on first use (a corpus of one
    piece starts none) and shared by both passes — and the one way jobs are run on them."""

    def __init__(self) -> None:
        self._pool: Executor | None = None
        self._futures: list[Future[Any]] = []  # the last run's: those a Ctrl-C may have left unfinished

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if self._pool is None:
            return
        if kind is None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        else:  # stopped midway (Ctrl-C, SIGTERM, an error): the pieces in flight are not wanted
            self._end()
        atexit.unregister(self._end)

    def _end(self) -> None:
        """End the workers now, and the pool. Also run at the process's exit, in case a second
        Ctrl-C cut `__exit__` short (raised where it lands, it skips the rest of any cleanup):
        registered after multiprocessing's own exit handler, which joins the workers, this runs
        first; and the pool's thread, left running, failed on the queues that handler closed."""
        if self._pool is not None:
            _let_go(self._futures)
            _terminate(self._pool)
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self,
        job: Callable[..., Any],
        args: Sequence[tuple[Any, ...]],
        pieces: Sequence[Piece],
        stage: str,
        progress: StageProgress | None,
        in_process: bool = False,
    ) -> list[Any]:
        """`job(*a)` for each `a`, results in order; `progress(stage, bytes done, total)` as the
        pieces complete."""
        workers = 1 if in_process else max(1, min(WORKERS or cores(), len(args)))
        if workers > 1 and self._pool is None:
            self._pool = _start_pool(workers)
            atexit.register(self._end)
        pool = self._pool if workers > 1 else None
        self._futures = [] if pool is None else [pool.submit(_trimmed, job, *a) for a in args]
        calls: Iterator[Any] = (job(*a) for a in args) if pool is None else (f.result() for f in self._futures)
        total = sum(s.size for p in pieces for s in p)
        done, results = 0, []
        for result, piece in zip(calls, pieces):
            results.append(result)
            done += sum(s.size for s in piece)
            if progress is not None:
                progress(stage, done, total)
        return results
