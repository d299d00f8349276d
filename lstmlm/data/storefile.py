"""A token store's file: a corpus's ids behind a header, read through a memory map, and checked.

    lstmlm-tokens 1 0000000000004096\\n      the magic line and where the ids begin
    {"vocab": [...], "dtype": "uint8", "length": ..., "source_sha1": ..., ...}\\n   padded to a page
    ids                                      `length` ids, little-endian, in the narrowest dtype the
                                             vocabulary allows: uint8 up to 256 symbols, uint16 up to
                                             65,536, else int32

The store is not trusted blindly. Its header holds a CRC-32 of every BLOCK_BYTES of the ids
(4 MiB: a 20 GB store has 5,000, some 55 KB of header), one of the header itself, and the
modification time the file was given when it was written (`written_ns`, a whole second). Each
open checks the header's CRC and SAMPLED_BLOCKS blocks chosen at random — at most 8 MiB read
and checksummed, a few milliseconds, whatever the store's size. A store whose modification
time is not the one it was written with has been written to since (a program, `dd`, a copy
without -p): it is checked in full once (a 20 GB store, some 20 s at 1 GB/s), and if sound its
time is set back so that the next open samples again. A mismatch anywhere — or a header that
does not parse, a store of another version — makes it damaged (`Damaged`). Writing one
(store.py) reserves the header's room first (`header_room`), writes the ids, checksums them
(`blocks`) and then writes the header (`sealed_header`).

Training, validation and every rank read it through a copy-on-write memory map (`np.memmap`,
then `torch.from_numpy`): slicing is free and only the pages a batch touches are read, so no
process ever holds the corpus in memory in any dtype; the pages are the file's, clean, and
the kernel drops them when memory is short.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import VocabError
from ..vocab import Vocab
from . import encode

MAGIC = b"lstmlm-tokens 1 "
FORMAT_VERSION = 2  # 2: with checksums (a version 1 store, without, is rebuilt)
BLOCK_BYTES = 4 << 20  # the ids are checksummed in blocks of this many bytes
SAMPLED_BLOCKS = 2  # blocks checked at each open of a store nobody has written to since it was made
CRC_WIDTH = 0xFFFFFFFF  # the widest CRC-32: the header's room is reserved with it
PAGE = 4096
DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


def dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every id of a vocabulary."""
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65_536 else "int32"


@dataclass(frozen=True)
class TokenStore:
    vocab: Vocab
    ids: torch.Tensor  # (length,) in the store's dtype: a view of the mapped file (or of memory)
    source_sha1: str  # the content hash of the corpus files read
    unknown: int  # characters outside the vocabulary, read as <unk>
    path: Path | None  # where it lives in the cache; None for a temporary copy


def header(meta: dict[str, Any], offset: int | None = None) -> bytes:
    """The magic line and the metadata as one JSON line, padded with spaces to `offset` (by
    default the next whole page)."""
    body = json.dumps(meta, ensure_ascii=True).encode() + b"\n"
    first = len(MAGIC) + 17
    offset = offset if offset is not None else -(-(first + len(body)) // PAGE) * PAGE
    if first + len(body) > offset:
        raise ValueError("the store's header does not fit before its ids")
    return MAGIC + f"{offset:016d}\n".encode() + body + b" " * (offset - first - len(body))


class Damaged(Exception):
    """A store file that is there but cannot be trusted; the message says why."""


def open_store(path: Path) -> TokenStore | None:
    """A store file, mapped and checked; None if it is missing or damaged in any way."""
    try:
        return read_store(path)
    except Damaged:
        return None


def read_store(path: Path) -> TokenStore | None:
    """A store file, mapped, its header checked and its blocks sampled (all of them if it was
    written to since it was made); None if there is none, Damaged if it cannot be trusted."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            offset, meta = _read_header(f)
            store = _checked_store(path, meta, offset, st.st_size)
            touched = st.st_mtime_ns != meta["written_ns"]
            _check_blocks(f, meta["checksums"], offset, everything=touched)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise Damaged(f"it cannot be read ({e.strerror or e})") from None
    if touched:  # checked in full and sound: the next open only samples (where the cache can be written)
        with contextlib.suppress(OSError):
            os.utime(path, ns=(st.st_atime_ns, meta["written_ns"]))
    return store


def _read_header(f: Any) -> tuple[int, dict[str, Any]]:
    first = f.read(len(MAGIC) + 17)
    if not first.startswith(MAGIC) or not first.endswith(b"\n"):
        raise Damaged("it is not a token store (no magic line)")
    try:
        offset = int(first[len(MAGIC) : -1])
        meta = json.loads(f.read(offset - len(first)))
    except (ValueError, RecursionError):
        raise Damaged("its header does not parse") from None
    if not isinstance(meta, dict) or meta.get("format") != "lstmlm-tokens" or meta.get("version") != FORMAT_VERSION:
        raise Damaged(f"it is not a version {FORMAT_VERSION} token store")
    if meta.get("meta_crc") != meta_crc(meta):
        raise Damaged("its header fails its checksum")
    return offset, meta


def _checked_store(path: Path, meta: dict[str, Any], offset: int, size: int) -> TokenStore:
    """The store the header describes, mapped, once the header agrees with itself and the file's size."""
    try:
        vocab = Vocab(meta["vocab"])
        dtype, length = meta["dtype"], meta["length"]
        if dtype != dtype_for(len(vocab)) or not isinstance(length, int):
            raise Damaged("its header is inconsistent")
        nbytes = length * np.dtype(dtype).itemsize
        if size != offset + nbytes:
            raise Damaged(f"it is {size:,} bytes, not {offset + nbytes:,}")
        if meta["block_bytes"] != BLOCK_BYTES or len(meta["checksums"]) != -(-nbytes // BLOCK_BYTES) or not isinstance(meta["written_ns"], int):
            raise Damaged("its checksums do not cover its ids")
        return TokenStore(vocab, _mapped(path, dtype, offset, length), str(meta["source_sha1"]), int(meta.get("unknown", 0)), path)
    except (KeyError, TypeError, ValueError, VocabError):
        raise Damaged("its header is inconsistent") from None


def _check_blocks(f: Any, checksums: list[int], offset: int, everything: bool) -> None:
    """Check every block's CRC, or SAMPLED_BLOCKS of them at random; Damaged on a mismatch."""
    blocks = range(len(checksums)) if everything else random.sample(range(len(checksums)), min(SAMPLED_BLOCKS, len(checksums)))
    for k in blocks:
        if encode.crc_of(f, offset + k * BLOCK_BYTES, BLOCK_BYTES) != checksums[k]:  # the last block may be shorter: read to the end
            raise Damaged(f"block {k + 1:,} of its {len(checksums):,} fails its checksum")


def meta_crc(meta: dict[str, Any]) -> int:
    """The header's own CRC-32: of its JSON with keys sorted, less this field."""
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "meta_crc"}, sort_keys=True).encode())


def _mapped(path: Path, dtype: str, offset: int, length: int) -> torch.Tensor:
    if length == 0:
        return torch.empty(0, dtype=DTYPES[dtype])
    # copy-on-write ("c"): writable for torch, yet reading never dirties a page
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(length,)))


# ---- making one -------------------------------------------------------------------------------------


# ---- writing one ----------------------------------------------------------------------------------


def new_meta(mode: str, source_sha1: str, vocab: Vocab, dtype: str, length: int) -> dict[str, Any]:
    """The header of a store about to be written, before its ids are counted and checksummed."""
    return {
        "format": "lstmlm-tokens",
        "version": FORMAT_VERSION,
        "mode": mode,
        "source_sha1": source_sha1,
        "dtype": dtype,
        "length": length,
        "unknown": 0,
        "vocab": vocab.tokens,
        "block_bytes": BLOCK_BYTES,
    }


def blocks(nbytes: int) -> list[tuple[int, int]]:
    """The checksummed blocks of `nbytes` of ids: (start, length) from the ids' first byte."""
    return [(start, min(BLOCK_BYTES, nbytes - start)) for start in range(0, nbytes, BLOCK_BYTES)]


def header_room(meta: dict[str, Any], nbytes: int) -> int:
    """Where the ids begin: room for the header with any count of unknown characters and any checksums."""
    widest = {"unknown": 10**20, "written_ns": 10**20, "checksums": [CRC_WIDTH] * len(blocks(nbytes)), "meta_crc": CRC_WIDTH}
    return len(header({**meta, **widest}))


def sealed_header(meta: dict[str, Any], unknown: int, checksums: list[int], offset: int) -> tuple[bytes, int]:
    """The header of the ids as written, and the modification time to give the file after its
    last write (a whole second: every filesystem keeps it exactly)."""
    written_ns = time.time_ns() // 10**9 * 10**9
    meta = {**meta, "unknown": unknown, "checksums": checksums, "written_ns": written_ns}
    return header({**meta, "meta_crc": meta_crc(meta)}, offset), written_ns
