"""`lstmlm download`: a corpus into the cache, SHA-1 checked, unzipped if it comes zipped (no torch is loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..data import download as corpora
from ..data.text import summarize
from .console import err, out, stage_bar, visible


def download(
    name: Annotated[str, typer.Argument(help=f"A known corpus ({', '.join(corpora.KNOWN)}) or an http(s) URL.")] = "timemachine",
    url: Annotated[str | None, typer.Option("--url", help="Fetch a known corpus from this address (a mirror); its SHA-1 is still checked.")] = None,
    sha1: Annotated[str | None, typer.Option("--sha1", help="Expected SHA-1 of a file given by URL.")] = None,
    directory: Annotated[Path | None, typer.Option("--dir", help="Cache directory (default $LSTMLM_HOME or ~/.cache/lstmlm).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if a verified copy is cached.")] = False,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Refuse a file larger than this (decoded), and leave nothing behind.")
    ] = corpora.MAX_BYTES,
) -> None:
    """Download a corpus into the cache, checking its SHA-1; a verified cached copy means no network."""
    target = corpora.resolve_target(name, url=url, sha1=sha1, directory=directory)
    path = fetch(target, force, max_bytes)
    summary = summarize(path)
    out.out(str(path))  # verbatim: no markup, no wrapping, so scripts can use the line
    if summary.characters is None:
        out.print(f"{summary.bytes:,} bytes, {summary.distinct:,} distinct bytes (not UTF-8 text: train on it with --normalize bytes)", soft_wrap=True)
    else:
        out.print(f"{summary.bytes:,} bytes, {summary.characters:,} characters, {summary.distinct:,} distinct", soft_wrap=True)


def fetch(target: corpora.Target, force: bool, max_bytes: int) -> Path:
    """Download (and unzip) with progress bars on stderr; silent when the cache already has the file."""
    if not force and corpora.is_cached(target):
        return target.corpus_path
    if not err.is_terminal:  # in a log or a pipe a bar is noise, and Rich leaves a blank line there
        return corpora.download(target, force=True, max_bytes=max_bytes)
    with stage_bar() as bar:  # the bars' texts are markup: the names in them are escaped
        task = bar.add_task(f"downloading {escape(visible(target.path.name))}", total=None)
        unzipping = bar.add_task(f"unzipping {escape(visible(str(target.member)))}", total=None, visible=False)
        return corpora.download(
            target,
            force=True,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            unzip_progress=lambda done, total: bar.update(unzipping, completed=done, total=total, visible=True),
            max_bytes=max_bytes,
        )
