"""Where the CLI writes: results on stdout, progress and errors on stderr, JSON lines verbatim.

Text that is not ours (what a model generates, a corpus's characters, names and paths a user
gave) reaches a terminal only through `visible` and, when it goes into a Rich string, through
`rich.markup.escape`: a terminal never receives a control sequence from it (clear the screen,
set the title, write the clipboard with OSC 52) and Rich never reads markup or emoji codes in it.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..data.download import StageProgress
from ..runs import json_line

# emoji=False: Rich would read ":fire:" in a sample, a name or a path as 🔥
out = Console(highlight=False, emoji=False)
err = Console(stderr=True, highlight=False, emoji=False)


# Every control character but newline and tab: C0 (ESC, CR, BEL, backspace, ...), DEL and C1 (CSI 0x9b, ...).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """`text` with each control character other than newline and tab shown as a visible
    character instead of acted on: C0 and DEL as Unicode's control pictures (ESC as ␛, CR as
    ␍, BEL as ␇), C1 controls, which have none, as \\x80 … \\x9f."""
    return _CONTROL.sub(_picture, text)


def _picture(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)
    return "\u2421" if code == 0x7F else f"\\x{code:02x}"


def print_json(record: dict[str, Any]) -> None:
    """One line of strict JSON on stdout (NaN and infinities as null), flushed at once (a reader
    may be following)."""
    sys.stdout.write(json_line(record) + "\n")
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
                tasks[stage] = bar.add_task(escape(visible(stage)), total=total)  # a stage names a file: never markup
            bar.update(tasks[stage], completed=done, total=total)

        yield progress
