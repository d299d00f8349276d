"""Corpora by name: the known ones (name → URL, SHA-1), downloading them into the cache (home.py).

A download streams into a temporary file beside its destination, is checked against its SHA-1,
and only then renamed into place, so the cache never holds a partial or wrong file. It is
bounded: at most `max_bytes` of text (however well it was compressed on the wire), and a
server that sends less than MIN_RATE_BYTES_S over RATE_WINDOW_S is given up on. A known
corpus that comes zipped (enwik8) is then unzipped by the standard library, its member's CRC
checked, into the cache the same way. Reading and normalizing the text is the data
pipeline's first stage (`lstmlm.data`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..atomic import write_atomic
from ..errors import CorpusError, DownloadError
from .home import cache_dir

if TYPE_CHECKING:  # requests and urllib3 are imported where a download happens: the command line starts without them
    import requests


@dataclass(frozen=True)
class KnownCorpus:
    name: str
    url: str
    sha1: str  # of the file downloaded (the archive, for a zipped corpus)
    filename: str
    normalize: str = "raw"  # how `--normalize auto` reads it
    split: str = ""  # its standard train,validation,test split, if it has one
    member: str | None = None  # the file inside a zip archive that is the corpus


KNOWN: dict[str, KnownCorpus] = {
    c.name: c
    for c in (
        KnownCorpus(
            "timemachine",
            "http://d2l-data.s3-accelerate.amazonaws.com/timemachine.txt",
            "090b5e7e70c295757f55df93cb0a180b9691891a",
            "timemachine.txt",
            normalize="d2l",
        ),
        KnownCorpus(
            "tinyshakespeare",
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
            "04486597058d11dcc2c556b1d0433891eb639d2e",
            "tinyshakespeare.txt",
        ),
        # Hutter's enwik8: the first 10^8 bytes of an English Wikipedia dump, the standard
        # character-level benchmark, reported in bits per byte on its 90M/5M/5M split. The SHA-1
        # of enwik8.zip (36,445,475 bytes) as GluonNLP pins it for this URL:
        # dmlc/gluon-nlp, scripts/datasets/url_checksums/language_model.txt.
        KnownCorpus(
            "enwik8",
            "http://mattmahoney.net/dc/enwik8.zip",
            "d856b1ccd937c51aeb9c342e47666fb8c38e7e72",
            "enwik8.zip",
            normalize="bytes",
            split="90M,5M,5M",
            member="enwik8",
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
MAX_STEM_BYTES = 96  # of a URL's own name in its cache name (a file name holds 255 bytes; the digest tells URLs apart)
MAX_SUFFIX_BYTES = 16

# progress(bytes_so_far, total_bytes_or_None) is called as the download streams.
Progress = Callable[[int, "int | None"], None]
# stage_progress(stage, done, total_or_None): the same for each stage of getting a corpus ready
# ("downloading", "unzipping", "reading", "encoding"), in bytes; the CLI draws one bar a stage.
StageProgress = Callable[[str, int, "int | None"], None]


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
    member: str | None = None  # unzip this member of the downloaded archive...
    extracted: Path | None = None  # ...into this file: the corpus

    @property
    def corpus_path(self) -> Path:
        """The corpus file this target gives: the download itself, or the member unzipped from it."""
        return self.extracted or self.path


def resolve_target(name_or_url: str, url: str | None = None, sha1: str | None = None, directory: str | Path | None = None) -> Target:
    """A known corpus name (optionally fetched from a mirror `url`) or a plain http(s) URL."""
    root = cache_dir(directory)
    if name_or_url in KNOWN:
        known = KNOWN[name_or_url]
        if sha1 is not None and sha1.lower() != known.sha1:
            raise DownloadError(f"'{known.name}' has SHA-1 {known.sha1}; --sha1 {sha1} contradicts it")
        extracted = root / known.member if known.member else None
        return Target(url or known.url, known.sha1, root / known.filename, known.member, extracted)
    if not re.match(r"^https?://", name_or_url, re.IGNORECASE):  # a scheme is case-insensitive (RFC 3986)
        raise DownloadError(f"unknown corpus '{name_or_url}': use one of {', '.join(KNOWN)} or an http(s) URL")
    if url is not None:
        raise DownloadError("--url is for a known corpus name; pass the URL itself instead")
    if sha1 is not None and not re.fullmatch(r"[0-9a-fA-F]{40}", sha1):
        raise DownloadError(f"--sha1 must be 40 hexadecimal digits, not '{sha1}'")
    return Target(name_or_url, sha1.lower() if sha1 else None, root / cached_name(name_or_url))


def cached_name(url: str) -> str:
    """The cache's file name for a URL: its own name with a digest of the whole URL, so two
    addresses that end alike (".../input.txt") never share a file."""
    try:
        path = urllib.parse.urlparse(url).path
    except ValueError as e:  # a bracket left open: http://[::1/a.txt
        raise DownloadError(f"{url}: not a valid URL ({e})") from None
    name = Path(path).name or "corpus.txt"
    stem, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if "." in name.strip(".") else (name, "")
    if len(suffix.encode()) > MAX_SUFFIX_BYTES:  # no file type, a dot in a long name
        stem, suffix = name, ""
    stem = stem.encode()[:MAX_STEM_BYTES].decode(errors="ignore")  # within a file name's 255 bytes, the temporary's decoration too
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:10]}{suffix}"


def is_cached(target: Target) -> bool:
    """A cached file counts only when its checksum is right (or none is known), and, for an
    archive, when its member has been unzipped whole beside it."""
    if not target.path.is_file():
        return False
    if target.sha1 is not None and sha1_of(target.path) != target.sha1:
        return False
    return target.extracted is None or _unzipped_whole(target)


def download(target: Target, force: bool = False, progress: Progress | None = None, unzip_progress: Progress | None = None, max_bytes: int = MAX_BYTES) -> Path:
    """Fetch `target` into the cache unless a verified copy is there (unzipping its member, if
    it is an archive); return the corpus file's path. A body of more than `max_bytes`
    (decoded) is refused."""
    if not force and is_cached(target):
        return target.corpus_path
    path = _fetch(target, progress, max_bytes)
    if target.member is not None:
        return unzip(target, unzip_progress)
    return path


def _fetch(target: Target, progress: Progress | None, max_bytes: int) -> Path:
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
    import requests

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
            digest = _stream_to(response, out, total, max_bytes, progress)
            if target.sha1 is not None and digest != target.sha1:
                raise DownloadError(f"{url}: checksum mismatch (expected SHA-1 {target.sha1}, got {digest})")

        write_atomic(target.path, stream_and_verify, "download")  # only a complete, verified file gets the name
    return target.path


def _stream_to(response: requests.Response, out: IO[bytes], total: int | None, max_bytes: int, progress: Progress | None) -> str:
    """Copy the decoded body into `out`; return its SHA-1. A broken transfer is a DownloadError:
    fewer bytes than announced, a compressed stream that does not end, or one that is malformed.

    urllib3's read1 returns what has arrived (a server that drips is seen byte by byte, so its
    rate can be judged); the body is decoded here (`_Decoder`), at most a chunk at a time (a
    small compressed body cannot become gigabytes before the size check sees it)."""
    from urllib3.exceptions import HTTPError as TransportError
    from urllib3.exceptions import ReadTimeoutError

    raw = response.raw
    url = response.url
    decoder = _Decoder(url, response.headers.get("Content-Encoding", ""))
    digest = hashlib.sha1()
    received = 0  # decoded bytes, what the file gets
    window_start, window_wire = time.monotonic(), 0
    try:
        while wire_chunk := raw.read1(CHUNK_BYTES, decode_content=False):
            for chunk in decoder.decode(wire_chunk):
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
    except TransportError:  # the connection lost, or closed before the announced length
        raise DownloadError(f"{url}: transfer cut short after {raw.tell()} bytes (connection lost)") from None
    if total is not None and raw.tell() != total:
        raise DownloadError(f"{url}: transfer cut short ({raw.tell()} of {total} bytes)")
    if not decoder.ended:
        raise DownloadError(f"{url}: the compressed body is malformed (it ends before its compressed stream does)")
    return digest.hexdigest()


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # zlib's for each coding


class _Decoder:
    """A body's Content-Encoding undone: none, gzip (one member or several) or deflate (zlib's
    format, RFC 9110), at most CHUNK_BYTES out at a time. Decoded here rather than by urllib3,
    which keeps a gzip stream cut short as if it were whole, and an encoding it does not know
    (br without brotli installed) as if it were the text."""

    def __init__(self, url: str, content_encoding: str) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip().lower() not in ("", "identity")]
        if len(codings) > 1 or any(c not in _WBITS for c in codings):
            raise DownloadError(f"{url}: the body is encoded as '{content_encoding.strip()}' (Content-Encoding), which lstmlm cannot decode")
        self.url = url
        self.wbits = _WBITS[codings[0]] if codings else None
        self.inflater = zlib.decompressobj(self.wbits) if self.wbits is not None else None
        self.started = False  # a byte of the body has come (an empty body encodes nothing: it is whole)

    @property
    def ended(self) -> bool:
        """The compressed stream came to its end (or there is none)."""
        return self.inflater is None or self.inflater.eof or not self.started

    def decode(self, data: bytes) -> Iterator[bytes]:
        if self.inflater is None or self.wbits is None:
            yield data
            return
        self.started = True
        try:
            while True:
                chunk = self.inflater.decompress(data, CHUNK_BYTES)
                if chunk:
                    yield chunk
                data = self.inflater.unconsumed_tail
                if self.inflater.eof:
                    data = self.inflater.unused_data
                    if not data:
                        return
                    self.inflater = zlib.decompressobj(self.wbits)  # the next gzip member (after a deflate stream: an error)
                elif not data and len(chunk) < CHUNK_BYTES:
                    return  # all taken in, nothing held back
        except zlib.error as e:
            reason = re.sub(r"^Error -?\d+ while decompressing data: ", "", str(e))
            raise DownloadError(f"{self.url}: the compressed body is malformed ({reason})") from None


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error, e.g. 'Connection refused'."""
    text = str(e)
    for pattern in (r"\[Errno -?\d+\] ([^'\")]+)", r"(Name or service not known|Connection refused)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return type(e).__name__


def unzip(target: Target, progress: Progress | None = None) -> Path:
    """Unzip the target's member beside the archive (streamed, its CRC checked by `zipfile`,
    renamed into place only when whole); return its path."""
    assert target.member is not None and target.extracted is not None
    try:
        with zipfile.ZipFile(target.path) as archive:
            info = archive.getinfo(target.member)

            def copy(out: IO[bytes]) -> None:
                done = 0
                try:
                    with archive.open(info) as member:
                        while chunk := member.read(1 << 20):
                            out.write(chunk)
                            done += len(chunk)
                            if progress is not None:
                                progress(done, info.file_size)
                except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # raised here, the write is not what failed
                    raise DownloadError(f"{target.path} is damaged: {e}") from None

            write_atomic(target.extracted, copy, "unzipped corpus")
    except KeyError:
        raise DownloadError(f"{target.path} does not hold {target.member}") from None
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a bad CRC, a damaged archive or member
        raise DownloadError(f"{target.path} is damaged: {e}") from None
    return target.extracted


def _unzipped_whole(target: Target) -> bool:
    """The member is unzipped, with the size the archive gives it."""
    assert target.member is not None and target.extracted is not None
    try:
        with zipfile.ZipFile(target.path) as archive:
            return target.extracted.stat().st_size == archive.getinfo(target.member).file_size
    except (OSError, KeyError, zipfile.BadZipFile):
        return False


def locate(source: str, progress: StageProgress | None = None) -> Path:
    """The local path of a corpus: a known name (downloaded into the cache on first use) or a path."""
    if source in KNOWN and not Path(source).exists():
        fetched = (lambda done, total: progress("downloading", done, total)) if progress else None
        unzipped = (lambda done, total: progress("unzipping", done, total)) if progress else None
        return download(resolve_target(source), progress=fetched, unzip_progress=unzipped)
    path = Path(source).expanduser()
    if not os.path.lexists(path):  # a link that loops exists: stat says why it cannot be read
        known = f"; known corpora: {', '.join(KNOWN)}" if os.sep not in source else ""
        raise CorpusError(f"corpus not found: {source}{known}")
    return path
