"""`lstmlm download`: a corpus into the cache, SHA-1 checked (no torch is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .. import corpus
from .console import download_bar, err, out


def download(
    name: Annotated[str, typer.Argument(help=f"A known corpus ({', '.join(corpus.KNOWN)}) or an http(s) URL.")] = "timemachine",
    url: Annotated[str | None, typer.Option("--url", help="Fetch a known corpus from this address (a mirror); its SHA-1 is still checked.")] = None,
    sha1: Annotated[str | None, typer.Option("--sha1", help="Expected SHA-1 of a file given by URL.")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="Cache directory (default $LSTMLM_HOME or ~/.cache/lstmlm).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy is cached.")] = False,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Refuse a file larger than this (decoded), and leave nothing behind.")
    ] = corpus.MAX_BYTES,
) -> None:
    """Download a corpus into the cache, checking its SHA-1; a verified cached copy means no network."""
    target = corpus.resolve_target(name, url=url, sha1=sha1, directory=directory)
    path = fetch(target, force, max_bytes)
    summary = corpus.summarize(path)
    out.out(str(path))  # verbatim: no markup, no wrapping, so scripts can use the line
    out.print(f"{summary.bytes:,} bytes, {summary.characters:,} characters, {summary.distinct:,} distinct")


def fetch(target: corpus.Target, force: bool, max_bytes: int) -> Path:
    """Download with a progress bar on stderr (silent when the cache already has the file)."""
    if not force and corpus.is_cached(target):
        return target.path
    if not err.is_terminal:  # in a log or a pipe a bar is noise, and Rich leaves a blank line there
        return corpus.download(target, force=True, max_bytes=max_bytes)
    with download_bar() as bar:
        task = bar.add_task(f"downloading {escape(target.path.name)}", total=None)  # the bar's text is markup
        progress = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        return corpus.download(target, force=True, progress=progress, max_bytes=max_bytes)
