"""Corpora by name: the known ones (name → URL, SHA-1), the cache they live in, downloading them.

A download streams into a temporary file beside its destination, is checked against its SHA-1,
and only then renamed into place, so the cache never holds a partial or wrong file. It is
bounded: at most `max_bytes` of text (however well it was compressed on the wire), and a
server that sends less than MIN_RATE_BYTES_S over RATE_WINDOW_S is given up on. Reading and
normalizing the text is the data pipeline's first stage (`lstmlm.data.text`).
"""

from __future__ import annotations

import codecs
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
from urllib3.exceptions import DecodeError, ReadTimeoutError
from urllib3.exceptions import HTTPError as TransportError

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
MAX_BYTES = 4 << 30  # the default --max-bytes: above any text corpus in common use (enwik9 is 1 GB)
MIN_RATE_BYTES_S = 1024  # a transfer slower than this over a whole RATE_WINDOW_S is given up on
RATE_WINDOW_S = 60.0  # (the read timeout alone never fires on a server that drips a byte at a time)

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
    return Target(name_or_url, sha1.lower() if sha1 else None, root / cached_name(name_or_url))


def cached_name(url: str) -> str:
    """The cache's file name for a URL: its own name with a digest of the whole URL, so two
    addresses that end alike (".../input.txt") never share a file."""
    name = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    stem, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if "." in name.strip(".") else (name, "")
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}{suffix}"


def is_cached(target: Target) -> bool:
    """A cached file counts only when its checksum is right (or none is known)."""
    if not target.path.is_file():
        return False
    return target.sha1 is None or sha1_of(target.path) == target.sha1


def download(target: Target, force: bool = False, progress: Progress | None = None, max_bytes: int = MAX_BYTES) -> Path:
    """Fetch `target` into the cache unless a verified copy is there; return its path. A body of
    more than `max_bytes` (decoded) is refused."""
    if not force and is_cached(target):
        return target.path
    try:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {target.path.parent}: {e.strerror}") from None
    for attempt in range(RETRIES + 1):
        try:
            return _download_once(target, progress, max_bytes)
        except _Retryable as e:
            if attempt == RETRIES:
                raise DownloadError(f"{target.url}: {e}{_OFFLINE_HINT}") from None
            time.sleep(min(0.5 * 2**attempt, 4.0))
    raise AssertionError("unreachable")


_OFFLINE_HINT = " (offline? train on a local file instead: lstmlm train --corpus PATH)"


class _Retryable(Exception):
    """A connection error or a 5xx answer: worth another attempt."""


def _download_once(target: Target, progress: Progress | None, max_bytes: int) -> Path:
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
        declared = response.headers.get("Content-Length")
        total = int(declared) if declared and declared.isdigit() else None  # bytes on the wire (compressed, if it is)
        if total is not None and total > max_bytes:
            raise DownloadError(f"{url}: the server announces {total:,} bytes, more than --max-bytes {max_bytes:,}")

        def stream_and_verify(out: IO[bytes]) -> None:
            digest, wire = _stream_to(response, out, total, max_bytes, progress)
            if total is not None and wire != total:
                raise DownloadError(f"{url}: transfer cut short ({wire} of {total} bytes)")
            if target.sha1 is not None and digest != target.sha1:
                raise DownloadError(f"{url}: checksum mismatch (expected SHA-1 {target.sha1}, got {digest})")

        write_atomic(target.path, stream_and_verify, "download")  # only a complete, verified file gets the name
    return target.path


def _stream_to(response: requests.Response, out: IO[bytes], total: int | None, max_bytes: int, progress: Progress | None) -> tuple[str, int]:
    """Copy the decoded body into `out`; return its SHA-1 and the bytes that came over the wire.

    urllib3's read1 returns what has arrived (a server that drips is seen byte by byte, so its
    rate can be judged) and decompresses at most a chunk at a time (a small compressed body
    cannot become gigabytes before the size check sees it). A broken transfer is a DownloadError."""
    raw = response.raw
    url = response.url
    digest = hashlib.sha1()
    received = 0  # decoded bytes, what the file gets
    window_start, window_wire = time.monotonic(), 0
    try:
        while chunk := raw.read1(CHUNK_BYTES, decode_content=True):
            received += len(chunk)
            if received > max_bytes:
                raise DownloadError(f"{url}: the body is larger than --max-bytes {max_bytes:,}")
            out.write(chunk)
            digest.update(chunk)
            wire = raw.tell()
            if progress is not None:
                progress(wire, total)
            now = time.monotonic()
            if now - window_start >= RATE_WINDOW_S:
                if wire - window_wire < MIN_RATE_BYTES_S * (now - window_start):
                    raise DownloadError(
                        f"{url}: too slow ({wire - window_wire:,} bytes in {now - window_start:.0f} s, "
                        f"under {MIN_RATE_BYTES_S:,} bytes/s): given up after {wire:,} bytes"
                    )
                window_start, window_wire = now, wire
    except ReadTimeoutError:
        raise DownloadError(f"{url}: transfer cut short after {raw.tell()} bytes (timed out)") from None
    except DecodeError as e:
        raise DownloadError(f"{url}: the compressed body is malformed ({_decode_reason(e)})") from None
    except TransportError:  # the connection lost, or closed before the announced length
        raise DownloadError(f"{url}: transfer cut short after {raw.tell()} bytes (connection lost)") from None
    return digest.hexdigest(), raw.tell()


def _decode_reason(e: DecodeError) -> str:
    """zlib's complaint ('incorrect header check'), without urllib3's wrapping."""
    m = re.search(r"error\('(?:Error -?\d+ while decompressing data: )?([^']+)'", str(e))
    return m.group(1) if m else "cannot be decompressed"


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error, e.g. 'Connection refused'."""
    text = str(e)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(Name or service not known|Connection refused)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return type(e).__name__


@dataclass(frozen=True)
class Summary:
    bytes: int
    characters: int
    distinct: int


def summarize(path: Path) -> Summary:
    """Size, characters and distinct characters of a UTF-8 file, read a block at a time (a
    downloaded corpus can be larger than memory). Not UTF-8, binary or empty: a CorpusError."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen: set[str] = set()
    characters = offset = 0
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(1 << 20)
                nul = block.find(b"\0")
                if nul >= 0:
                    raise CorpusError(f"corpus {path} looks binary (NUL byte at offset {offset + nul})")
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(block, final=not block)
                except UnicodeDecodeError as e:
                    raise CorpusError(f"corpus {path} is not UTF-8 (invalid byte at offset {offset - pending + e.start})") from None
                characters += len(text)
                seen.update(text)
                offset += len(block)
                if not block:
                    break
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror}") from None
    if offset == 0:
        raise CorpusError(f"corpus {path} is empty")
    return Summary(offset, characters, len(seen))


def locate(source: str, progress: Progress | None = None) -> Path:
    """The local path of a corpus: a known name (downloaded into the cache on first use) or a path."""
    if source in KNOWN and not Path(source).exists():
        return download(resolve_target(source), progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        known = f"; known corpora: {', '.join(KNOWN)}" if os.sep not in source else ""
        raise CorpusError(f"corpus not found: {source}{known}")
    return path
