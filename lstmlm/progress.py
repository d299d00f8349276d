"""Where a training stands: everything a checkpoint keeps so that a resume continues exactly.

The data generator's state at the epoch's start, the batch index within the epoch, the
recurrent state carried mid-epoch (the cell's: (H, C) for the LSTM), torch's RNG, the epoch's
loss so far and the best validation: a run resumed from any checkpoint continues exactly as it
would have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Progress:
    """Where a training stands: what a checkpoint keeps so that a resume continues exactly."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the current epoch (0 at an epoch boundary)
    global_step: int = 0  # optimizer steps in all
    epoch_rng: Any = None  # random.Random state at the current epoch's start
    loss_sum: float = 0.0  # the current epoch's token-weighted loss so far
    tokens: int = 0  # the current epoch's tokens so far
    epoch_seconds: float = 0.0  # the current epoch's training time so far
    seconds: float = 0.0  # training time of the completed epochs
    total_tokens: int = 0
    best_val: float | None = None  # the best validation loss along this run's steps: patience counts from it
    best_saved: float | None = None  # the validation loss of the model in best.pt: only a lower one replaces it
    evals_since_best: int = 0
    last_val: float | None = None
    torch_rng: torch.Tensor | None = None
    carry: list[torch.Tensor] | None = None  # the recurrent state mid-epoch, for the sequential iterator
    grad_norm_sum: float = 0.0  # the current epoch's gradient norms so far, summed (its record's mean)
    grad_norm_steps: int = 0  # the steps they cover

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        version, internal, gauss = self.epoch_rng
        d["epoch_rng"] = [version, list(internal), gauss]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Progress:
        """A checkpoint's trainer state (`checkpoint.migrate` has brought it to today's names)."""
        progress = cls(**d)
        version, internal, gauss = d["epoch_rng"]
        progress.epoch_rng = (version, tuple(internal), gauss)
        return progress

    def close_epoch(self, next_rng: Any) -> tuple[float, float, int]:
        """Roll over to the next epoch, whose generator starts from `next_rng`; the closed
        epoch's (training loss, seconds, tokens)."""
        closed = self.loss_sum / self.tokens, self.epoch_seconds, self.tokens
        self.seconds += self.epoch_seconds
        self.total_tokens += self.tokens
        self.epoch += 1
        self.batch, self.tokens, self.loss_sum, self.epoch_seconds, self.carry = 0, 0, 0.0, 0.0, None
        self.grad_norm_sum, self.grad_norm_steps = 0.0, 0
        self.epoch_rng = next_rng
        return closed

    def validated(self, loss: float) -> bool:
        """Record a validation loss; whether it beats best.pt's (which it then replaces).

        Two figures, which agree unless a resume replays steps from a latest.pt older than
        best.pt: `best_val` follows this run's steps (so patience counts as if never
        interrupted), `best_saved` is best.pt's (so best.pt is only ever replaced by a better model)."""
        self.last_val = loss
        if self.best_val is None or loss < self.best_val:
            self.best_val, self.evals_since_best = loss, 0
        else:
            self.evals_since_best += 1
        better = self.best_saved is None or loss < self.best_saved
        if better:
            self.best_saved = loss
        return better

    @property
    def all_seconds(self) -> float:
        """Training time so far, the current epoch's included."""
        return self.seconds + self.epoch_seconds

    @property
    def all_tokens(self) -> int:
        """Tokens trained on so far, the current epoch's included."""
        return self.total_tokens + self.tokens
