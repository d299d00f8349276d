"""Minibatches of (X, Y) token ids: the seed's sequential and random iterators, and the split.

Both iterators draw their random offset (and the random one its shuffle) from a
`random.Random` passed in, so an epoch's batches are fixed by that generator's state: a
checkpoint stores the state at the start of the epoch and resume rebuilds the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import CorpusError

Batch = tuple[torch.Tensor, torch.Tensor]  # X, Y: (batch, num_steps) int64 ids; Y is X shifted by one


def min_tokens(batch_size: int, num_steps: int) -> int:
    """The shortest corpus that yields one batch whatever the random offset (at most num_steps)."""
    return batch_size * num_steps + num_steps + 1


def check_length(num_tokens: int, batch_size: int, num_steps: int, what: str = "corpus") -> None:
    need = min_tokens(batch_size, num_steps)
    if num_tokens < need:
        raise CorpusError(
            f"the {what} has {num_tokens} tokens, too short for one batch of {batch_size}×{num_steps}: "
            f"it needs at least {need} (lower --batch-size or --num-steps)"
        )


def sequential(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random) -> Iterator[Batch]:
    """The seed's seq_data_iter_sequential: each row of X is a contiguous stream, so batch k+1
    continues batch k row by row and the recurrent state can be carried between them."""
    offset = rng.randint(0, num_steps)
    num_tokens = ((len(corpus) - offset - 1) // batch_size) * batch_size
    Xs = corpus[offset : offset + num_tokens].long().reshape(batch_size, -1)  # (batch, columns)
    Ys = corpus[offset + 1 : offset + 1 + num_tokens].long().reshape(batch_size, -1)
    num_batches = Xs.shape[1] // num_steps
    for i in range(0, num_steps * num_batches, num_steps):
        yield Xs[:, i : i + num_steps], Ys[:, i : i + num_steps]


def random_subsequences(
    corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random
) -> Iterator[Batch]:
    """The seed's seq_data_iter_random: non-overlapping subsequences in shuffled order."""
    corpus = corpus[rng.randint(0, num_steps - 1) :]
    num_subseqs = (len(corpus) - 1) // num_steps
    initial_indices = list(range(0, num_subseqs * num_steps, num_steps))
    rng.shuffle(initial_indices)
    num_batches = num_subseqs // batch_size
    windows = torch.arange(num_steps)
    for i in range(0, batch_size * num_batches, batch_size):
        starts = torch.tensor(initial_indices[i : i + batch_size]).unsqueeze(1)  # (batch, 1)
        X = corpus[starts + windows].long()  # (batch, num_steps)
        Y = corpus[starts + windows + 1].long()
        yield X, Y


ITERATORS = {"sequential": sequential, "random": random_subsequences}


def num_batches(num_tokens: int, batch_size: int, num_steps: int, iterator: str) -> int:
    """Batches per epoch for the largest offset, the count every epoch reaches at least."""
    if iterator == "sequential":
        return ((num_tokens - num_steps - 1) // batch_size) // num_steps
    return ((num_tokens - (num_steps - 1) - 1) // num_steps) // batch_size


@dataclass(frozen=True)
class Split:
    train: torch.Tensor
    val: torch.Tensor  # empty when there is no validation split


def split(ids: torch.Tensor, val_fraction: float) -> Split:
    """The last `val_fraction` of the tokens as validation text: a contiguous tail, no overlap."""
    num_val = int(len(ids) * val_fraction)
    cut = len(ids) - num_val
    return Split(ids[:cut], ids[cut:])
