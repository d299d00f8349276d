"""The recurrent state a training carries from batch to batch (the sequential iterator's).

Between batches it is detached, so gradients flow back only through the current `num_steps`
(the seed's truncated backpropagation); with `reset_every`, each row starts afresh once every
N batches, the rows staggered; for a mid-epoch checkpoint it is gathered from every process
(each holds its rows of the batch), and on resume each process takes its rows back.
"""

from __future__ import annotations

import torch

from .cells.base import State
from .distributed import World, all_gather


def next_batch(carry: State, batch: int, reset_every: int, batch_size: int, world: World) -> State:
    """The state the next batch starts from: `carry` detached, with the rows due to start
    afresh zeroed — row r every `reset_every` batches, at batch r·N/batch_size of each cycle,
    so each batch has its share of fresh rows. Decided by the batch within the epoch and the
    row's place in the whole batch, both saved and the same on every process: a resume and a
    torchrun stay exact."""
    carry = tuple(S.detach() for S in carry)  # truncate backprop at the batch edge
    if reset_every <= 0:
        return carry
    rows = torch.arange(batch_size, device=carry[0].device)[world.rows(batch_size)]  # made on the device: no copy, no wait
    keep = ((batch + rows * reset_every // batch_size) % reset_every != 0)[None, :, None]
    return tuple(S * keep.to(S.dtype) for S in carry)


def gathered(carry: State | None, world: World) -> State | None:
    """Every stream's state, from every process, for a mid-epoch checkpoint."""
    if carry is None or not world.active:
        return carry
    return tuple(torch.cat(all_gather(S.detach().contiguous(), world), dim=1) for S in carry)


def own_rows(saved: list[torch.Tensor] | None, batch_size: int, world: World, device: torch.device) -> State | None:
    """This process's rows of the state a mid-epoch checkpoint carried, or None."""
    if saved is None:
        return None
    rows = world.rows(batch_size)
    return tuple(S[:, rows].to(device) for S in saved)
