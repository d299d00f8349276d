"""Where the CLI writes: results on stdout, progress and errors on stderr, JSON lines verbatim."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once (a reader may be following)."""
    sys.stdout.write(json.dumps(record) + "\n")
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
