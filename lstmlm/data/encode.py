"""Encoding a corpus a piece at a time: what each worker process runs (numpy and the standard
library only, so a worker starts in a fraction of a second).

A corpus — its files one after the other — is cut into pieces of about `piece_bytes` where a
cut changes nothing about how the text reads:

    bytes   anywhere
    raw     at a character boundary (never before a UTF-8 continuation byte), or between files
    d2l     after a line end ("\\n" or "\\r"): d2l normalizes line by line, and the lines of the
            files run on into each other (a file without a final newline continues its last
            line into the next file, as reading the files whole and joining them does)

so each piece is scanned and encoded on its own, and the pieces' results are exactly the whole
text's. Two passes, each a map over the pieces: `scan` (problems, the characters and their
counts, the length in tokens) and `encode` (ids written into the store at the piece's offset).
A piece holds at most a few times `piece_bytes` in memory, whatever the corpus's size.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from ..errors import CorpusError
from .text import normalize

UNK = "<unk>"
LINE_ENDS = (b"\n", b"\r")
LOOKUP_BLOCK = 1 << 22  # characters looked up at a time: bounds the lookup's temporaries


@dataclass(frozen=True)
class Segment:
    """Bytes [start, end) of one corpus file."""

    file: int  # the file's index in the selection
    path: str
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


Piece = tuple[Segment, ...]


# ---- planning the pieces (in the parent, reading only a few bytes around each cut) ------------


def plan(paths: list[str], sizes: list[int], mode: str, piece_bytes: int, indices: list[int] | None = None) -> list[Piece]:
    """The corpus's files in order, cut into pieces of about `piece_bytes` at safe points.

    Small files share a piece; a large file spans several. `indices` names each file's index in
    the selection (default: its position here)."""
    indices = indices if indices is not None else list(range(len(paths)))
    pieces: list[Piece] = []
    current: list[Segment] = []
    filled = 0
    for index, path, size in zip(indices, paths, sizes):
        pos = 0
        while pos < size:
            room = piece_bytes - filled
            cut = None if size - pos <= room else _find_cut(path, pos + max(room, 0), size, mode)
            if cut is None:  # the rest of the file fits, or holds no safe cut: all of it here
                current.append(Segment(index, path, pos, size))
                filled += size - pos
                break
            if cut > pos:
                current.append(Segment(index, path, pos, cut))
            pieces.append(tuple(current))
            current, filled, pos = [], 0, cut
        if filled >= piece_bytes and (mode != "d2l" or _ends_a_line(path, size)):
            pieces.append(tuple(current))
            current, filled = [], 0
    if current:
        pieces.append(tuple(current))
    return pieces


def _find_cut(path: str, offset: int, size: int, mode: str) -> int | None:
    """The first safe cut at or after `offset` (and before `size`), or None."""
    if offset >= size:
        return None
    if mode == "bytes":
        return offset
    try:
        return _cut_at_or_after(path, offset, size, mode)
    except OSError:  # all of it in this piece: the scan finds it unreadable, and skips or refuses it
        return None


def _cut_at_or_after(path: str, offset: int, size: int, mode: str) -> int | None:
    """`_find_cut`, reading the file: an OSError where it cannot be read."""
    with open(path, "rb") as f:
        if mode == "raw":  # before a byte that starts a character (a valid one has ≤ 3 continuation bytes)
            f.seek(offset)
            window = f.read(4)
            for i, byte in enumerate(window):
                if byte & 0xC0 != 0x80:
                    return offset + i
            return offset if offset + len(window) < size else None
        f.seek(offset - 1 if offset > 0 else 0)  # d2l: after the first line end from offset - 1 on
        start = f.tell()
        while block := f.read(1 << 16):
            ends = [i for i in (block.find(e) for e in LINE_ENDS) if i >= 0]
            if ends:
                cut = start + min(ends) + 1
                return cut if cut < size else None
            start += len(block)
    return None


def _ends_a_line(path: str, size: int) -> bool:
    """The file's last byte ends a line (so the next file starts a new one)."""
    if size == 0:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(size - 1)
            return f.read(1) in LINE_ENDS
    except OSError:  # the scan finds it unreadable; until then the piece goes on
        return False


# ---- reading a piece -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why a file cannot be read as text: it cannot be read at all (no permission, gone since it
    was listed, an I/O error), a NUL byte (binary) or bytes that are not UTF-8."""

    file: int
    kind: str  # "io", "nul" or "utf8"
    offset: int  # in the file
    error: str = ""  # the OS's reason, for "io"


def _read(segment: Segment) -> bytes:
    """A segment's bytes. A file that cannot be read, or changed since it was listed, is a
    CorpusError (an OSError here would read as a store that cannot be written)."""
    try:
        return _segment_bytes(segment)
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {segment.path}: {e.strerror or e}") from None


def _segment_bytes(segment: Segment) -> bytes:
    """A segment's bytes: an OSError where its file cannot be read (the scan skips such a file),
    a CorpusError where it is shorter than when listed."""
    with open(segment.path, "rb") as f:
        f.seek(segment.start)
        data = f.read(segment.size)
    if len(data) != segment.size:
        raise CorpusError(f"corpus file {segment.path} changed while it was read (it is shorter than when listed)")
    return data


def _unreadable(segment: Segment, e: OSError) -> Problem:
    return Problem(segment.file, "io", segment.start, e.strerror or str(e))


def _unopenable(piece: Piece) -> list[Problem]:
    """The problems of the segments whose file cannot be opened (bytes mode reads none in its
    scan: a file it cannot read is found here, before the encoding pass would fail on it)."""
    problems = []
    for segment in piece:
        try:
            open(segment.path, "rb").close()
        except OSError as e:
            problems.append(_unreadable(segment, e))
    return problems


def _texts(piece: Piece) -> tuple[list[str | bytes], list[Problem]]:
    """Each segment's text — as ASCII bytes where it is pure ASCII (no decoding needed), else as
    a decoded str — and the problems of those that cannot be read or are not text."""
    texts: list[str | bytes] = []
    problems: list[Problem] = []
    for segment in piece:
        try:
            data = _segment_bytes(segment)
        except OSError as e:  # a problem like a NUL byte: the file is skipped, or refused under --strict
            problems.append(_unreadable(segment, e))
            continue
        nul = data.find(b"\x00")
        if nul >= 0:
            problems.append(Problem(segment.file, "nul", segment.start + nul))
            continue
        if data.isascii():
            texts.append(data)
            continue
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(Problem(segment.file, "utf8", segment.start + e.start))
    return texts, problems


def _code_points(text: str | bytes) -> np.ndarray:
    """The code points of a text: its bytes as they are for ASCII, UTF-32 otherwise."""
    if isinstance(text, bytes):
        return np.frombuffer(text, dtype=np.uint8)
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _normalized(texts: list[str | bytes], mode: str) -> list[str | bytes]:
    """raw: the texts as they are; d2l: the piece's text, joined and normalized (ASCII bytes)."""
    if mode == "raw":
        return texts
    joined = "".join(t.decode("ascii") if isinstance(t, bytes) else t for t in texts)
    return [normalize(joined, "d2l").encode("ascii")]


# ---- pass 1: scan -------------------------------------------------------------------------------


@dataclass
class Scan:
    problems: list[Problem]
    length: int  # tokens this piece gives
    chars: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # code points present
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # how often each
    first: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # first offset of each in the piece (d2l only)


def scan(piece: Piece, mode: str) -> Scan:
    """A piece's problems, length in tokens and character counts (with first offsets in d2l
    mode, whose vocabulary breaks count ties by first appearance)."""
    if mode == "bytes":
        return Scan(_unopenable(piece), sum(s.size for s in piece))
    texts, problems = _texts(piece)
    texts = _normalized(texts, mode)
    counts = np.zeros(0, dtype=np.int64)
    length = 0
    for text in texts:
        cps = _code_points(text)
        length += len(cps)
        if len(cps):
            found = np.bincount(cps, minlength=1)
            if len(found) > len(counts):
                found[: len(counts)] += counts
                counts = found
            else:
                counts[: len(found)] += found
    chars = np.flatnonzero(counts)
    result = Scan(problems, length, chars, counts[chars])
    if mode == "d2l" and texts:
        text = texts[0]  # one text of ASCII bytes in d2l mode
        assert isinstance(text, bytes)
        result.first = np.array([text.find(bytes([c])) for c in chars.tolist()], dtype=np.int64)
    return result


# ---- pass 2: encode -------------------------------------------------------------------------------


def lookup_table(tokens: list[str]) -> np.ndarray:
    """Code point → id (-1 for a character outside the vocabulary; the last entry takes every
    larger code point)."""
    chars = tokens[1:] if tokens and tokens[0] == UNK else tokens
    offset = len(tokens) - len(chars)
    cps = np.array([ord(c) for c in chars], dtype=np.int64)
    table = np.full(int(cps.max()) + 2, -1, dtype=np.int32)
    table[cps] = np.arange(offset, offset + len(chars), dtype=np.int32)
    return table


def ids_of(text: str | bytes, table: np.ndarray, dtype: str) -> tuple[np.ndarray, int]:
    """A text's ids in the store's dtype, and how many of its characters were outside the
    vocabulary (read as <unk>, id 0)."""
    cps = _code_points(text)
    out = np.empty(len(cps), dtype=dtype)
    unknown = 0
    last = len(table) - 1  # where every code point beyond the table is clamped to (-1 there)
    for start in range(0, len(cps), LOOKUP_BLOCK):
        block = cps[start : start + LOOKUP_BLOCK]
        if last < np.iinfo(block.dtype).max:
            block = np.minimum(block, block.dtype.type(last))
        ids = table[block]
        missing = ids < 0
        if missing.any():
            unknown += int(missing.sum())
            ids[missing] = 0
        out[start : start + len(ids)] = ids
    return out, unknown


def encode(piece: Piece, mode: str, tokens: list[str], dtype: str, out_path: str | None, offset: int) -> tuple[int, np.ndarray | None]:
    """Write a piece's ids into `out_path` at byte `offset` (or, without a path, return them);
    returns how many characters were outside the vocabulary, and the ids where not written."""
    if mode == "bytes":
        parts = [np.frombuffer(_read(s), dtype=np.uint8) for s in piece]
        unknown = 0
    else:
        texts, problems = _texts(piece)
        if problems:  # the scan found none: the file changed since
            raise CorpusError(f"corpus file {piece[0].path} changed while the corpus was encoded")
        table = lookup_table(tokens)
        parts, unknown = [], 0
        for text in _normalized(texts, mode):
            ids, missing = ids_of(text, table, dtype)
            parts.append(ids)
            unknown += missing
    if out_path is None:
        return unknown, np.concatenate(parts) if parts else np.empty(0, dtype=dtype)
    fd = os.open(out_path, os.O_WRONLY)
    try:
        for ids in parts:
            view = memoryview(ids.tobytes() if not ids.flags.c_contiguous else ids.data).cast("B")
            while view:
                written = os.pwrite(fd, view, offset)
                offset += written
                view = view[written:]
    finally:
        os.close(fd)
    return unknown, None


# ---- the store's checksums ------------------------------------------------------------------------


def crc(path: str, offset: int, size: int) -> int:
    """The CRC-32 of `size` bytes of a file from `offset` (a block of a store's ids)."""
    with open(path, "rb") as f:
        return crc_of(f, offset, size)


def crc_of(f: BinaryIO, offset: int, size: int, chunk: int = 1 << 20) -> int:
    """The CRC-32 of `size` bytes of an open file from `offset`, read a chunk at a time."""
    f.seek(offset)
    value = 0
    while size > 0 and (data := f.read(min(chunk, size))):
        value = zlib.crc32(data, value)
        size -= len(data)
    return value
