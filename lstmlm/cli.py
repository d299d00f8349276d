"""The `lstmlm` command: parses options, calls the library, renders with Rich.

The only module that prints. Every library error becomes one red line on stderr and exit
code 1 (a traceback only with LSTMLM_DEBUG=1); usage errors are Typer's, exit code 2.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from . import corpus
from .errors import LstmlmError

app = typer.Typer(
    name="lstmlm",
    help="Train character-level LSTM language models: the d2l LSTM from scratch and on cuDNN.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def friendly(command: F) -> F:
    """Turn library errors (and a few OS ones) into one line and exit code 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LstmlmError as e:
            if os.environ.get("LSTMLM_DEBUG") == "1":
                raise
            raise fail(str(e)) from None
        except OSError as e:
            if os.environ.get("LSTMLM_DEBUG") == "1":
                raise
            where = f": {e.filename}" if e.filename else ""
            raise fail(f"{e.strerror or e}{where}") from None

    return wrapper  # type: ignore[return-value]


def download_progress(description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def fetch(target: corpus.Target, force: bool) -> Path:
    """Download with a progress bar on stderr (silent when the cache already has the file)."""
    if not force and corpus.is_cached(target):
        return target.path
    with download_progress(target.url) as bar:
        task = bar.add_task(f"downloading {target.path.name}", total=None)
        return corpus.download(target, force=True, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"lstmlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train character-level LSTM language models: the d2l LSTM from scratch and on cuDNN."""


@app.command()
@friendly
def download(
    name: str = typer.Argument("timemachine", help=f"A known corpus ({', '.join(corpus.KNOWN)}) or an http(s) URL."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch a known corpus from this address (a mirror); its SHA-1 is still checked."),
    sha1: Optional[str] = typer.Option(None, "--sha1", help="Expected SHA-1 of a file given by URL."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Cache directory (default $LSTMLM_HOME or ~/.cache/lstmlm)."),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy is cached."),
) -> None:
    """Download a corpus into the cache, checking its SHA-1; a verified cached copy means no network."""
    target = corpus.resolve_target(name, url=url, sha1=sha1, directory=directory)
    path = fetch(target, force)
    text = corpus.read_text(path)
    out.print(str(path))
    out.print(f"{path.stat().st_size:,} bytes, {len(text):,} characters, {len(set(text)):,} distinct")


def main() -> None:
    app()
