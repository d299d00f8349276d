"""Where the CLI writes: results on stdout, progress and errors on stderr, JSON lines verbatim."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..runs import json_line

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(record: dict[str, Any]) -> None:
    """One line of strict JSON on stdout (NaN and infinities as null), flushed at once (a reader
    may be following)."""
    sys.stdout.write(json_line(record) + "\n")
    sys.stdout.flush()


def download_bar() -> Progress:
    """A transient bar on stderr for a download: bytes, rate, time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
