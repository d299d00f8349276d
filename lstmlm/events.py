"""What training reports, as plain frozen dataclasses: `Trainer.run` yields them, the CLI renders
them (a progress bar, samples, JSON lines), tests `list(...)` them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy's, which the command line starts without
    from .baselines import Baselines


@dataclass(frozen=True)
class Started:
    run: str
    device: str
    precision: str
    model: str
    cell: str  # lstm, gru, rnn (and the GRU's form where it is not cudnn's: "gru (d2l)")
    path: str  # how the scratch core's recurrence runs: loop, fused, compiled, graph; "cudnn" for torch's core
    vocab_size: int
    num_params: int
    train_tokens: int
    val_tokens: int
    batches_per_epoch: int
    start_epoch: int
    epochs: int


@dataclass(frozen=True)
class Baselined:
    baselines: Baselines  # what simple models score on the text validation scores (baselines.py); rank 0, after Started


@dataclass(frozen=True)
class Stepped:
    epoch: int  # 1-based, the epoch in progress
    step: int  # batches done in this epoch
    global_step: int
    batches: int = 0  # batches in this epoch
    tokens: int = 0  # tokens trained on in this epoch so far (all processes)
    epoch_tokens: int = 0  # tokens in the whole epoch
    tokens_per_s: float = 0.0  # this epoch's rate so far
    session_seconds: float = 0.0  # since this session's training began: its --max-minutes counts from then

    def epochs_reached(self, epochs: int, max_minutes: float) -> float:
        """The epoch the run will end at: `epochs`, or sooner where `max_minutes` ends it (at
        this epoch's rate, the epochs the time left holds, counted from where it stands)."""
        if not max_minutes or self.tokens_per_s <= 0 or self.epoch_tokens <= 0:
            return float(epochs)
        done = self.epoch - 1 + self.tokens / self.epoch_tokens
        more = max(0.0, max_minutes * 60 - self.session_seconds) * self.tokens_per_s / self.epoch_tokens
        return min(float(epochs), done + more)


@dataclass(frozen=True)
class Evaluated:
    epoch: int  # epochs completed
    global_step: int
    val_perplexity: float
    val_bpc: float  # bits per token: per character, or per byte in bytes mode
    best: bool  # better than the model in best.pt: best.pt was just written
    val_loss: float  # nats per token: the mean cross-entropy the perplexity and the bits are of


@dataclass(frozen=True)
class EpochEnded:
    epoch: int
    train_perplexity: float
    val_perplexity: float | None
    val_bpc: float | None
    tokens_per_s: float
    seconds: float
    lr: float
    global_step: int = 0  # optimizer steps at the epoch's end
    grad_norm: float | None = None  # the mean gradient norm (before clipping) over the epoch's steps


@dataclass(frozen=True)
class Sampled:
    epoch: int
    prefix: str
    text: str


@dataclass(frozen=True)
class Saved:
    epoch: int
    path: str


@dataclass(frozen=True)
class Finished:
    reason: str  # completed | interrupted | early_stop | time_limit
    perplexity: float  # training perplexity: the last epoch's, or the interrupted epoch's so far
    val_perplexity: float | None
    tokens_per_s: float
    device: str
    model: str
    run: str
    epochs: int  # epochs completed
    vocab_size: int
    samples: dict[str, str]
    best_val_perplexity: float | None = None  # the model in best.pt's


@dataclass(frozen=True)
class Warned:
    message: str  # one line: something the user should know that does not stop training


@dataclass(frozen=True)
class Noted:
    message: str  # one line about what training is doing before its first step (a one-time build)


Event = Baselined | Started | Warned | Noted | Stepped | Evaluated | EpochEnded | Sampled | Saved | Finished
