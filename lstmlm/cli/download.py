"""`lstmlm download`: a corpus into the cache, SHA-1 checked (no torch is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .. import corpus
from ..data.text import read_text
from .console import download_bar, err, out


def download(
    name: Annotated[str, typer.Argument(help=f"A known corpus ({', '.join(corpus.KNOWN)}) or an http(s) URL.")] = "timemachine",
    url: Annotated[str | None, typer.Option("--url", help="Fetch a known corpus from this address (a mirror); its SHA-1 is still checked.")] = None,
    sha1: Annotated[str | None, typer.Option("--sha1", help="Expected SHA-1 of a file given by URL.")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="Cache directory (default $LSTMLM_HOME or ~/.cache/lstmlm).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy is cached.")] = False,
) -> None:
    """Download a corpus into the cache, checking its SHA-1; a verified cached copy means no network."""
    target = corpus.resolve_target(name, url=url, sha1=sha1, directory=directory)
    path = fetch(target, force)
    text = read_text(path)
    out.out(str(path))  # verbatim: no markup, no wrapping, so scripts can use the line
    out.print(f"{path.stat().st_size:,} bytes, {len(text):,} characters, {len(set(text)):,} distinct")


def fetch(target: corpus.Target, force: bool) -> Path:
    """Download with a progress bar on stderr (silent when the cache already has the file)."""
    if not force and corpus.is_cached(target):
        return target.path
    if not err.is_terminal:  # in a log or a pipe a bar is noise, and Rich leaves a blank line there
        return corpus.download(target, force=True)
    with download_bar() as bar:
        task = bar.add_task(f"downloading {target.path.name}", total=None)
        return corpus.download(target, force=True, progress=lambda done, total: bar.update(task, completed=done, total=total))
