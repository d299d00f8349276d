"""Making a corpus's token store (storefile.py), streaming: `encode_corpus`.

The corpus is cut into pieces (encode.py), scanned for its characters (one pass: counts per
piece, merged into the vocabulary) while the parent hashes the files (each over the size it
was listed at: exactly the bytes encoded), then encoded into the file at each piece's offset —
both passes on every core (workers.py), with a progress callback per stage. The file is
written under a temporary name and renamed when complete. A store found damaged is deleted and
made again, with one warning line. Where the cache cannot take it (a full disk, no
permission), the store is made in a temporary file in `scratch` (unlinked once mapped), or for
a small corpus in memory — with one warning, never an error.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import file_mode, publish, remove_leftovers
from ..errors import CorpusError
from ..vocab import Vocab
from . import cache, encode, storefile
from .download import StageProgress
from .encode import Piece, Problem, Scan
from .files import CorpusFile, Selection, Skipped
from .storefile import Damaged, TokenStore, dtype_for, open_store, read_store
from .workers import Workers

PIECE_BYTES = 8 << 20  # a piece of the corpus per job: bounds a worker's memory to ~100 MB
MEMORY_FALLBACK_BYTES = 256 << 20  # with no disk to write to, a store this small is kept in memory


def bytes_vocab() -> Vocab:
    """Bytes mode: 256 symbols, id = byte value, no <unk> (every byte is known)."""
    return Vocab([chr(b) for b in range(256)])


@dataclass(frozen=True)
class Encoded:
    store: TokenStore
    skipped: tuple[Skipped, ...]  # files of a directory or glob that were left out
    warnings: tuple[str, ...]  # e.g. the store could not be written in the cache


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
    with cache.locked(signature) as held:
        known = cache.read_index(signature)
        if known is not None and (store := _cached(known.sha1, mode, vocab, damaged)) is not None:
            if strict and known.skipped:  # skipped when the store was made; refused now
                raise CorpusError(_refusal(known.skipped[0]))
            return Encoded(store, known.skipped, (*selection.warnings, *damaged))
        started = cache.now_ns()
        with Workers() as workers:
            scanned = _scan(selection, mode, strict, progress, workers)
            if not any(s.unreadable for s in scanned.skipped):  # a permission given later changes no stat the signature keys: read it again then
                cache.write_index(signature, selection, cache.IndexEntry(scanned.sha1, scanned.skipped), started)
            if (store := _cached(scanned.sha1, mode, vocab, damaged)) is not None:
                return Encoded(store, scanned.skipped, (*selection.warnings, *damaged))
            if scanned.length == 0:
                raise CorpusError(f"corpus {selection.source} is empty after {mode} normalization")
            built = bytes_vocab() if mode == "bytes" else _vocab(scanned)
            target = vocab or built
            where = cache.store_path(scanned.sha1, mode, None if target == built else target)
            if held:
                _remove_killed_writers(where, signature)
            store, warnings = _write(scanned, target, where, signature, progress, scratch, workers)
        if (changed := _changed(selection, scanned.skipped)) is not None:
            store, warnings = _uncached(store), (*warnings, f"corpus file {changed} changed while it was read: its token store is not kept")
        return Encoded(store, scanned.skipped, (*selection.warnings, *damaged, *warnings))


def _changed(selection: Selection, skipped: tuple[Skipped, ...]) -> Path | None:
    """A file read whose size, modification time or inode is not what the listing saw, if any.
    A file that only grew was encoded and hashed as listed (its first `size` bytes); one
    rewritten in place meanwhile may have been hashed, scanned and encoded as different texts.
    A skipped file is none of the store's text (one gone since listed is skipped, not changed)."""
    left_out = {s.path for s in skipped}
    for f in selection.files:
        if str(f.path) in left_out:
            continue
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
    that is empty is skipped at once; one that cannot be read or is not text is skipped and the
    rest scanned again without it (rare: the pieces around it may have read across it)."""
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
    """The files that cannot be read or are not text, each with its first problem (as reading
    the file whole finds it: a read error, then a NUL byte, then invalid UTF-8); an error for a
    single file or under --strict."""
    first: dict[int, Problem] = {}
    for p in problems:
        seen = first.get(p.file)
        if seen is None or (p.kind, p.offset) < (seen.kind, seen.offset):  # "io" sorts before "nul", "nul" before "utf8"
            first[p.file] = p
    bad = {}
    for i, p in sorted(first.items()):
        f = selection.files[i]
        reason = _reason_for(p)
        if not selection.many:
            raise CorpusError(f"cannot read corpus file {f.path}: {p.error}" if p.kind == "io" else f"corpus {f.path} {reason}")
        bad[i] = Skipped(str(f.path), reason.removeprefix("is "), f.size)
        if strict:
            raise CorpusError(_refusal(bad[i]))
    return bad


def _reason_for(problem: Problem) -> str:
    if problem.kind == "io":
        return f"is unreadable ({problem.error})"
    if problem.kind == "nul":
        return f"looks binary (NUL byte at offset {problem.offset})"
    return f"is not UTF-8 (invalid byte at offset {problem.offset})"


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


def _remove_killed_writers(where: Path, signature: str) -> None:
    """Remove the temporary stores of this corpus that a killed process left (each as large as
    its store). Only a holder of the corpus's lock writes one, and the caller holds it: any
    there is a dead writer's. Another corpus's, which may be being written, is left alone."""
    remove_leftovers(where, signature)


def _write(
    scanned: Scanned, vocab: Vocab, where: Path, signature: str, progress: StageProgress | None, scratch: Path | None, workers: Workers
) -> tuple[TokenStore, tuple[str, ...]]:
    """Encode into `where` in the cache (its temporary name holds the corpus's `signature`);
    failing that, a temporary file in `scratch`; failing that too, memory (small corpora only)."""
    dtype = dtype_for(len(vocab))
    nbytes = scanned.length * np.dtype(dtype).itemsize
    try:
        return _into_file(scanned, vocab, dtype, where.parent, where, progress, workers, signature), ()
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


def _into_file(
    scanned: Scanned, vocab: Vocab, dtype: str, directory: Path, final: Path | None, progress: StageProgress | None, workers: Workers, signature: str = ""
) -> TokenStore:
    """Write the store under a temporary name in `directory` (named by `final` and the corpus's
    `signature`, for `_remove_killed_writers`); rename it to `final`, or (None) map it and
    unlink it at once: the mapping keeps the data, the disk is freed at exit."""
    directory.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.{signature}." if final else ".lstmlm-tokens."
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix, suffix=".tmp")
    tmp = Path(name)
    atexit.register(tmp.unlink, missing_ok=True)  # at the process's exit, if a second Ctrl-C cuts the removal below short
    try:
        itemsize = np.dtype(dtype).itemsize
        meta = storefile.new_meta(scanned.mode, scanned.sha1, vocab, dtype, scanned.length)
        nbytes = scanned.length * itemsize
        offset = storefile.header_room(meta, nbytes)
        total = offset + nbytes
        with contextlib.suppress(OSError):  # reserve the space first: a full disk fails now, not mid-way
            os.posix_fallocate(fd, 0, total)
        os.ftruncate(fd, total)  # where fallocate is not supported (the space then taken as written)
        offsets = np.cumsum([0] + [s.length for s in scanned.scans])
        jobs = [(p, scanned.mode, vocab.tokens, dtype, name, offset + int(o) * itemsize) for p, o in zip(scanned.pieces, offsets)]
        unknown = sum(u for u, _ in workers.run(encode.encode, jobs, scanned.pieces, "encoding", progress))
        crcs = [(name, offset + start, length) for start, length in storefile.blocks(nbytes)]
        small = nbytes <= 16 * storefile.BLOCK_BYTES  # a few tens of milliseconds: not worth starting processes for
        checksums = workers.run(encode.crc, crcs, [()] * len(crcs), "checksumming", None, in_process=small)  # the ids as written, read back
        head, written_ns = storefile.sealed_header(meta, unknown, checksums, offset)
        os.pwrite(fd, head, 0)
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
        atexit.unregister(tmp.unlink)
        return store
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        atexit.unregister(tmp.unlink)  # removed: a second Ctrl-C landing before this (raised wherever it lands) leaves it to the exit
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


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
