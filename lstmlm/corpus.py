"""Corpora by name: the known ones (name → URL, SHA-1), the cache they live in, downloading them.

A download streams into a temporary file beside its destination, is checked against its SHA-1,
and only then renamed into place, so the cache never holds a partial or wrong file. Reading
and normalizing the text is the data pipeline's first stage (`lstmlm.data.text`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests

from .atomic import write_atomic
from .errors import CorpusError, DownloadError


@dataclass(frozen=True)
class KnownCorpus:
    name: str
    url: str
    sha1: str
    filename: str


KNOWN: dict[str, KnownCorpus] = {
    c.name: c
    for c in (
        KnownCorpus(
            "timemachine",
            "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            "090b5e7e70c295757f55df93cb0a180b9691891a",
            "timemachine.txt",
        ),
        KnownCorpus(
            "tinyshakespeare",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "04486597058d11dcc2c556b1d0433891eb639d2e",
            "tinyshakespeare.txt",
        ),
    )
}

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
RETRIES = 3  # attempts after the first, on connection errors and 5xx answers
CHUNK_BYTES = 1 << 16

# progress(bytes_so_far, total_bytes_or_None) is called as the download streams.
Progress = Callable[[int, "int | None"], None]


def cache_dir(override: str | Path | None = None) -> Path:
    """Where corpora are kept: the override, else $LSTMLM_HOME, else ~/.cache/lstmlm."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("LSTMLM_HOME") or Path.home() / ".cache" / "lstmlm")


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Target:
    """What to download and where it goes."""

    url: str
    sha1: str | None
    path: Path


def resolve_target(
    name_or_url: str, url: str | None = None, sha1: str | None = None, directory: str | Path | None = None
) -> Target:
    """A known corpus name (optionally fetched from a mirror `url`) or a plain http(s) URL."""
    root = cache_dir(directory)
    if name_or_url in KNOWN:
        known = KNOWN[name_or_url]
        if sha1 is not None and sha1.lower() != known.sha1:
            raise DownloadError(f"'{known.name}' has SHA-1 {known.sha1}; --sha1 {sha1} contradicts it")
        return Target(url or known.url, known.sha1, root / known.filename)
    if not re.match(r"^https?://", name_or_url):
        raise DownloadError(
            f"unknown corpus '{name_or_url}': use one of {', '.join(KNOWN)} or an http(s) URL"
        )
    if url is not None:
        raise DownloadError("--url is for a known corpus name; pass the URL itself instead")
    if sha1 is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", sha1):
        raise DownloadError(f"--sha1 must be 40 hexadecimal digits, not '{sha1}'")
    filename = Path(urllib.parse.urlparse(name_or_url).path).name or "corpus.txt"
    return Target(name_or_url, sha1.lower() if sha1 else None, root / filename)


def is_cached(target: Target) -> bool:
    """A cached file counts only when its checksum is right (or none is known)."""
    if not target.path.is_file():
        return False
    return target.sha1 is None or sha1_of(target.path) == target.sha1


def download(target: Target, force: bool = False, progress: Progress | None = None) -> Path:
    """Fetch `target` into the cache unless a verified copy is there; return its path."""
    if not force and is_cached(target):
        return target.path
    try:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {target.path.parent}: {e.strerror}") from None
    for attempt in range(RETRIES + 1):
        try:
            return _download_once(target, progress)
        except _Retryable as e:
            if attempt == RETRIES:
                raise DownloadError(f"{target.url}: {e}{_OFFLINE_HINT}") from None
            time.sleep(min(0.5 * 2**attempt, 4.0))
    raise AssertionError("unreachable")


_OFFLINE_HINT = " (offline? train on a local file instead: lstmlm train --corpus PATH)"


class _Retryable(Exception):
    """A connection error or a 5xx answer: worth another attempt."""


def _download_once(target: Target, progress: Progress | None) -> Path:
    url = target.url
    try:
        response = requests.get(url, stream=True, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.Timeout:
        raise _Retryable("timed out") from None
    except requests.ConnectionError as e:
        raise _Retryable(f"cannot connect ({_root_cause(e)})") from None
    except requests.RequestException as e:
        raise DownloadError(f"{url}: {e}") from None
    with response:
        if response.status_code >= 500:
            raise _Retryable(f"HTTP {response.status_code} {response.reason}")
        if response.status_code != 200:
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
        expected_length = response.headers.get("Content-Length")
        total = int(expected_length) if expected_length and expected_length.isdigit() else None
        def stream_and_verify(out: IO[bytes]) -> None:
            digest, received = _stream_to(response, out, total, progress)
            if total is not None and received != total:
                raise DownloadError(f"{url}: transfer cut short ({received} of {total} bytes)")
            if target.sha1 is not None and digest != target.sha1:
                raise DownloadError(f"{url}: checksum mismatch (expected SHA-1 {target.sha1}, got {digest})")

        write_atomic(target.path, stream_and_verify, "download")  # only a complete, verified file gets the name
    return target.path


def _stream_to(response: requests.Response, out: IO[bytes], total: int | None, progress: Progress | None) -> tuple[str, int]:
    """Copy the body into `out`; return its SHA-1 and length. A broken transfer is a DownloadError."""
    digest = hashlib.sha1()
    received = 0
    url = response.url
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            if progress is not None:
                progress(received, total)
    except requests.exceptions.ConnectionError as e:  # includes read timeouts mid-stream
        cause = "timed out" if "timed out" in str(e).lower() else "connection lost"
        raise DownloadError(f"{url}: transfer cut short after {received} bytes ({cause})") from None
    except requests.exceptions.ChunkedEncodingError:
        raise DownloadError(f"{url}: transfer cut short after {received} bytes") from None
    return digest.hexdigest(), received


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error, e.g. 'Connection refused'."""
    text = str(e)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(Name or service not known|Connection refused)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return type(e).__name__


def locate(source: str, progress: Progress | None = None) -> Path:
    """The local path of a corpus: a known name (downloaded into the cache on first use) or a path."""
    if source in KNOWN and not Path(source).exists():
        return download(resolve_target(source), progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        known = f"; known corpora: {', '.join(KNOWN)}" if os.sep not in source else ""
        raise CorpusError(f"corpus not found: {source}{known}")
    return path
