"""The token store: a corpus's ids in one file, read through a memory map.

A store file is a header and the ids:

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
does not parse, a store of another version — makes it damaged (`Damaged`): it is deleted and
rebuilt, with one warning line. Writing costs one more parallel pass over the ids just written
(from the page cache), to checksum them.

Training, validation and every rank read it through a copy-on-write memory map (`np.memmap`,
then `torch.from_numpy`): slicing is free and only the pages a batch touches are read, so no
process ever holds the corpus in memory in any dtype; the pages are the file's, clean, and
the kernel drops them when memory is short.

`encode_corpus` makes one, streaming: the corpus is cut into pieces (encode.py), scanned for
its characters (one pass: counts per piece, merged into the vocabulary) while the parent
hashes the files (each over the size it was listed at: exactly the bytes encoded), then encoded into the file at each piece's offset — both passes on every
core, with a progress callback per stage. The file is written under a temporary name and
renamed when complete. Where the cache cannot take it (a full disk, no permission), the
store is made in a temporary file in `scratch` (unlinked once mapped), or for a small corpus
in memory — with one warning, never an error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import multiprocessing
import os
import random
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from ..atomic import file_mode, publish
from ..corpus import StageProgress
from ..errors import CorpusError, VocabError
from ..vocab import Vocab
from . import cache, encode
from .encode import Piece, Problem, Scan
from .files import CorpusFile, Selection, Skipped

MAGIC = b"lstmlm-tokens 1 "
FORMAT_VERSION = 2  # 2: with checksums (a version 1 store, without, is rebuilt)
BLOCK_BYTES = 4 << 20  # the ids are checksummed in blocks of this many bytes
SAMPLED_BLOCKS = 2  # blocks checked at each open of a store nobody has written to since it was made
CRC_WIDTH = 0xFFFFFFFF  # the widest CRC-32: the header's room is reserved with it
PAGE = 4096
PIECE_BYTES = 8 << 20  # a piece of the corpus per job: bounds a worker's memory to ~100 MB
WORKERS = 0  # processes encoding at once; 0 = one per core this process may use
MEMORY_FALLBACK_BYTES = 256 << 20  # with no disk to write to, a store this small is kept in memory
DTYPES = {"uint8": torch.uint8, "uint16": torch.uint16, "int32": torch.int32}


def dtype_for(vocab_size: int) -> str:
    """The narrowest dtype that holds every id of a vocabulary."""
    return "uint8" if vocab_size <= 256 else "uint16" if vocab_size <= 65_536 else "int32"


def bytes_vocab() -> Vocab:
    """Bytes mode: 256 symbols, id = byte value, no <unk> (every byte is known)."""
    return Vocab([chr(b) for b in range(256)])


@dataclass(frozen=True)
class TokenStore:
    vocab: Vocab
    ids: torch.Tensor  # (length,) in the store's dtype: a view of the mapped file (or of memory)
    source_sha1: str  # the content hash of the corpus files read
    unknown: int  # characters outside the vocabulary, read as <unk>
    path: Path | None  # where it lives in the cache; None for a temporary copy


@dataclass(frozen=True)
class Encoded:
    store: TokenStore
    skipped: tuple[Skipped, ...]  # files of a directory or glob that were left out
    warnings: tuple[str, ...]  # e.g. the store could not be written in the cache


# ---- the file -------------------------------------------------------------------------------------


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
    if meta.get("meta_crc") != _meta_crc(meta):
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


def _meta_crc(meta: dict[str, Any]) -> int:
    """The header's own CRC-32: of its JSON with keys sorted, less this field."""
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "meta_crc"}, sort_keys=True).encode())


def _mapped(path: Path, dtype: str, offset: int, length: int) -> torch.Tensor:
    if length == 0:
        return torch.empty(0, dtype=DTYPES[dtype])
    # copy-on-write ("c"): writable for torch, yet reading never dirties a page
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=offset, shape=(length,)))


# ---- making one -------------------------------------------------------------------------------------


def encode_corpus(
    selection: Selection,
    mode: str,
    vocab: Vocab | None = None,
    strict: bool = False,
    progress: StageProgress | None = None,
    scratch: Path | None = None,
) -> Encoded:
    """The corpus as a token store: from the cache when its files are unchanged (not a byte of
    the text read), else encoded and stored. The vocabulary is built from the text (`<unk>` then
    the characters: by frequency in d2l mode, by code point in raw mode; the 256 bytes in bytes
    mode) unless one is given (a resumed run keeps its own)."""
    signature = selection.signature(mode)
    damaged: list[str] = []  # a line for each store found damaged (deleted, and made again)
    with cache.locked(signature):
        known = cache.read_index(signature)
        if known is not None and (store := _cached(known.sha1, mode, vocab, damaged)) is not None:
            if strict and known.skipped:  # skipped when the store was made; refused now
                raise CorpusError(_refusal(known.skipped[0]))
            return Encoded(store, known.skipped, (*selection.warnings, *damaged))
        started = cache.now_ns()
        with Workers() as workers:
            scanned = _scan(selection, mode, strict, progress, workers)
            cache.write_index(signature, selection, cache.IndexEntry(scanned.sha1, scanned.skipped), started)
            if (store := _cached(scanned.sha1, mode, vocab, damaged)) is not None:
                return Encoded(store, scanned.skipped, (*selection.warnings, *damaged))
            if scanned.length == 0:
                raise CorpusError(f"corpus {selection.source} is empty after {mode} normalization")
            built = bytes_vocab() if mode == "bytes" else _vocab(scanned)
            target = vocab or built
            where = cache.store_path(scanned.sha1, mode, None if target == built else target)
            store, warnings = _write(scanned, target, where, progress, scratch, workers)
        if (changed := _changed(selection)) is not None:
            store, warnings = _uncached(store), (*warnings, f"corpus file {changed} changed while it was read: its token store is not kept")
        return Encoded(store, scanned.skipped, (*selection.warnings, *damaged, *warnings))


def _changed(selection: Selection) -> Path | None:
    """A file whose size, modification time or inode is not what the listing saw, if any.
    A file that only grew was encoded and hashed as listed (its first `size` bytes); one
    rewritten in place meanwhile may have been hashed, scanned and encoded as different texts."""
    for f in selection.files:
        try:
            st = os.stat(f.path)
        except OSError:
            return f.path
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (f.size, f.mtime_ns, f.inode):
            return f.path
    return None


def _uncached(store: TokenStore) -> TokenStore:
    """The store, taken out of the cache (the mapping keeps its data for this process)."""
    if store.path is not None:
        with contextlib.suppress(OSError):
            store.path.unlink()
    return TokenStore(store.vocab, store.ids, store.source_sha1, store.unknown, None)


def _cached(sha1: str, mode: str, vocab: Vocab | None, damaged: list[str]) -> TokenStore | None:
    """The store of this content, under `vocab` if one is given. A damaged one is deleted, to be
    made again, and said so in `damaged`."""
    for path in (cache.store_path(sha1, mode), *([cache.store_path(sha1, mode, vocab)] if vocab is not None else [])):
        try:
            store = read_store(path)
        except Damaged as e:
            damaged.append(f"the token store {path} was damaged ({e}): made again from the corpus")
            with contextlib.suppress(OSError):
                path.unlink()
            continue
        if store is not None and (vocab is None or store.vocab == vocab):
            return store
    return None


# ---- pass 1: hash and scan ----------------------------------------------------------------------


@dataclass(frozen=True)
class Scanned:
    mode: str
    sha1: str
    pieces: list[Piece]
    scans: list[Scan]
    skipped: tuple[Skipped, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.scans)


def _scan(selection: Selection, mode: str, strict: bool, progress: StageProgress | None, workers: Workers) -> Scanned:
    """Hash every file (in a thread: hashlib releases the GIL) while the pieces are scanned. A file
    that is empty is skipped at once; one that is not text is skipped and the rest scanned again
    without it (rare: the pieces around it may have read across it)."""
    skipped = _empty(selection, strict)
    files = [i for i in range(len(selection.files)) if i not in skipped]
    digests: dict[int, str] = {}
    hashing = threading.Thread(target=_hash_files, args=([selection.files[i] for i in files], files, digests), daemon=True)
    hashing.start()
    try:
        while True:
            chosen = [selection.files[i] for i in files]
            pieces = encode.plan([str(f.path) for f in chosen], [f.size for f in chosen], mode, PIECE_BYTES, files)
            scans = workers.run(encode.scan, [(p, mode) for p in pieces], pieces, "reading", progress)
            bad = _problems(selection, [p for s in scans for p in s.problems], strict)
            if not bad:
                break
            skipped.update(bad)
            files = [i for i in files if i not in bad]
            if not files:
                raise CorpusError(f"no file of corpus {selection.source} is readable text ({len(skipped)} skipped)")
    finally:
        hashing.join()
    missing = [selection.files[i].path for i in files if i not in digests]
    if missing:
        raise CorpusError(f"cannot read corpus file {missing[0]}, or it is shorter than when it was listed")
    if selection.many:
        sha1 = hashlib.sha1("".join(digests[i] for i in files).encode()).hexdigest()
    else:
        sha1 = digests[files[0]]
    return Scanned(mode, sha1, pieces, scans, tuple(skipped[i] for i in sorted(skipped)))


def _refusal(skipped: Skipped) -> str:
    why = skipped.reason if skipped.reason.startswith("looks") else f"is {skipped.reason}"
    return f"corpus file {skipped.path} {why} (--strict: no file is skipped)"


def _empty(selection: Selection, strict: bool) -> dict[int, Skipped]:
    """The empty files, by index: skipped (or refused: a single file, or under --strict)."""
    empty = {}
    for i, f in enumerate(selection.files):
        if f.size > 0:
            continue
        if not selection.many:
            raise CorpusError(f"corpus {f.path} is empty")
        empty[i] = Skipped(str(f.path), "empty", 0)
        if strict:
            raise CorpusError(_refusal(empty[i]))
    if len(empty) == len(selection.files):
        raise CorpusError(f"every file of corpus {selection.source} is empty")
    return empty


def _hash_files(files: list[CorpusFile], indices: list[int], digests: dict[int, str]) -> None:
    """Each file's SHA-1 over exactly the bytes the pieces encode: its first `size` bytes, the
    size it had when listed. A file that grows meanwhile (a log being written) keys the store
    by what was encoded, not by bytes that were never read. A file now shorter gets no digest."""
    for i, f in zip(indices, files):
        digest, left = hashlib.sha1(), f.size
        with contextlib.suppress(OSError), open(f.path, "rb") as stream:  # a read error surfaces in the scan
            while left > 0 and (chunk := stream.read(min(1 << 18, left))):
                digest.update(chunk)
                left -= len(chunk)
            if left == 0:
                digests[i] = digest.hexdigest()


def _problems(selection: Selection, problems: list[Problem], strict: bool) -> dict[int, Skipped]:
    """The files that are not text, each with its first problem (a NUL byte, as reading the file
    whole finds it, before any invalid UTF-8); an error for a single file or under --strict."""
    first: dict[int, Problem] = {}
    for p in problems:
        seen = first.get(p.file)
        if seen is None or (p.kind, p.offset) < (seen.kind, seen.offset):  # "nul" sorts before "utf8"
            first[p.file] = p
    bad = {}
    for i, p in sorted(first.items()):
        f = selection.files[i]
        reason = f"looks binary (NUL byte at offset {p.offset})" if p.kind == "nul" else f"is not UTF-8 (invalid byte at offset {p.offset})"
        if not selection.many:
            raise CorpusError(f"corpus {f.path} {reason}")
        bad[i] = Skipped(str(f.path), reason.removeprefix("is "), f.size)
        if strict:
            raise CorpusError(_refusal(bad[i]))
    return bad


def _vocab(scanned: Scanned) -> Vocab:
    """The vocabulary of the scanned text: the pieces' counts merged one piece at a time (their
    first offsets made global), in memory proportional to the distinct characters only."""
    chars = np.empty(0, dtype=np.int64)
    counts = np.empty(0, dtype=np.int64)
    first = np.empty(0, dtype=np.int64)
    start = 0
    for s in scanned.scans:
        merged = np.union1d(chars, s.chars)
        into_old, into_new = np.searchsorted(merged, chars), np.searchsorted(merged, s.chars)
        counts_, first_ = np.zeros(len(merged), np.int64), np.full(len(merged), np.iinfo(np.int64).max, np.int64)
        counts_[into_old], first_[into_old] = counts, first
        counts_[into_new] += s.counts
        if scanned.mode == "d2l":
            first_[into_new] = np.minimum(first_[into_new], start + s.first)
        chars, counts, first = merged, counts_, first_
        start += s.length
    if not len(chars):
        raise CorpusError("the corpus holds no characters")
    order = "frequency" if scanned.mode == "d2l" else "codepoint"
    return Vocab.from_stats(chars, counts, first, order)


# ---- pass 2: encode into the store ------------------------------------------------------------------


def _write(
    scanned: Scanned, vocab: Vocab, where: Path, progress: StageProgress | None, scratch: Path | None, workers: Workers
) -> tuple[TokenStore, tuple[str, ...]]:
    """Encode into `where` in the cache; failing that, a temporary file in `scratch`; failing
    that too, memory (small corpora only)."""
    dtype = dtype_for(len(vocab))
    nbytes = scanned.length * np.dtype(dtype).itemsize
    try:
        return _into_file(scanned, vocab, dtype, where.parent, where, progress, workers), ()
    except OSError as e:
        cache_failure = f"cannot write the token store in {where.parent} ({_reason(e)})"
    scratch = scratch or Path(tempfile.gettempdir())
    try:
        store = _into_file(scanned, vocab, dtype, scratch, None, progress, workers)
        return store, (f"{cache_failure}; training from a temporary copy in {scratch}",)
    except OSError as e:
        scratch_failure = f"nor in {scratch} ({_reason(e)})"
    if nbytes > MEMORY_FALLBACK_BYTES:
        raise CorpusError(f"{cache_failure}, {scratch_failure}: free some space, or set LSTMLM_HOME to a disk with {nbytes:,} bytes free")
    return _into_memory(scanned, vocab, dtype, progress, workers), (f"{cache_failure}, {scratch_failure}; keeping the {nbytes:,} bytes of ids in memory",)


def _into_file(scanned: Scanned, vocab: Vocab, dtype: str, directory: Path, final: Path | None, progress: StageProgress | None, workers: Workers) -> TokenStore:
    """Write the store under a temporary name in `directory`; rename it to `final`, or (None)
    map it and unlink it at once: the mapping keeps the data, the disk is freed at exit."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final.name if final else 'lstmlm-tokens'}.", suffix=".tmp")
    tmp = Path(name)
    try:
        itemsize = np.dtype(dtype).itemsize
        meta = _meta(scanned, vocab, dtype)
        nbytes = scanned.length * itemsize
        blocks = -(-nbytes // BLOCK_BYTES)
        widest = {"unknown": 10**20, "written_ns": 10**20, "checksums": [CRC_WIDTH] * blocks, "meta_crc": CRC_WIDTH}
        offset = len(header({**meta, **widest}))  # room for any count of unknown characters, any checksums
        total = offset + nbytes
        with contextlib.suppress(OSError):  # reserve the space first: a full disk fails now, not mid-way
            os.posix_fallocate(fd, 0, total)
        os.ftruncate(fd, total)  # where fallocate is not supported (the space then taken as written)
        offsets = np.cumsum([0] + [s.length for s in scanned.scans])
        jobs = [(p, scanned.mode, vocab.tokens, dtype, name, offset + int(o) * itemsize) for p, o in zip(scanned.pieces, offsets)]
        unknown = sum(u for u, _ in workers.run(encode.encode, jobs, scanned.pieces, "encoding", progress))
        crcs = [(name, offset + k * BLOCK_BYTES, min(BLOCK_BYTES, nbytes - k * BLOCK_BYTES)) for k in range(blocks)]
        small = nbytes <= 16 * BLOCK_BYTES  # a few tens of milliseconds: not worth starting processes for
        checksums = workers.run(encode.crc, crcs, [()] * blocks, "checksumming", None, in_process=small)  # the ids as written, read back
        written_ns = time.time_ns() // 10**9 * 10**9  # a whole second: every filesystem keeps it exactly
        meta = {**meta, "unknown": unknown, "checksums": checksums, "written_ns": written_ns}
        os.pwrite(fd, header({**meta, "meta_crc": _meta_crc(meta)}, offset), 0)
        os.fchmod(fd, file_mode())  # mkstemp made it private; a cache file need not be
        os.utime(fd, ns=(written_ns, written_ns))  # after the last write: a later write moves it
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if final is not None:
            publish(tmp, final)
            store = open_store(final)
        else:
            store = open_store(tmp)
            tmp.unlink()
            store = store and TokenStore(store.vocab, store.ids, store.source_sha1, store.unknown, None)
        if store is None:
            raise OSError(errno.EIO, "the store just written does not read back")
        return store
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def _into_memory(scanned: Scanned, vocab: Vocab, dtype: str, progress: StageProgress | None, workers: Workers) -> TokenStore:
    ids = np.empty(scanned.length, dtype=dtype)
    start, unknown = 0, 0
    jobs = [(p, scanned.mode, vocab.tokens, dtype, None, 0) for p in scanned.pieces]
    for missing, part in workers.run(encode.encode, jobs, scanned.pieces, "encoding", progress, in_process=True):
        assert part is not None
        ids[start : start + len(part)] = part
        start += len(part)
        unknown += missing
    return TokenStore(vocab, torch.from_numpy(ids), scanned.sha1, unknown, None)


def _meta(scanned: Scanned, vocab: Vocab, dtype: str) -> dict[str, Any]:
    return {
        "format": "lstmlm-tokens",
        "version": FORMAT_VERSION,
        "mode": scanned.mode,
        "source_sha1": scanned.sha1,
        "dtype": dtype,
        "length": scanned.length,
        "unknown": 0,
        "vocab": vocab.tokens,
        "block_bytes": BLOCK_BYTES,
    }


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


# ---- running jobs on every core ------------------------------------------------------------------


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker_setup() -> None:
    """Workers leave Ctrl-C to the parent, which stops them (no traceback from each); and
    hand each piece's buffers back to the kernel when done with them. A piece's text, decoded
    and widened to code points, is some 50-100 MB of short-lived blocks; glibc's malloc, by
    default, raises its mmap threshold after the first such free and serves the next ones from
    the heap, where they fragment: a worker grew to ~900 MB over a 10 GB corpus of non-ASCII
    text. A fixed threshold maps every large block and unmaps it at its free."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_R = TypeVar("_R")


def _trimmed(job: Callable[..., _R], *args: Any) -> _R:
    """`job(*args)` in a worker, then the heap's free memory handed back to the kernel. A
    piece's text, decoded and widened to code points, is some 50-100 MB of short-lived blocks
    that glibc's malloc serves from the heap after the first such free, where they fragment: a
    worker grew to ~900 MB over a 10 GB corpus of non-ASCII text. malloc_trim after each piece
    keeps it at about a piece's worth (~320 MB with the interpreter and numpy), for some 25%
    more encoding time on such text (a 10 GB corpus: 89 s against 70)."""
    try:
        return job(*args)
    finally:
        if _malloc_trim is not None:
            _malloc_trim(0)


def _libc_malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError):
        return cast(Callable[[int], int], ctypes.CDLL("libc.so.6").malloc_trim)
    return None


_malloc_trim = _libc_malloc_trim()


def _start_pool(workers: int) -> Executor:
    # spawn, not fork: this process has torch's threads (and maybe a progress bar's) running
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_setup)


class Workers:
    """The processes encoding runs on — one per core, started on first use (a corpus of one
    piece starts none) and shared by both passes — and the one way jobs are run on them."""

    def __init__(self) -> None:
        self._pool: Executor | None = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def run(
        self,
        job: Callable[..., Any],
        args: Sequence[tuple[Any, ...]],
        pieces: Sequence[Piece],
        stage: str,
        progress: StageProgress | None,
        in_process: bool = False,
    ) -> list[Any]:
        """`job(*a)` for each `a`, results in order; `progress(stage, bytes done, total)` as the
        pieces complete."""
        workers = 1 if in_process else max(1, min(WORKERS or _cores(), len(args)))
        if workers > 1 and self._pool is None:
            self._pool = _start_pool(workers)
        pool = self._pool if workers > 1 else None
        calls: Iterator[Any] = (job(*a) for a in args) if pool is None else (f.result() for f in [pool.submit(_trimmed, job, *a) for a in args])
        total = sum(s.size for p in pieces for s in p)
        done, results = 0, []
        for result, piece in zip(calls, pieces):
            results.append(result)
            done += sum(s.size for s in piece)
            if progress is not None:
                progress(stage, done, total)
        return results
