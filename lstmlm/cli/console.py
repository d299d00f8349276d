"""Where the CLI writes: results on stdout, progress and errors on stderr, JSON lines verbatim."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..corpus import StageProgress

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def print_json(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed at once (a reader may be following)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def stage_bar() -> Progress:
    """Transient bars on stderr for work measured in bytes (downloading, reading, encoding a
    corpus): bytes, rate, time left."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


@contextlib.contextmanager
def corpus_progress() -> Iterator[StageProgress | None]:
    """A bar for each stage the corpus goes through (downloading, unzipping, reading, encoding:
    bytes, rate, time left), shown only where there is one; none in a log or a pipe, where a bar
    is noise (and Rich leaves a blank line there, before any error line)."""
    if not err.is_terminal:
        yield None
        return
    with stage_bar() as bar:
        tasks: dict[str, Any] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield progress
