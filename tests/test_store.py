"""The token store: a corpus encoded piece by piece into a memory-mapped file gives exactly the
ids reading it whole gives; a second run reads no text; damage is rebuilt; a cache that cannot
be written is worked around; and a corpus larger than a memory budget trains within it."""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import lstmlm.data.encode as encode_mod
import lstmlm.data.store as store_mod
import lstmlm.data.storefile as storefile_mod
import lstmlm.data.workers as workers_mod
from lstmlm.config import Config
from lstmlm.data import cache
from lstmlm.data.files import Selection, select
from lstmlm.data.pipeline import encode_file, prepare_data
from lstmlm.data.store import encode_corpus, open_store
from lstmlm.data.text import normalize, read_text
from lstmlm.errors import CorpusError
from lstmlm.runs import RunStore
from lstmlm.train import Trainer
from lstmlm.vocab import Vocab

from support.cli import LiveProcess, Result, assert_one_error_line, cli, lstmlm_process
from support.faults import HeldEncoding
from support.tiny import synthetic_text

TEXTS = {
    "ascii": "The Time Traveller (for so it will be convenient to speak of him)\r\nwas expounding a recondite matter to us.\n\n",
    "cjk": "時間旅行者は、難解な問題を説明していた。灰色の目が輝き、\n时间机器 — “quoted” naïve café.\n",
    "emoji": "😀🎉𝄞 done. 👩‍👩‍👧 ✓ ★\nend of line 😀\r\n",
}


def reference(paths: list[Path], mode: str) -> tuple[list[str], list[int]]:
    """What today's whole-text encoder gives: the files read whole and joined, normalized, the
    vocabulary built on the text, every character encoded; bytes mode: the bytes themselves."""
    if mode == "bytes":
        data = b"".join(p.read_bytes() for p in paths)
        return [chr(b) for b in range(256)], list(data)
    text = normalize("".join(read_text(p, limit=1 << 30) for p in paths), mode)  # whole, however long
    vocab = Vocab.build(text, order="frequency" if mode == "d2l" else "codepoint")
    return vocab.tokens, vocab.encode(text).tolist()


def encoded(source: Path | str, mode: str) -> tuple[list[str], list[int]]:
    s = encode_corpus(select(str(source)), mode).store
    return s.vocab.tokens, s.ids.tolist()


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Cut corpora into pieces of a few bytes: every boundary rule is exercised on small text."""

    def set_bytes(n: int) -> None:
        monkeypatch.setattr(store_mod, "PIECE_BYTES", n)
        monkeypatch.setattr(workers_mod, "WORKERS", 1)

    return set_bytes


# ---- exactly today's ids ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "d2l", "bytes"])
@pytest.mark.parametrize("kind", list(TEXTS))
@pytest.mark.parametrize("piece", [1, 2, 3, 5, 64, 1 << 20])
def test_a_file_gives_exactly_the_whole_text_ids(tmp_path: Path, tiny_pieces: Any, mode: str, kind: str, piece: int) -> None:
    """Pieces of 1, 2, 3 and 5 bytes cut every multi-byte character (CJK: 3 bytes, emoji: 4)."""
    tiny_pieces(piece)
    path = tmp_path / "corpus.txt"
    path.write_bytes((TEXTS[kind] * 3).encode("utf-8"))
    assert encoded(path, mode) == reference([path], mode)


@pytest.mark.parametrize("mode", ["raw", "d2l", "bytes"])
def test_a_directory_gives_exactly_the_joined_files_ids(tmp_path: Path, tiny_pieces: Any, mode: str) -> None:
    """d2l joins the files' lines: a file without a final newline runs on into the next, so
    "…matter!" + "!Start" reads as one line, exactly as reading the files whole and joining them."""
    tiny_pieces(4)
    books = tmp_path / "books"
    (books / "b").mkdir(parents=True)
    (books / "a.txt").write_text("the end of a line without a newline!", encoding="utf-8")
    (books / "b" / "c.txt").write_text("!Start -- of the next file\r", encoding="utf-8")
    (books / "b" / "d.txt").write_text("\nand a CRLF split across files; 時間 😀\n", encoding="utf-8")
    (books / ".hidden").write_text("never read", encoding="utf-8")
    paths = [books / "a.txt", books / "b" / "c.txt", books / "b" / "d.txt"]
    assert encoded(books, mode) == reference(paths, mode)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(st.text(alphabet=st.sampled_from(list("ab \n\r.!é時😀\t")), min_size=1, max_size=40), min_size=1, max_size=4),
    piece=st.integers(1, 24),
    mode=st.sampled_from(["raw", "d2l", "bytes"]),
)
def test_any_files_any_piece_size_give_the_whole_text_ids(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, texts: list[str], piece: int, mode: str
) -> None:
    monkeypatch.setattr(store_mod, "PIECE_BYTES", piece)
    monkeypatch.setattr(workers_mod, "WORKERS", 1)
    root = tmp_path_factory.mktemp("files")
    paths = []
    for i, text in enumerate(texts):
        paths.append(root / f"{i:02d}.txt")
        paths[-1].write_bytes(text.encode("utf-8"))
    source = root if len(paths) > 1 else paths[0]
    if mode != "bytes" and not normalize("".join(texts), mode):
        with pytest.raises(CorpusError, match="empty after"):
            encoded(source, mode)
        return
    assert encoded(source, mode) == reference(paths, mode)


def test_both_cores_encode_and_give_the_same_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With several pieces the work goes to a pool of processes (one per core): the same ids."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXTS["cjk"] * 2000 + TEXTS["ascii"] * 2000, encoding="utf-8")
    pools: list[int] = []
    pids: set[int] = set()
    real_start, real_run = workers_mod._start_pool, workers_mod.Workers.run

    def start(workers: int) -> Any:
        pools.append(workers)
        return real_start(workers)

    def run(self: workers_mod.Workers, *args: Any, **kwargs: Any) -> Any:
        results = real_run(self, *args, **kwargs)
        if self._pool is not None:
            pids.update(self._pool._processes)  # type: ignore[attr-defined]
        return results

    monkeypatch.setattr(workers_mod, "_start_pool", start)
    monkeypatch.setattr(workers_mod.Workers, "run", run)
    monkeypatch.setattr(store_mod, "PIECE_BYTES", 16 << 10)
    monkeypatch.setattr(workers_mod, "WORKERS", 2)
    assert encoded(path, "raw") == reference([path], "raw")
    assert pools == [2] and len(pids) == 2 and os.getpid() not in pids  # one pool of two processes, for both passes


@pytest.mark.parametrize(("distinct", "dtype", "itemsize"), [(200, torch.uint8, 1), (3000, torch.uint16, 2), (70_000, torch.int32, 4)])
def test_ids_take_the_narrowest_dtype(tmp_path: Path, distinct: int, dtype: torch.dtype, itemsize: int) -> None:
    """<unk> and `distinct` characters: up to 256 symbols in a byte, up to 65,536 in two."""
    first = 0x21 if distinct < 256 else 0x4E00 if distinct < 20_000 else 0x10000  # clear of the surrogates
    chars = [chr(c) for c in range(first, first + distinct)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chars) * 2, encoding="utf-8")
    s = encode_corpus(select(str(path)), "raw").store
    assert s.ids.dtype == dtype and len(s.vocab) == distinct + 1
    assert s.path is not None and s.path.stat().st_size % 4096 == (2 * distinct * itemsize) % 4096  # header pages + the ids
    assert s.ids.tolist() == Vocab(s.vocab.tokens).encode("".join(chars) * 2).tolist()


# ---- the cache --------------------------------------------------------------------------------------


def test_a_second_run_reads_no_text(tmp_path: Path) -> None:
    """The cache's index trusts unchanged files (path, size, mtime, inode) as git does: change a
    file's bytes behind its back, keeping all four, and the second run still has the first ids —
    it never read the text."""
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))  # long ago: not "racy"
    cfg = Config().with_overrides({"corpus": str(path)}).resolved()
    first = prepare_data(cfg)
    stat = path.stat()
    with open(path, "r+b") as f:  # same inode, same size
        f.write(b"X" * 100)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = prepare_data(cfg)
    assert torch.equal(again.train, first.train) and again.source_sha1 == first.source_sha1
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a real edit moves the mtime: read again
    changed = prepare_data(cfg)
    assert changed.source_sha1 != first.source_sha1 and changed.vocab.decode(changed.train).startswith("X" * 100)


def test_the_content_hash_is_the_files_sha1(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    data = prepare_data(Config().with_overrides({"corpus": str(path)}).resolved())
    assert data.source_sha1 == hashlib.sha1(path.read_bytes()).hexdigest()


APPENDER = """
import sys, time
with open(sys.argv[1], "a", encoding="utf-8") as log:
    while True:
        log.write(f"appended at {time.monotonic():.6f}\\n")
        log.flush()
        time.sleep(0.001)
"""


def test_a_file_that_grows_while_it_is_encoded_keys_its_store_by_the_bytes_encoded(tmp_path: Path, tiny_pieces: Any) -> None:
    """A real writer process appends to the corpus all the while. The store's key was the
    SHA-1 of the file as the hashing thread found it, longer than the part encoded, and every
    later run on that content got the short store; it is now the SHA-1 of exactly the bytes
    encoded (the file as listed), and a store made while a file changed is not kept."""
    import hashlib

    tiny_pieces(256)  # many pieces, encoded one by one in this process: the writer has time to write
    path = tmp_path / "log.txt"
    path.write_text(synthetic_text(lines=200, seed=3), encoding="utf-8")
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(path)])
    try:
        selection = select(str(path))
        while path.stat().st_size == selection.files[0].size:  # it has grown since it was listed
            time.sleep(0.01)
        made = encode_corpus(selection, "raw")
    finally:
        writer.kill()
        writer.wait()
    encoded_bytes = made.store.vocab.decode(made.store.ids).encode("utf-8")
    assert encoded_bytes == path.read_bytes()[: selection.files[0].size]  # the file as listed, then
    assert made.store.source_sha1 == hashlib.sha1(encoded_bytes).hexdigest()  # keyed by exactly that
    assert made.warnings == (f"corpus file {path} changed while it was read: its token store is not kept",)
    again = encode_corpus(select(str(path)), "raw")  # the writer has stopped: the whole file, every time
    assert again.store.source_sha1 == hashlib.sha1(path.read_bytes()).hexdigest()
    assert again.store.vocab.decode(again.store.ids) == path.read_text(encoding="utf-8") and again.warnings == ()


def ids_offset(stored: bytes) -> int:
    """Where a store file's ids begin (its magic line says)."""
    return int(stored[len(b"lstmlm-tokens 1 ") : 32])


def damaged(stored: bytes, damage: str) -> bytes:
    """A store file's bytes, damaged as a disk, a program or a person might."""
    at = ids_offset(stored) + 100
    return {
        "truncate": stored[:-10],
        "magic": b"x" + stored[1:],
        "header": stored[:40] + b"{" + stored[41:],
        "vocab": stored.replace(b'"vocab": ["<unk>", "\\n", " "', b'"vocab": ["<unk>", " ", "\\n"', 1),  # two symbols swapped: still a vocabulary
        "ids in range": stored[:at] + stored[at + 1 : at + 9] + stored[at : at + 1] + stored[at + 9 :],  # ids moved: every one still valid
        "ids out of range": stored[:at] + b"\xff" * 8 + stored[at + 8 :],
    }[damage]


@pytest.mark.parametrize("damage", ["truncate", "magic", "header", "vocab", "ids in range", "ids out of range"])
def test_a_damaged_store_is_made_again_with_one_warning(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    first = encode_corpus(select(str(path)), "raw").store
    assert first.path is not None
    stored = first.path.read_bytes()
    broken = damaged(stored, damage)
    assert broken != stored
    first.path.write_bytes(broken)  # a real write: the file's modification time moves
    assert open_store(first.path) is None
    again = encode_corpus(select(str(path)), "raw")
    assert again.store.ids.tolist() == reference([path], "raw")[1] and again.store.vocab == first.vocab
    (warning,) = again.warnings
    assert warning.startswith(f"the token store {first.path} was damaged (") and warning.endswith("): made again from the corpus")
    assert first.path.read_bytes()[ids_offset(stored) :] == stored[ids_offset(stored) :]  # made again in place
    assert encode_corpus(select(str(path)), "raw").warnings == ()  # once


def test_a_store_corrupted_on_disk_trains_on_the_corpus_again_with_one_warning_line(tmp_path: Path, corpus_file: Path, runs_dir: Path) -> None:
    """Ids changed on disk but still in range trained silently on garbage: now the training
    says so in one line and trains on the corpus's own ids."""
    args = ["train", "--corpus", corpus_file, "--normalize", "raw", "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4",
            "--num-steps", "5", "--epochs", "1", "--device", "cpu", "--json"]  # fmt: skip
    assert cli(*args, "--run", "first").code == 0
    (store_file,) = cache.encoded_dir().glob("*.tokens")
    store_file.write_bytes(damaged(store_file.read_bytes(), "ids in range"))
    result = cli(*args, "--run", "second")
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"warning: the token store {store_file} was damaged (block 1 of its 1 fails its checksum): made again from the corpus"
    ]
    data = prepare_data(RunStore.open(runs_dir / "second").config)
    assert data.vocab.decode(torch.cat([data.train, data.val])) == corpus_file.read_text(encoding="utf-8")


def test_an_untouched_store_is_sampled_and_one_written_to_is_checked_whole_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost of trusting a store: an open reads SAMPLED_BLOCKS blocks, whatever its size,
    unless the file was written to since it was made; then every block, once."""
    monkeypatch.setattr(storefile_mod, "BLOCK_BYTES", 256)
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")  # some 3,000 ids: a dozen blocks
    made = encode_corpus(select(str(path)), "raw").store
    assert made.path is not None
    checked: list[int] = []
    real_crc_of = encode_mod.crc_of
    monkeypatch.setattr(encode_mod, "crc_of", lambda f, offset, size: checked.append(offset) or real_crc_of(f, offset, size))
    blocks = -(-len(made.ids) // 256)
    assert blocks >= 10
    assert open_store(made.path) is not None and len(checked) == storefile_mod.SAMPLED_BLOCKS
    written = made.path.stat().st_mtime_ns
    os.utime(made.path)  # a copy without -p, say: the contents are sound, the time is not the store's
    checked.clear()
    assert open_store(made.path) is not None and len(checked) == blocks  # every block, once
    assert made.path.stat().st_mtime_ns == written
    checked.clear()
    assert open_store(made.path) is not None and len(checked) == storefile_mod.SAMPLED_BLOCKS


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs /proc")
def test_the_ids_are_a_view_of_the_file(tmp_path: Path) -> None:
    """Training slices the map: the tensor's memory is the store file's own pages, not a copy."""
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    s = encode_corpus(select(str(path)), "raw").store
    assert s.path is not None
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(s.path)):
            low, high = (int(a, 16) for a in line.split()[0].split("-"))
            mapped.append((low, high))
    address = s.ids.data_ptr()
    assert any(low <= address and address + len(s.ids) <= high for low, high in mapped), mapped


# ---- a cache that cannot be written --------------------------------------------------------------------


def test_an_unwritable_cache_trains_from_a_temporary_copy_with_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("LSTMLM_HOME", str(blocker / "home"))  # mkdir fails: ENOTDIR, a real OS error
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    scratch = tmp_path / "runs"
    data = prepare_data(Config().with_overrides({"corpus": str(path)}).resolved(), scratch=scratch)
    assert data.vocab.decode(torch.cat([data.train, data.val])) == path.read_text(encoding="utf-8")
    (warning,) = data.warnings
    assert warning.startswith(f"cannot write the token store in {blocker / 'home' / 'encoded'} (Not a directory)")
    assert warning.endswith(f"training from a temporary copy in {scratch}")
    assert list(scratch.iterdir()) == []  # unlinked once mapped: nothing is left behind

    data = prepare_data(Config().with_overrides({"corpus": str(path)}).resolved(), scratch=blocker / "runs")
    (warning,) = data.warnings
    assert "keeping the" in warning and "bytes of ids in memory" in warning
    assert data.vocab.decode(torch.cat([data.train, data.val])) == path.read_text(encoding="utf-8")


def test_a_full_disk_still_trains(tmp_path: Path, corpus_file: Path) -> None:
    """A real limit, not a mock: `lstmlm train` with RLIMIT_FSIZE below the store's size (SIGXFSZ
    ignored, so writes fail with EFBIG) trains from memory, with one warning line."""
    corpus = tmp_path / "big.txt"
    corpus.write_text(synthetic_text(lines=6000), encoding="utf-8")  # ~400 KB of ids; a tiny checkpoint is ~20 KB
    limit = 200_000

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = ["train", "--corpus", str(corpus), "--runs-dir", str(tmp_path / "runs"), "--hidden", "8", "--batch-size", "4",
            "--num-steps", "5", "--epochs", "1", "--max-minutes", "0.01", "--val-tokens", "500", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lstmlm", *args], capture_output=True, text=True, env=env, preexec_fn=limited, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "File too large" in warnings[0] and "in memory" in warnings[0], result.stderr
    assert (tmp_path / "runs" / "big-scratch" / "latest.pt").is_file()


def test_no_room_anywhere_for_a_large_store_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("LSTMLM_HOME", str(blocker / "home"))
    monkeypatch.setattr(store_mod, "MEMORY_FALLBACK_BYTES", 100)
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"cannot write the token store in .* nor in .*: free some space, or set LSTMLM_HOME"):
        prepare_data(Config().with_overrides({"corpus": str(path)}).resolved(), scratch=blocker / "runs")


# ---- within a memory budget ----------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The largest tensor any torch operation makes while active (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_a_corpus_larger_than_the_memory_budget_trains_within_it(tmp_path: Path, runs_dir: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """12 MB of text, a 4 MB budget: encoding (Python and numpy objects: tracemalloc) and training
    with validation and a checkpoint (every tensor torch makes) never hold the text whole."""
    budget = 4_000_000
    rng = random.Random(5)
    words = ["time", "traveller", "時間", "machine", "😀", "naïve", "\n"]
    path = tmp_path / "corpus.txt"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(100):
            f.write(" ".join(rng.choice(words) for _ in range(20_000)))
    assert path.stat().st_size > 3 * budget
    monkeypatch.setattr(store_mod, "PIECE_BYTES", 128 << 10)
    monkeypatch.setattr(workers_mod, "WORKERS", 1)  # in this process, where tracemalloc sees it
    cfg = Config().with_overrides({
        "corpus": str(path), "hidden": 8, "batch_size": 8, "num_steps": 10, "epochs": 1, "val_tokens": 4000,
        "checkpoint_every": 5, "eval_every": 10, "device": "cpu",
    }).resolved()  # fmt: skip
    warm = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=str(corpus_file)))  # torch's lazy imports happen here, untraced
    warm_data = prepare_data(warm)
    list(Trainer(RunStore.create(runs_dir / "warm", warm, warm_data.vocab), warm, warm_data, torch.device("cpu"), "fp32").run(lambda: True))
    tracemalloc.start()
    try:
        data = prepare_data(cfg)
        encoding_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        trainer = Trainer(RunStore.create(runs_dir / "budget", cfg, data.vocab), cfg, data, torch.device("cpu"), "fp32")
        with LargestTensor() as largest:
            events = list(trainer.run(lambda: trainer.progress.global_step >= 30))
        training_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data.train) + len(data.val) > 2 * budget  # the ids alone are twice the budget
    assert encoding_peak < budget, encoding_peak
    assert training_peak < budget, training_peak
    assert largest.largest < budget, largest.largest
    assert type(events[-1]).__name__ == "Finished" and trainer.progress.global_step == 30


# ---- many files: globs, skipped files, --strict ------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """src/ with C files, a header, an empty file, a Latin-1 file, a binary, a hidden file."""
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "main.c").write_text("int main(void) { return 0; }\n" * 40, encoding="utf-8")
    (src / "lib" / "util.c").write_text("/* naïve — “util” */\nint f(int x) { return x; }\n" * 40, encoding="utf-8")
    (src / "lib" / "util.h").write_text("int f(int x);\n" * 40, encoding="utf-8")
    (src / "lib" / "empty.h").write_bytes(b"")
    (src / "lib" / "latin1.c").write_bytes("/* caf\xe9 */\nint g;\n".encode("latin-1"))
    (src / "lib" / "blob.c").write_bytes(b"int h;\x00\x01\x02\n")
    (src / ".git.c").write_text("hidden\n", encoding="utf-8")
    (src / "README").write_text("not C\n", encoding="utf-8")
    return src


def test_a_glob_selects_files_in_a_stable_order(tree: Path) -> None:
    selection = select(str(tree / "**" / "*.[ch]"))
    assert [f.path.relative_to(tree).as_posix() for f in selection.files] == [
        "lib/blob.c", "lib/empty.h", "lib/latin1.c", "lib/util.c", "lib/util.h", "main.c",
    ]  # fmt: skip
    assert selection.many


@pytest.fixture
def looped(tmp_path: Path) -> Path:
    """corpus/ with two files, two links back up the tree (self -> ., sub/up -> ..), a linked
    folder outside it, a hard link and a symbolic link to its own files."""
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "sub").mkdir(parents=True)
    outside.mkdir()
    (corpus / "a.txt").write_text(synthetic_text(lines=30, seed=1), encoding="utf-8")
    (corpus / "sub" / "b.txt").write_text(synthetic_text(lines=30, seed=2), encoding="utf-8")
    (outside / "c.txt").write_text("never read\n", encoding="utf-8")
    (corpus / "self").symlink_to(".")
    (corpus / "sub" / "up").symlink_to("..")
    (corpus / "elsewhere").symlink_to(outside)
    os.link(corpus / "a.txt", corpus / "hard.txt")
    (corpus / "link.txt").symlink_to("sub/b.txt")
    return corpus


def listed(source: str) -> Selection:
    """select(source) in a thread: a listing that never ends fails the test instead of hanging it."""
    done: list[Selection] = []
    listing = threading.Thread(target=lambda: done.append(select(source)), daemon=True)
    listing.start()
    listing.join(timeout=60)
    assert done, f"listing {source} did not end"
    return done[0]


@pytest.mark.parametrize("as_glob", [True, False])
def test_linked_folders_are_not_entered_and_each_file_is_read_once(looped: Path, as_glob: bool) -> None:
    selection = listed(str(looped / "**" / "*.txt") if as_glob else str(looped))
    # by path: a.txt, hard.txt (a.txt again), link.txt (sub/b.txt, first met here), sub/b.txt (again)
    assert [f.path.relative_to(looped).as_posix() for f in selection.files] == ["a.txt", "link.txt"]
    assert selection.duplicates == 2
    store = encode_corpus(selection, "raw").store
    text = store.vocab.decode(store.ids)
    assert text == (looped / "a.txt").read_text(encoding="utf-8") + (looped / "sub" / "b.txt").read_text(encoding="utf-8")


def test_a_glob_through_two_loops_trains_on_each_file_once_and_says_so(looped: Path, runs_dir: Path) -> None:
    """A real process: glob.glob listed self/sub/up/self/... until the path was too long (one
    loop: 41 copies of each file) or for ever (two); the listing now ends at once."""
    result = lstmlm_process("train", "--corpus", looped / "**" / "*.txt", "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4",
                            "--num-steps", "5", "--epochs", "1", "--device", "cpu", "--json", timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "warning: skipped 2 path(s) to a file already read under another path (a hard or symbolic link): each file is read once"
    ]
    data = prepare_data(RunStore.open(runs_dir / "corpus-scratch").config)
    assert data.vocab.decode(torch.cat([data.train, data.val])) == "".join((looped / name).read_text(encoding="utf-8") for name in ("a.txt", "sub/b.txt"))


def test_a_link_that_loops_is_named_for_what_it_is(tmp_path: Path, runs_dir: Path) -> None:
    """Path.exists() is False for a link that loops: it was 'corpus not found', as if mistyped."""
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    why = f"cannot read corpus {tmp_path / 'a'}: Too many levels of symbolic links"
    assert_one_error_line(cli("train", "--corpus", tmp_path / "a", "--runs-dir", runs_dir), why)
    with pytest.raises(CorpusError, match=why):  # what evaluate reads a text by
        encode_file(tmp_path / "a", Vocab.build("ab"), "raw")


def test_a_fifo_or_a_device_as_the_corpus_is_named_for_what_it_is(tmp_path: Path, runs_dir: Path) -> None:
    """A FIFO has no size to plan the reading by: it read as 'is empty', as if the file were."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/null")):
        why = f"corpus {path} is not a regular file: give a file, a directory or a glob"
        assert_one_error_line(cli("train", "--corpus", path, "--runs-dir", runs_dir), why)
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_bad_files_are_skipped_each_named_with_the_count_at_the_end(tree: Path, runs_dir: Path) -> None:
    result = cli("train", "--corpus", tree / "**" / "*.[ch]", "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4",
                 "--num-steps", "5", "--epochs", "1", "--device", "cpu", "--json")  # fmt: skip
    assert result.code == 0, result.stderr
    skipped_bytes = sum((tree / "lib" / name).stat().st_size for name in ("blob.c", "empty.h", "latin1.c"))
    assert result.stderr.splitlines() == [
        f"warning: skipped {tree / 'lib' / 'blob.c'}: looks binary (NUL byte at offset 6)",
        f"warning: skipped {tree / 'lib' / 'empty.h'}: empty",
        f"warning: skipped {tree / 'lib' / 'latin1.c'}: not UTF-8 (invalid byte at offset 6)",
        f"warning: skipped 3 file(s), {skipped_bytes} bytes (--strict refuses them instead)",
    ]
    assert result.json()[-1]["run"] == "src-scratch"
    data = prepare_data(RunStore.open(runs_dir / "src-scratch").config)
    text = data.vocab.decode(torch.cat([data.train, data.val]))
    assert text == "".join((tree / name).read_text(encoding="utf-8") for name in ("lib/util.c", "lib/util.h", "main.c"))


def test_strict_refuses_a_bad_file(tree: Path, runs_dir: Path) -> None:
    """Empty files are known before a byte is read, so one is refused first."""
    pattern = tree / "**" / "*.[ch]"
    result = cli("train", "--corpus", pattern, "--runs-dir", runs_dir, "--strict", "--epochs", "1")
    assert_one_error_line(result, f"corpus file {tree / 'lib' / 'empty.h'} is empty (--strict: no file is skipped)")
    (tree / "lib" / "empty.h").unlink()
    result = cli("train", "--corpus", pattern, "--runs-dir", runs_dir, "--strict", "--epochs", "1")
    assert_one_error_line(result, f"corpus file {tree / 'lib' / 'blob.c'} looks binary (NUL byte at offset 6) (--strict: no file is skipped)")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def test_strict_refuses_a_corpus_whose_cached_store_skipped_files(tree: Path, runs_dir: Path) -> None:
    """The store made without --strict is found by its files' stat; --strict still refuses."""
    for path in tree.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))  # not "racy": indexed
    selection = select(str(tree / "**" / "*.[ch]"))
    assert len(encode_corpus(selection, "raw").skipped) == 3
    assert cache.read_index(selection.signature("raw")) is not None
    with pytest.raises(CorpusError, match=r"blob.c looks binary \(NUL byte at offset 6\) \(--strict: no file is skipped\)"):
        encode_corpus(selection, "raw", strict=True)


@pytest.fixture
def three(tmp_path: Path) -> Path:
    """books/ with three text files, a.txt, b.txt and c.txt, each of a few lines."""
    books = tmp_path / "books"
    books.mkdir()
    for seed, name in enumerate(("a.txt", "b.txt", "c.txt")):
        (books / name).write_text(synthetic_text(lines=12, seed=seed), encoding="utf-8")
    return books


def _unlink_after_listing(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Train's listing of the corpus, then `path` deleted: a file gone before it is read."""
    import lstmlm.data.pipeline as pipeline_mod

    listing = pipeline_mod.select

    def select_then_unlink(*args: Any, **kwargs: Any) -> Selection:
        selection = listing(*args, **kwargs)
        path.unlink(missing_ok=True)
        return selection

    monkeypatch.setattr(pipeline_mod, "select", select_then_unlink)


@pytest.mark.parametrize("mode", ["raw", "d2l", "bytes"])
def test_a_file_gone_since_listed_is_skipped_or_refused_under_strict(three: Path, tiny_pieces: Any, mode: str) -> None:
    """Pieces of 16 bytes: b.txt spans several, so the cuts planned in it read it too."""
    tiny_pieces(16)
    selection = select(str(three))
    gone = three / "b.txt"
    size = gone.stat().st_size
    gone.unlink()
    with pytest.raises(CorpusError, match=rf"^corpus file {gone} is unreadable \(No such file or directory\) \(--strict: no file is skipped\)$"):
        encode_corpus(selection, mode, strict=True)
    encoded_ = encode_corpus(selection, mode)
    assert [(s.path, s.reason, s.size) for s in encoded_.skipped] == [(str(gone), "unreadable (No such file or directory)", size)]
    store = encoded_.store
    assert (store.vocab.tokens, store.ids.tolist()) == reference([three / "a.txt", three / "c.txt"], mode)


def test_a_file_that_could_not_be_read_is_read_once_it_can_be(three: Path, tiny_pieces: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A permission given back changes no size, time or inode: the skip is not cached with the
    corpus's stat, so the next run reads the file. (Root reads any file: the denial is staged.)"""
    tiny_pieces(1 << 20)  # one worker: the scan runs in this process, where the patch is
    denied = three / "b.txt"
    reading = encode_mod._segment_bytes

    def no_permission(segment: encode_mod.Segment) -> bytes:
        if segment.path == str(denied):
            raise PermissionError(13, "Permission denied", segment.path)
        return reading(segment)

    selection = select(str(three))
    with monkeypatch.context() as patched:
        patched.setattr(encode_mod, "_segment_bytes", no_permission)
        skipped = encode_corpus(selection, "raw").skipped
    assert [(s.path, s.reason) for s in skipped] == [(str(denied), "unreadable (Permission denied)")]
    again = encode_corpus(selection, "raw")
    assert again.skipped == ()
    assert again.store.vocab.decode(again.store.ids) == "".join((three / n).read_text(encoding="utf-8") for n in ("a.txt", "b.txt", "c.txt"))


def _train_tiny(corpus: Path, runs_dir: Path) -> Any:
    """One epoch of a tiny model on `corpus` through the command line, its lines in JSON."""
    return cli("train", "--corpus", corpus, "--runs-dir", runs_dir, "--hidden", "8", "--batch-size", "4",
               "--num-steps", "5", "--epochs", "1", "--device", "cpu", "--json")  # fmt: skip


def _skipped_unreadable(path: Path, reason: str, size: int) -> list[str]:
    """What train says on stderr where it skipped `path` alone, unreadable for `reason`."""
    return [f"warning: skipped {path}: unreadable ({reason})", f"warning: skipped 1 file(s), {size:,} bytes (--strict refuses them instead)"]


def test_train_skips_a_file_gone_since_listed_and_says_so(three: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = three / "b.txt"
    size = gone.stat().st_size
    _unlink_after_listing(monkeypatch, gone)
    result = _train_tiny(three, runs_dir)
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == _skipped_unreadable(gone, "No such file or directory", size)
    data = prepare_data(RunStore.open(runs_dir / "books-scratch").config)
    assert data.vocab.decode(torch.cat([data.train, data.val])) == "".join((three / n).read_text(encoding="utf-8") for n in ("a.txt", "c.txt"))


def test_train_strict_refuses_a_file_gone_since_listed(three: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gone = three / "b.txt"
    _unlink_after_listing(monkeypatch, gone)
    result = cli("train", "--corpus", three, "--runs-dir", runs_dir, "--strict", "--epochs", "1", "--device", "cpu")
    assert_one_error_line(result, f"corpus file {gone} is unreadable (No such file or directory) (--strict: no file is skipped)")
    assert not runs_dir.exists() or not any(runs_dir.iterdir())


def _denied_even_to_root() -> Path | None:
    """A file that exists and that no one may read: a write-only sysfs attribute, where there is one."""
    for candidate in ("/sys/bus/pci/rescan", "/sys/kernel/mm/ksm/run", "/sys/power/wakeup_count"):
        try:
            open(candidate, "rb").close()
        except PermissionError:
            return Path(candidate)
        except OSError:
            continue
    return None


@pytest.mark.skipif(_denied_even_to_root() is None, reason="no file here that root may not read")
def test_train_skips_a_file_without_read_permission_and_strict_refuses_it(three: Path, runs_dir: Path) -> None:
    """Root reads a file of mode 000; a write-only sysfs attribute it may not read (a link to one
    in the corpus is a file of it, as any link to a file is)."""
    denied = three / "b.txt"
    denied.unlink()
    denied.symlink_to(_denied_even_to_root() or "")
    result = cli("train", "--corpus", three, "--runs-dir", runs_dir, "--strict", "--epochs", "1", "--device", "cpu")
    assert_one_error_line(result, f"corpus file {denied} is unreadable (Permission denied) (--strict: no file is skipped)")
    result = _train_tiny(three, runs_dir)
    assert result.code == 0, result.stderr
    assert result.stderr.splitlines() == _skipped_unreadable(denied, "Permission denied", denied.stat().st_size)


def test_an_empty_glob_names_the_pattern(tmp_path: Path, runs_dir: Path) -> None:
    pattern = str(tmp_path / "nothing" / "**" / "*.txt")
    assert_one_error_line(cli("train", "--corpus", pattern, "--runs-dir", runs_dir), f"no files match the corpus pattern {pattern!r}")


def test_in_bytes_mode_any_file_is_a_corpus(tree: Path) -> None:
    """Binary and Latin-1 files are bytes like any other; only the empty one is skipped."""
    encoded_ = encode_corpus(select(str(tree / "**" / "*.[ch]")), "bytes")
    assert [s.path for s in encoded_.skipped] == [str(tree / "lib" / "empty.h")]
    names = ["lib/blob.c", "lib/latin1.c", "lib/util.c", "lib/util.h", "main.c"]
    assert bytes(encoded_.store.ids.tolist()) == b"".join((tree / n).read_bytes() for n in names)


def test_a_single_bad_file_is_an_error_with_its_offset_across_pieces(tmp_path: Path, tiny_pieces: Any) -> None:
    tiny_pieces(8)
    path = tmp_path / "late.txt"
    good = "ok — fine\n" * 10
    path.write_bytes(good.encode("utf-8") + b"\xff tail")
    with pytest.raises(CorpusError, match=rf"is not UTF-8 \(invalid byte at offset {len(good.encode('utf-8'))}\)"):
        encode_corpus(select(str(path)), "raw")
    path.write_bytes(good.encode("utf-8") + b"\xff" + b"x" * 30 + b"\x00")  # a NUL is reported before bad UTF-8, as reading whole does
    with pytest.raises(CorpusError, match=rf"looks binary \(NUL byte at offset {len(good.encode('utf-8')) + 31}\)"):
        encode_corpus(select(str(path)), "raw")


def test_progress_is_reported_for_each_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "PIECE_BYTES", 1 << 10)
    monkeypatch.setattr(workers_mod, "WORKERS", 1)
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")
    seen: list[tuple[str, int, int | None]] = []
    prepare_data(Config().with_overrides({"corpus": str(path)}).resolved(), progress=lambda *a: seen.append(a))
    size = path.stat().st_size
    for stage in ("reading", "encoding"):
        done = [d for s, d, t in seen if s == stage]
        assert done == sorted(done) and done[-1] == size and len(done) > 2
        assert {t for s, _, t in seen if s == stage} == {size}


def test_index_entries_are_not_written_for_files_changed_just_now(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_text(), encoding="utf-8")  # modified this instant
    selection = select(str(path))
    encode_corpus(selection, "raw")
    assert cache.read_index(selection.signature("raw")) is None


# ---- interrupted -----------------------------------------------------------------------------------


def test_ctrl_c_while_a_corpus_is_encoded_ends_the_command_and_its_workers_at_once(
    tmp_path: Path, corpus_file: Path, runs_dir: Path, isolated_cache: Path
) -> None:
    """A real process, its corpus's encoding held in two worker processes, gets Ctrl-C twice.
    The pool waited for the pieces in flight; the second Ctrl-C landed in that wait, and the
    interpreter's exit then joined workers that never end: the command hung (interrupted
    again, it left them running). It now ends the workers and exits: one line, 130, and no
    worker and no temporary store left."""
    held = HeldEncoding(tmp_path, {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_DEBUG": "0"})
    tiny = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]
    training = LiveProcess("train", "--corpus", corpus_file, "--runs-dir", runs_dir, *tiny, env=held.env, code=held.code)
    try:
        training.wait_until(lambda: len(held.workers) == 2, "piece held by each worker")
        training.proc.send_signal(signal.SIGINT)
        training.proc.send_signal(signal.SIGINT)  # at once: the second lands while the first unwinds (or the two make one)
        assert training.finish() == 130
        assert_one_error_line(Result(130, "".join(training.stdout), "".join(training.stderr)), "interrupted", code=130)
        assert not held.running()  # ended and reaped before the command exits
        assert not list((isolated_cache / "encoded").glob(".*.tmp"))
    finally:
        training.kill()
        held.kill()


SECOND_CTRL_C = {  # where a second Ctrl-C lands while the first unwinds: what it cut short
    "threading:Condition.__exit__": "the wait for a piece letting go of its lock",
    "lstmlm.data.workers:Workers.__exit__": "the workers' ending",
    "pathlib:Path.unlink": "the temporary store's removal",
}


@pytest.mark.parametrize("where", SECOND_CTRL_C, ids=SECOND_CTRL_C.values())
def test_a_second_ctrl_c_wherever_it_lands_ends_the_command_and_its_workers(
    where: str, tmp_path: Path, corpus_file: Path, runs_dir: Path, isolated_cache: Path
) -> None:
    """Ctrl-C twice, the second landing as the first unwinds, where Python raises it even inside a
    `with`'s exit or an `except`. As the wait let go of the piece's lock, it left the lock held:
    the pool's thread, cancelling that piece, waited for it for ever, and the command for that
    thread. As the workers were to be ended, it skipped that: the interpreter's exit joined
    workers that never end. Either hung. As the temporary store was removed, it left it in the
    cache. Each now ends as one Ctrl-C does: one line, 130, no worker, no temporary store."""
    held = HeldEncoding(tmp_path, {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_DEBUG": "0", "LSTMLM_TEST_SECOND_AT": where})
    tiny = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]
    training = LiveProcess("train", "--corpus", corpus_file, "--runs-dir", runs_dir, *tiny, env=held.env, code=held.code)
    try:
        training.wait_until(lambda: len(held.workers) == 2, "piece held by each worker")
        training.proc.send_signal(signal.SIGINT)  # the second follows where `where` says
        assert training.finish() == 130
        assert_one_error_line(Result(130, "".join(training.stdout), "".join(training.stderr)), "interrupted", code=130)
        assert not held.running()
        assert not list((isolated_cache / "encoded").glob(".*.tmp"))
    finally:
        training.kill()
        held.kill()


def test_a_store_left_by_a_kill_9_midway_is_removed_by_the_next_encoding_of_that_corpus(
    tmp_path: Path, corpus_file: Path, runs_dir: Path, isolated_cache: Path
) -> None:
    """kill -9 while a corpus is encoded left its temporary store, as large as the store, in the
    cache: no later command removed it, and each kill left one more. The next encoding of that
    corpus (holding its lock: no live writer of it) removes it; another corpus's temporary,
    perhaps being written now, is left alone."""
    held = HeldEncoding(tmp_path, {**os.environ, "OMP_NUM_THREADS": "1", "LSTMLM_DEBUG": "0"})
    tiny = ["--hidden", "16", "--batch-size", "8", "--num-steps", "10", "--device", "cpu"]
    training = LiveProcess("train", "--corpus", corpus_file, "--runs-dir", runs_dir, *tiny, env=held.env, code=held.code)
    encoded = isolated_cache / "encoded"
    try:
        training.wait_until(lambda: len(held.workers) == 2, "piece held by each worker")
        training.proc.kill()
        held.kill()  # the workers, as a kill -9 of the process group: else they hold its output open
        training.finish()
    finally:
        training.kill()
        held.kill()
    assert len(list(encoded.glob(".*.tmp"))) == 1
    others = [encoded / ".0123-raw.tokens.abcd.tmp", encoded / f".0123-raw.tokens.{'e' * 40}.abcd.tmp"]
    for other in others:
        other.write_bytes(b"another corpus's store, being written")
    assert cli("train", "--corpus", corpus_file, "--runs-dir", runs_dir, *tiny, "--epochs", "1").code == 0
    assert sorted(encoded.glob(".*.tmp")) == sorted(others)
    assert [p.read_bytes() for p in others] == [b"another corpus's store, being written"] * 2
