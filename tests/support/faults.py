"""Faults the tests provoke: a filesystem filled to the last bytes (`fill`, on conftest's
`small_disk`), a pickle that runs code when loaded (`Payload`), and a corpus's first encoding
held midway in its worker processes, for a signal to land in (`HeldEncoding`)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from pathlib import Path
from typing import Any


def fill(disk: Path, leave: int) -> Path:
    """Write until the filesystem says it is full, then give back `leave` bytes; the filler file,
    to delete to make room again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        f.truncate(f.tell() - leave)
    return filler


class Payload:
    """Unpickling this runs `touch(marker)`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


# Imported by the worker processes (spawned: they import it by name, from the test's folder):
# each piece's encoding says which worker holds it, then waits.
HELD_MODULE = """
import functools, importlib, os, signal, sys, time
from pathlib import Path

def encode(*args):
    (Path(os.environ["LSTMLM_TEST_HELD"]) / str(os.getpid())).touch()
    time.sleep(3600)

def second_ctrl_c(where):
    \"\"\"Ctrl-C raises, and a second one lands as the function `where` ('module:Class.name')
    is first called after it, while the first unwinds: raised as that function begins.\"\"\"
    module, name = where.split(":")
    code = functools.reduce(getattr, name.split("."), importlib.import_module(module)).__code__

    def landing(frame, event, arg):
        if event == "call" and frame.f_code is code:
            sys.settrace(None)
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once: in here, as `where` is called

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.settrace(landing)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, first)
"""

# `lstmlm ARGS`, its corpus cut into pieces of 1 KiB, encoded on two workers by HELD_MODULE's encode;
# with LSTMLM_TEST_SECOND_AT, a Ctrl-C's second lands there (HELD_MODULE's second_ctrl_c).
HELD_CLI = """
import os, sys
import held
import lstmlm.data.encode, lstmlm.data.store, lstmlm.data.workers
lstmlm.data.encode.encode = held.encode
lstmlm.data.store.PIECE_BYTES = 1024
lstmlm.data.workers.WORKERS = 2
if "LSTMLM_TEST_SECOND_AT" in os.environ:
    held.second_ctrl_c(os.environ["LSTMLM_TEST_SECOND_AT"])
from lstmlm.cli.app import main
main()
"""


class HeldEncoding:
    """What `HELD_CLI` needs: its module in `folder`, and an environment that finds it and names
    where the workers say they hold a piece (`workers`: their process ids, once both do)."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        (folder / "held.py").write_text(HELD_MODULE, encoding="utf-8")
        self.marks = folder / "held"
        self.marks.mkdir()
        path = os.pathsep.join(filter(None, [str(folder), env.get("PYTHONPATH", "")]))
        self.env = {**env, "PYTHONPATH": path, "LSTMLM_TEST_HELD": str(self.marks)}
        self.code = HELD_CLI

    @property
    def workers(self) -> list[int]:
        return [int(mark.name) for mark in self.marks.iterdir()]

    def running(self) -> list[int]:
        """The workers still running (a zombie has ended)."""
        return [pid for pid in self.workers if _running(pid)]

    def kill(self) -> None:
        """Whatever a failing test left running."""
        for pid in self.running():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" if sys.platform == "linux" else True
