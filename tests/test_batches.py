"""Minibatches: the seed's sequential and random iterators on the real Time Machine, and the split.

Running an iterator on `arange` (each token is its own position) shows exactly which corpus
slice every row came from; the same seed on the real ids must then give those slices' tokens.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from lstmlm.data.batches import Batch, check_length, min_tokens, num_batches, random_subsequences, sequential, split
from lstmlm.errors import CorpusError

from support.tiny import d2l_data

BATCH, STEPS, MAX_TOKENS = 32, 35, 10_000
SEEDS = (0, 1, 7, 1234)
BatchIterator = Callable[[torch.Tensor, int, int, random.Random], Iterator[Batch]]


@pytest.fixture(scope="module")
def ids(data_dir: Path) -> torch.Tensor:
    """The seed's training corpus, as `lstmlm train --config configs/d2l.toml` reads it: the first
    10,000 d2l tokens of The Time Machine."""
    ids = d2l_data(data_dir / "timemachine.txt").train
    assert len(ids) == MAX_TOKENS
    return ids


def positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32)


def epoch(iterator: BatchIterator, corpus: torch.Tensor, seed: int) -> list[Batch]:
    return list(iterator(corpus, BATCH, STEPS, random.Random(seed)))


def assert_rows_are_slices(X: torch.Tensor) -> None:
    """Every row of a batch run on positions is a contiguous run of the corpus."""
    assert torch.equal(X, X[:, :1] + torch.arange(X.shape[1]))


# ---- sequential ----


@pytest.mark.parametrize("seed", SEEDS)
def test_sequential_gives_8_batches_of_32x35(ids: torch.Tensor, seed: int) -> None:
    batches = epoch(sequential, ids, seed)
    assert len(batches) == 8 == num_batches(len(ids), BATCH, STEPS, "sequential")
    for X, Y in batches:
        assert X.shape == Y.shape == (BATCH, STEPS)
        assert X.dtype == Y.dtype == torch.int64


@pytest.mark.parametrize("seed", SEEDS)
def test_sequential_batches_are_the_corpus_shifted_by_one(ids: torch.Tensor, seed: int) -> None:
    where = epoch(sequential, positions(len(ids)), seed)
    real = epoch(sequential, ids, seed)
    for (X_pos, Y_pos), (X, Y) in zip(where, real):
        assert_rows_are_slices(X_pos)
        assert torch.equal(Y_pos, X_pos + 1)
        assert torch.equal(X, ids[X_pos].long())
        assert torch.equal(Y, ids[X_pos + 1].long())


@pytest.mark.parametrize("seed", SEEDS)
def test_sequential_rows_continue_across_batches(seed: int) -> None:
    batches = epoch(sequential, positions(MAX_TOKENS), seed)
    for (X, _), (X_next, _) in itertools.pairwise(batches):
        assert torch.equal(X_next[:, 0], X[:, -1] + 1)  # row r goes on where it stopped
    first = batches[0][0]
    row_length = int(first[1, 0] - first[0, 0])
    assert torch.equal(first[:, 0], first[0, 0] + row_length * torch.arange(BATCH))  # rows are one stream cut in 32


def test_sequential_offset_covers_0_to_num_steps() -> None:
    offsets = {int(epoch(sequential, positions(MAX_TOKENS), seed)[0][0][0, 0]) for seed in range(400)}
    assert offsets == set(range(STEPS + 1))


# ---- random ----


@pytest.mark.parametrize("seed", SEEDS)
def test_random_subsequences_do_not_overlap(ids: torch.Tensor, seed: int) -> None:
    where = epoch(random_subsequences, positions(len(ids)), seed)
    real = epoch(random_subsequences, ids, seed)
    assert len(where) == 8 == num_batches(len(ids), BATCH, STEPS, "random")
    starts: list[int] = []
    for (X_pos, Y_pos), (X, Y) in zip(where, real):
        assert X.shape == Y.shape == (BATCH, STEPS)
        assert_rows_are_slices(X_pos)
        assert torch.equal(Y_pos, X_pos + 1)
        assert torch.equal(X, ids[X_pos].long())
        assert torch.equal(Y, ids[X_pos + 1].long())
        starts += X_pos[:, 0].tolist()
    ordered = sorted(starts)
    assert all(b - a >= STEPS for a, b in itertools.pairwise(ordered))
    assert len({s % STEPS for s in starts}) == 1  # one offset, then a grid of num_steps
    assert starts != ordered  # shuffled


def test_random_offset_covers_0_to_num_steps_minus_1() -> None:
    offsets = {min_start(random_subsequences, seed) % STEPS for seed in range(400)}
    assert offsets == set(range(STEPS))


def min_start(iterator: BatchIterator, seed: int) -> int:
    return min(int(X[:, 0].min()) for X, _ in epoch(iterator, positions(MAX_TOKENS), seed))


# ---- reproducibility ----


@pytest.mark.parametrize("iterator", [sequential, random_subsequences])
def test_same_seed_same_batches(ids: torch.Tensor, iterator: BatchIterator) -> None:
    first, again, other = epoch(iterator, ids, 3), epoch(iterator, ids, 3), epoch(iterator, ids, 5)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, other))


# ---- too short ----


def test_min_tokens_is_exactly_one_batch_at_the_largest_offset() -> None:
    need = min_tokens(BATCH, STEPS)
    assert need == BATCH * STEPS + STEPS + 1 == 1156
    for seed in range(100):
        assert len(epoch(sequential, positions(need), seed)) >= 1
        assert len(epoch(random_subsequences, positions(need), seed)) >= 1
    short = [len(epoch(sequential, positions(need - 1), seed)) for seed in range(100)]
    assert min(short) == 0  # one token less and some offset leaves no batch


def test_too_short_corpus_states_the_minimum() -> None:
    check_length(1156, BATCH, STEPS)
    with pytest.raises(CorpusError) as caught:
        check_length(1155, BATCH, STEPS)
    message = str(caught.value)
    assert "1155 tokens" in message
    assert re.search(r"needs at least 1156\b", message)
    assert "32×35" in message


# ---- split ----


@pytest.mark.parametrize(("val_fraction", "num_val"), [(0.1, 1000), (0.05, 500), (0.0, 0), (0.33, 3300)])
def test_split_is_a_contiguous_tail(val_fraction: float, num_val: int) -> None:
    ids = positions(MAX_TOKENS)
    parts = split(ids, val_fraction)
    assert len(parts.val) == num_val
    assert torch.equal(torch.cat([parts.train, parts.val]), ids)  # together the whole, in order
    assert torch.equal(parts.val, ids[MAX_TOKENS - num_val :])
    assert not set(parts.train.tolist()) & set(parts.val.tolist())
