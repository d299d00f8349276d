"""Batches gathered from the store are exactly the batches of the seed's iterators, which copied
the whole text to int64 first: the same (X, Y) for the same seed, the same draws from the
generator (so the next epoch is the same too), for every token dtype, for each process's rows,
and from any batch on when an epoch is resumed part-way."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import torch

from lstmlm.data.batches import Batch, BatchSource
from lstmlm.distributed import World


def seed_sequential(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random) -> Iterator[Batch]:
    """The seed's seq_data_iter_sequential, as lstmlm ran it before the store (verbatim)."""
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset : offset + num_tokens].long().reshape(batch_size, -1)
    Ys = corpus[offset + 1 : offset + 1 + num_tokens].long().reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i : i + num_steps], Ys[:, i : i + num_steps]


def seed_random(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random) -> Iterator[Batch]:
    """The seed's seq_data_iter_random, as lstmlm ran it before the store (verbatim)."""
    corpus = corpus[rng.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(initial_indices)
    num_batches = num_subseqs // batch_size
    windows = torch.arange(num_steps)
    for i in range(0, batch_size * num_batches, batch_size):
        starts = torch.tensor(initial_indices[i : i + batch_size]).unsqueeze(1)
        yield corpus[starts + windows].long(), corpus[starts + windows + 1].long()


SEED = {"sequential": seed_sequential, "random": seed_random}
CASES = [(1000, 4, 7), (1157, 32, 35), (5003, 8, 10), (777, 3, 1), (64, 1, 5)]


def tokens(length: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    high = {torch.uint8: 256, torch.uint16: 65_536, torch.int32: 2**31 - 1}[dtype]
    return torch.randint(0, high, (length,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).to(dtype)


def assert_same_batches(mine: list[Batch], seed: list[Batch]) -> None:
    assert len(mine) == len(seed)
    for (X, Y), (X0, Y0) in zip(mine, seed):
        assert X.dtype == Y.dtype == torch.int64
        assert torch.equal(X, X0) and torch.equal(Y, Y0)


@pytest.mark.parametrize("iterator", ["sequential", "random"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int32])
@pytest.mark.parametrize(("length", "batch_size", "num_steps"), CASES)
def test_three_epochs_are_the_seeds_batches(iterator: str, dtype: torch.dtype, length: int, batch_size: int, num_steps: int) -> None:
    corpus = tokens(length, dtype)
    source = BatchSource(corpus, batch_size, num_steps, iterator)
    for seed in (0, 1, 1234):
        mine_rng, seed_rng = random.Random(seed), random.Random(seed)
        for _ in range(3):  # one generator across epochs: each epoch's draws leave it where the seed's did
            assert_same_batches(list(source.epoch(mine_rng)), list(SEED[iterator](corpus.long(), batch_size, num_steps, seed_rng)))
            assert mine_rng.getstate() == seed_rng.getstate()


@pytest.mark.parametrize("iterator", ["sequential", "random"])
@pytest.mark.parametrize("size", [2, 4])
def test_each_process_gathers_exactly_its_rows(iterator: str, size: int) -> None:
    corpus, batch_size, num_steps = tokens(3000, torch.uint8), 8, 6
    for rank in range(size):
        rows = World(rank, size).rows(batch_size)
        mine = list(BatchSource(corpus, batch_size, num_steps, iterator, rows).epoch(random.Random(9)))
        seed = [(X[rows], Y[rows]) for X, Y in SEED[iterator](corpus.long(), batch_size, num_steps, random.Random(9))]
        assert_same_batches(mine, seed)
        assert all(X.shape == (batch_size // size, num_steps) for X, _ in mine)


@pytest.mark.parametrize("iterator", ["sequential", "random"])
def test_an_epoch_resumed_part_way_is_the_rest_of_the_epoch(iterator: str) -> None:
    corpus = tokens(2000, torch.uint16)
    source = BatchSource(corpus, 5, 9, iterator)
    whole = list(source.epoch(random.Random(3)))
    for skip in (0, 1, len(whole) - 1, len(whole)):
        rng = random.Random(3)
        rest = source.epoch(rng, skip=skip)
        assert len(rest) == len(whole)
        assert_same_batches(list(rest), whole[skip:])
        assert rng.getstate() == _after_epoch(source, 3)  # the draws are the epoch's, skipped or not


def _after_epoch(source: BatchSource, seed: int) -> object:
    rng = random.Random(seed)
    list(source.epoch(rng))
    return rng.getstate()


@pytest.mark.parametrize("iterator", ["sequential", "random"])
def test_the_next_batch_is_read_ahead_while_one_trains(monkeypatch: pytest.MonkeyPatch, iterator: str) -> None:
    """While batch i is used, the kernel is asked (madvise WILLNEED) for the pages of batch
    i + 1's windows, page-aligned and covering each window whole; the batches are unchanged."""
    from lstmlm.data import batches as batches_mod

    tokens = torch.arange(20_000, dtype=torch.int64) % 97
    asked: list[tuple[int, int]] = []
    monkeypatch.setattr(batches_mod, "READ_AHEAD_MIN", 0)
    monkeypatch.setattr(batches_mod, "_madvise", lambda addr, length, advice: asked.append((addr.value, length.value)) or 0)
    source = BatchSource(tokens, 4, 35, iterator)
    epoch = source.epoch(random.Random(3))
    base, item = tokens.data_ptr(), tokens.element_size()
    expected = [source.gather(epoch.starts(i)) for i in range(len(epoch))]
    for i, (X, Y) in enumerate(epoch):
        assert torch.equal(X, expected[i][0]) and torch.equal(Y, expected[i][1])
        if i + 1 < len(epoch):
            window = asked[-4:]  # the 4 rows of batch i + 1
            for (addr, length), start in zip(window, epoch.starts(i + 1).tolist()):
                first, last = base + start * item, base + (start + 36) * item
                assert addr % batches_mod.PAGE == 0 and addr <= first and addr + length >= last
    assert len(asked) == 4 * (len(epoch) - 1)


def test_a_small_store_is_not_read_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    from lstmlm.data import batches as batches_mod

    asked: list[object] = []
    monkeypatch.setattr(batches_mod, "_madvise", lambda *a: asked.append(a) or 0)
    list(BatchSource(torch.arange(5_000) % 7, 4, 35, "random").epoch(random.Random(0)))
    assert not asked  # in the page cache after one epoch anyway: no system call a batch
