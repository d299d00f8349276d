"""Faults the tests provoke: a filesystem filled to the last bytes (`fill`, on conftest's
`small_disk`), and a pickle that runs code when loaded (`Payload`)."""

from __future__ import annotations

import errno
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
