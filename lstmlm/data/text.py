"""Corpus text: reading files and directories as UTF-8, the normalizations, a file's summary.

`read_text` reads a small text whole (a prefix file, a text to inspect); a corpus for training
is read piece by piece instead (`encode.py`), with the same `normalize`. Imports no torch:
`lstmlm download` summarizes a file with it and starts at once.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorpusError
from .files import corpus_files

# A text read whole is at most what one command-line argument holds (Linux's MAX_ARG_STRLEN), so
# --file takes the texts --text takes. Inspecting keeps 24 bytes a character a hidden unit a
# layer (six gates in float32): 128 Ki characters of a 256-unit layer are already 800 MB.
MAX_TEXT_BYTES = 128 << 10


def read_text(path: str | Path, limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 file, or every file in a directory (sorted by name, joined), as one string of
    at most `limit` bytes. Only regular files are read: a FIFO would block, and a device such
    as /dev/zero would be read until memory runs out."""
    path = Path(path)
    files = [path]
    if path.is_dir():
        files = corpus_files(path)
        if not files:
            raise CorpusError(f"corpus directory {path} holds no files")
    texts, left = [], limit
    for p in files:
        data = _read_bytes(p, left)
        if len(data) > left:
            raise CorpusError(f"{path} is too long to read whole (over {limit:,} bytes): give a part of it")
        left -= len(data)
        texts.append(_decode(p, data))
    return "".join(texts)


def _read_bytes(path: Path, limit: int) -> bytes:
    """At most `limit` + 1 bytes of a regular file (one more than the limit says it is longer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: opening a FIFO waits for no writer
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise CorpusError(f"corpus path is a directory: {path}" if stat.S_ISDIR(mode) else f"{path} is not a regular file: a text is read from a file")
        with os.fdopen(fd, "rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        raise CorpusError(f"corpus file not found: {path}") from None
    except OSError as e:
        raise CorpusError(f"cannot read corpus {path}: {e.strerror}") from None


def _decode(path: Path, data: bytes) -> str:
    if not data:
        raise CorpusError(f"corpus {path} is empty")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CorpusError(f"corpus {path} looks binary (NUL byte at offset {nul})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus {path} is not UTF-8 (invalid byte at offset {e.start})") from None


_NOT_LETTERS = re.compile("[^A-Za-z]+")


def normalize(text: str, mode: str) -> str:
    """`d2l`: the seed's preprocessing; `raw`: the text unchanged; `bytes`: its UTF-8 bytes, each
    as the character of that code point (a byte-level model's symbols; see `as_text`).

    d2l reads with readlines() (universal newlines), maps each run of non-letters to one space,
    strips and lowercases every line, then joins the lines with no separator at all.
    """
    if mode == "raw":
        return text
    if mode == "bytes":
        return text.encode("utf-8", "surrogateescape").decode("latin-1")
    if mode != "d2l":
        raise CorpusError(f"unknown normalization '{mode}' (expected d2l, raw or bytes)")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(_NOT_LETTERS.sub(" ", line).strip().lower() for line in lines)


def token_unit(mode: str | None) -> str:
    """What a token is under `mode`, and so what bits are counted per: a byte, else a character."""
    return "byte" if mode == "bytes" else "character"


def bits_abbreviation(unit: str) -> str:
    """'bpb' (bits per byte) or 'bpc' (bits per character), for a `token_unit`."""
    return "bpb" if unit == "byte" else "bpc"


def as_text(symbols: str, mode: str) -> str:
    """A model's symbols as text to show: in bytes mode the bytes decoded as UTF-8 (a sequence
    cut mid-character shows U+FFFD), otherwise the symbols themselves."""
    if mode != "bytes":
        return symbols
    return symbols.encode("latin-1").decode("utf-8", "replace")


@dataclass(frozen=True)
class Summary:
    bytes: int
    characters: int | None  # None where the file is not UTF-8 text
    distinct: int  # distinct characters (of a UTF-8 file), else distinct bytes


def summarize(path: Path, chunk_bytes: int = 1 << 20) -> Summary:
    """A file's size, characters and distinct symbols, read a chunk at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, characters = 0, 0
    chars: set[str] = set()
    byte_seen = bytearray(256)
    text_ok = True
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            size += len(chunk)
            for b in set(chunk):
                byte_seen[b] = 1
            if text_ok:
                try:
                    piece = decoder.decode(chunk)
                except UnicodeDecodeError:
                    text_ok = False
                    continue
                characters += len(piece)
                chars.update(piece)
    if text_ok:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            text_ok = False
    if text_ok and not byte_seen[0]:  # UTF-8 without NUL bytes: text
        return Summary(size, characters, len(chars))
    return Summary(size, None, sum(byte_seen))
