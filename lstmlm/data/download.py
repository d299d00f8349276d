"""Corpora by name: the known ones (name → URL, SHA-1), downloading them into the cache (home.py).

A download streams into a temporary file beside its destination, is checked against its SHA-1,
and only then renamed into place, so the cache never holds a partial or wrong file. The body
comes by `transfer.fetch_into`: resumed where a connection broke, bounded in size and rate. A known
corpus that comes zipped (enwik8) is then unzipped by the standard library, its member's CRC
checked, into the cache the same way. Reading and normalizing the text is the data
pipeline's first stage (`lstmlm.data`).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from ..atomic import locked, remove_leftovers, write_atomic
from ..errors import CorpusError, DownloadError
from .home import cache_dir
from .transfer import Progress, fetch_into

if TYPE_CHECKING:  # requests and urllib3 are imported where a download happens: the command line starts without them
    pass


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

MAX_BYTES = 4 << 30  # the default --max-bytes: above any text corpus in common use (enwik9 is 1 GB)
MAX_STEM_BYTES = 96  # of a URL's own name in its cache name (a file name holds 255 bytes; the digest tells URLs apart)
MAX_SUFFIX_BYTES = 16

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
    _make_directory(target)
    with locked(target.path.parent) as held:  # one download at a time into a folder: another process (a rank) fetching it is waited for
        if not force and is_cached(target):
            return target.corpus_path
        if held:  # what a download or unzipping killed midway left, as large as it got
            remove_leftovers(target.path)
            if target.extracted is not None:
                remove_leftovers(target.extracted)
        path = _fetch(target, progress, max_bytes)
        if target.member is not None:
            return unzip(target, unzip_progress)
        return path


def _make_directory(target: Target) -> None:
    try:
        target.path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {target.path.parent}: {e.strerror}") from None


def _fetch(target: Target, progress: Progress | None, max_bytes: int) -> Path:
    def download_and_verify(out: IO[bytes]) -> None:
        digest = fetch_into(out, target.url, max_bytes, progress)
        if target.sha1 is not None and digest != target.sha1:
            raise DownloadError(f"{target.url}: checksum mismatch (expected SHA-1 {target.sha1}, got {digest})")

    write_atomic(target.path, download_and_verify, "download")  # only a complete, verified file gets the name
    return target.path


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
