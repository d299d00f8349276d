"""Minibatches of (X, Y) token ids: the seed's sequential and random iterators, and the split.

Both iterators draw their random offset (and the random one its shuffle) from a
`random.Random` passed in, exactly as the seed's `seq_data_iter_sequential` and
`seq_data_iter_random` draw them, so an epoch's batches are fixed by that generator's state:
a checkpoint stores the state at the start of the epoch and resume rebuilds the same batches.

Nothing copies the text. A batch is gathered from its rows' windows: row r of batch i reads
the num_steps + 1 tokens from start(i, r), X the first num_steps, Y the last. The sequential
iterator's rows are one stream cut in `batch_size`:

    tokens:  o ....................................................... (offset o ∈ [0, num_steps])
    row 0:   o              o+n            o+2n   ...                  n = num_steps
    row 1:   o+L            o+L+n          o+L+2n ...                  L = (len - o - 1) // batch_size
    ...      batch 0        batch 1        batch 2                     (a row continues batch to batch)

the random iterator's rows are non-overlapping windows o + k·n, in shuffled order. So the
tokens can be a memory map of any size (each batch touches batch_size windows) — or a tensor on
a GPU: the index arithmetic runs on the tokens' device.

On a GPU the loop must not wait for the host (or the host for it) between batches: the
training tokens go to the GPU whole where they fit (`on_device`), and each batch is gathered
there — the sequential iterator's starts computed on the device, the random one's shuffled
order copied once an epoch. A corpus too large for the GPU stays a memory map: each batch is
gathered on the host and copied from pinned memory without waiting (`non_blocking`; a copy
from ordinary, pageable memory would make the host wait for the device).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import mmap
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast, get_args

import numpy as np
import torch

from ..config import BatchOrder
from ..device import available_memory
from ..errors import CorpusError

Batch = tuple[torch.Tensor, torch.Tensor]  # X, Y: (rows, num_steps) int64 ids; Y is X shifted by one

MADV_WILLNEED, PAGE = 3, mmap.PAGESIZE
READ_AHEAD_MIN = 64 << 20  # a smaller store is read whole into the page cache the first epoch anyway


def _libc_madvise() -> Callable[..., int] | None:
    """libc's madvise, where there is one (Linux and other POSIX systems)."""
    with contextlib.suppress(OSError, AttributeError):
        return cast(Callable[..., int], ctypes.CDLL(None, use_errno=True).madvise)
    return None


_madvise = _libc_madvise()


def min_tokens(batch_size: int, num_steps: int) -> int:
    """The shortest corpus that yields one batch whatever the random offset (at most num_steps)."""
    return batch_size * num_steps + num_steps + 1


def check_length(num_tokens: int, batch_size: int, num_steps: int, what: str = "corpus") -> None:
    need = min_tokens(batch_size, num_steps)
    if num_tokens < need:
        smaller = "a longer text" if batch_size == num_steps == 1 else "lower --batch-size or --num-steps"  # a batch of 1×1 is the least
        raise CorpusError(
            f"the {what} has {num_tokens} token{'' if num_tokens == 1 else 's'}, too short for one batch of {batch_size}×{num_steps}: "
            f"it needs at least {need} ({smaller})"
        )


DEVICE_SHARE = 4  # the training tokens go to a GPU whole when they take at most a quarter of its free memory
_COPY_CHUNK = 1 << 26  # tokens converted and copied to the device at a time: bounded host memory


def on_device(tokens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The tokens on `device` (a GPU) when they fit in 1/DEVICE_SHARE of its free memory, as
    uint8 or int32 (uint16 has almost no GPU kernels, indexing among those missing); otherwise,
    and on a CPU, the tokens as they are. One copy, at the start of training."""
    if device.type == "cpu" or tokens.device == device:
        return tokens
    dtype = tokens.dtype if tokens.dtype in (torch.uint8, torch.int32) else torch.int32
    free = available_memory(device)
    if free is None or len(tokens) * dtype.itemsize > free // DEVICE_SHARE:
        return tokens
    placed = torch.empty(len(tokens), dtype=dtype, device=device)
    for a in range(0, len(tokens), _COPY_CHUNK):
        placed[a : a + _COPY_CHUNK].copy_(tokens[a : a + _COPY_CHUNK].to(dtype))
    return placed


class BatchSource:
    """The batches of a token sequence for the rows this process trains on (all of them in one
    process; its block of every batch under torchrun). `epoch(rng)` draws an epoch's order from
    `rng` and yields its batches; `skip` resumes one part-way without gathering what is skipped.
    Batches are made on the tokens' device and delivered on `device` (by default the same)."""

    def __init__(
        self, tokens: torch.Tensor, batch_size: int, num_steps: int, iterator: str, rows: slice = slice(None), device: torch.device | None = None
    ) -> None:
        if iterator not in get_args(BatchOrder):
            raise CorpusError(f"unknown iterator '{iterator}' (expected {' or '.join(get_args(BatchOrder))})")
        self.tokens, self.batch_size, self.num_steps, self.iterator = tokens, batch_size, num_steps, iterator
        self.device = tokens.device if device is None else device
        self.rows = torch.arange(batch_size, device=tokens.device)[rows]  # which rows of a batch this process reads
        self.window = torch.arange(num_steps + 1, device=tokens.device)  # (steps + 1,)

    def epoch(self, rng: random.Random, skip: int = 0) -> Epoch:
        if self.iterator == "sequential":
            return self._sequential(rng, skip)
        return self._random(rng, skip)

    def gather(self, starts: torch.Tensor) -> Batch:
        """The batch whose rows start at `starts` (rows,): each row's window of num_steps + 1."""
        W = self.tokens[starts.to(self.tokens.device)[:, None] + self.window].long()  # (rows, steps + 1)
        if W.device != self.device:  # gathered from a memory map for a GPU: staged, not waited for
            W = W.pin_memory().to(self.device, non_blocking=True)
        return W[:, :-1], W[:, 1:]

    def read_ahead(self, starts: torch.Tensor) -> None:
        """Have the kernel read the pages of the windows at `starts` in the background
        (madvise WILLNEED), so that gathering them later finds them in memory. For a memory-
        mapped store larger than memory, the random iterator's windows are anywhere in it:
        without this each batch waited for batch_size reads from the disk (some 6 ms a batch
        on a 20 GB store). Nothing to do for tokens in memory or on a GPU."""
        if self.tokens.device.type != "cpu" or _madvise is None or self.tokens.numel() * self.tokens.element_size() < READ_AHEAD_MIN:
            return
        item, span = self.tokens.element_size(), (self.num_steps + 1) * self.tokens.element_size()
        base = self.tokens.data_ptr()
        for start in starts.tolist():
            at = base + start * item
            page = at - at % PAGE
            _madvise(ctypes.c_void_p(page), ctypes.c_size_t(at + span - page), MADV_WILLNEED)

    def _sequential(self, rng: random.Random, skip: int) -> Epoch:
        """The seed's seq_data_iter_sequential: offset o, then the text from o as `batch_size`
        rows of L tokens, walked num_steps columns at a time."""
        n, B = self.num_steps, self.batch_size
        offset = rng.randint(0, n)
        row_length = (len(self.tokens) - offset - 1) // B
        first = offset + self.rows * row_length  # (rows,): where each row starts
        return Epoch(self, row_length // n, skip, sequential_starts=first)

    def _random(self, rng: random.Random, skip: int) -> Epoch:
        """The seed's seq_data_iter_random: offset o, the windows o + k·n shuffled (the same
        Fisher–Yates draws as shuffling the seed's list, on 4 bytes a window), batch_size at a time."""
        n, B = self.num_steps, self.batch_size
        offset = rng.randint(0, n - 1)
        num_subseqs = (len(self.tokens) - offset - 1) // n
        order = array.array("I" if num_subseqs < 2**32 else "Q", np.arange(num_subseqs, dtype=np.uint32 if num_subseqs < 2**32 else np.uint64).tobytes())
        rng.shuffle(order)  # the seed shuffles a list; shuffle needs only len and item assignment
        on_device = None
        if self.tokens.device.type != "cpu":  # the whole order in one copy, not a copy per batch
            on_device = torch.from_numpy(np.frombuffer(order, dtype=np.uint32 if order.typecode == "I" else np.uint64).astype(np.int64))
            on_device = on_device.pin_memory().to(self.tokens.device, non_blocking=True)
        return Epoch(self, num_subseqs // B, skip, offset=offset, order=order, order_on_device=on_device)


@dataclass
class Epoch:
    """One epoch's batches: `len()` of them, iterated from batch `skip` on."""

    source: BatchSource
    num_batches: int
    skip: int = 0
    sequential_starts: torch.Tensor | None = None  # sequential: each row's start in batch 0
    offset: int = 0  # random: the windows' offset
    order: array.array | None = None  # random: the window indices, shuffled
    order_on_device: torch.Tensor | None = None  # random: the same, on the tokens' device (a GPU)

    def __len__(self) -> int:
        return self.num_batches

    def starts(self, i: int) -> torch.Tensor:
        """Where this process's rows of batch i start."""
        s = self.source
        if self.sequential_starts is not None:
            return self.sequential_starts + i * s.num_steps
        batch = slice(i * s.batch_size, (i + 1) * s.batch_size)
        if self.order_on_device is not None:
            windows = self.order_on_device[batch]
        else:
            assert self.order is not None
            windows = torch.tensor(self.order[batch], dtype=torch.int64)
        return self.offset + windows[s.rows] * s.num_steps

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.skip, self.num_batches):
            batch = self.source.gather(self.starts(i))
            if i + 1 < self.num_batches:
                self.source.read_ahead(self.starts(i + 1))  # read while batch i trains
            yield batch


def sequential(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random) -> Iterator[Batch]:
    """The seed's seq_data_iter_sequential: each row of X is a contiguous stream, so batch k+1
    continues batch k row by row and the recurrent state can be carried between them."""
    return iter(BatchSource(corpus, batch_size, num_steps, "sequential").epoch(rng))


def random_subsequences(corpus: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random) -> Iterator[Batch]:
    """The seed's seq_data_iter_random: non-overlapping subsequences in shuffled order."""
    return iter(BatchSource(corpus, batch_size, num_steps, "random").epoch(rng))


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
