"""How well a model predicts a text: mean loss in nats, perplexity, bits per character (per
byte in bytes mode).

The one evaluation both training's validation and `lstmlm evaluate` run, so the figure that
`evaluate` prints for the validation text is the one training reported (training may read a
bounded sample of it, `val_tokens`, so that validating a 10 GB corpus's tail takes seconds;
`evaluate` reads all of it). The text is read a block of columns at a time from its ids (a
memory map, for a corpus's validation or test part): never copied whole. Under torchrun each
process reads its block of the streams and the loss sums are added up: the figure one process
would get, to float rounding.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .baselines import Scored
from .data.pipeline import encode_text
from .data.text import token_unit
from .device import autocast
from .distributed import World, sum_all
from .errors import TrainingError
from .model import CharLM
from .vocab import Vocab

MAX_LOSS = math.log(sys.float_info.max)  # nats per character; above it exp (perplexity) overflows


def bits_per_char(loss: float) -> float:
    return loss / math.log(2)


def perplexity(loss: float) -> float:
    """exp(loss), infinite where it would overflow."""
    return math.exp(loss) if loss <= MAX_LOSS else math.inf


@torch.no_grad()
def evaluate(
    model: CharLM,
    ids: torch.Tensor,
    batch_size: int,
    num_steps: int,
    device: torch.device,
    precision: str = "fp32",
    max_tokens: int = 0,
    world: World = World(),
) -> tuple[float, int]:
    """(mean loss in nats, characters predicted) over the text, the state carried.

    The text is cut into `streams` contiguous rows read in parallel, each from a zero state;
    every character after a row's first is predicted once. With `max_tokens`, each row reads
    only its first max_tokens / streams characters: a fixed sample, spread over the whole text.
    Under torchrun (`world` active) this process reads its block of the rows.
    """
    streams, row_length, columns = layout(len(ids), batch_size, num_steps, max_tokens)
    starts = torch.arange(streams, dtype=torch.int64)[world.rows(streams)] * row_length  # (this process's streams,)
    total = sum_all(loss_sum(model, ids, starts, columns, num_steps, device, precision), world)
    return total.item() / (streams * columns), streams * columns


def layout(length: int, batch_size: int, num_steps: int, max_tokens: int = 0) -> tuple[int, int, int]:
    """How `evaluate` reads a text of `length` characters: (streams, row length, columns read
    of each row). Stream s starts at s · row length and predicts the `columns` characters after
    its first (`baselines.py` scores the very same ones)."""
    streams = min(batch_size, max(1, (length - 1) // num_steps))
    row_length = (length - 1) // streams
    if row_length < 1:
        raise TrainingError(f"a text of {length} character{'s' if length != 1 else ''} is too short to evaluate: it takes 2, one to read and one to predict")
    columns = min(row_length, max(1, max_tokens // streams)) if max_tokens > 0 else row_length
    return streams, row_length, columns


def loss_sum(model: CharLM, ids: torch.Tensor, starts: torch.Tensor, columns: int, num_steps: int, device: torch.device, precision: str) -> torch.Tensor:
    """The summed loss (float64, on the device) of predicting `columns` characters of each
    stream that starts at `starts`, num_steps columns at a time, the state carried."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    if not len(starts):  # a process left without a stream (more processes than streams)
        return total
    was_training = model.training
    model.eval()
    state = None
    for i in range(0, columns, num_steps):
        width = min(num_steps, columns - i)
        W = ids[(starts + i)[:, None] + torch.arange(width + 1)].long().to(device)  # (streams, width + 1)
        X, Y = W[:, :-1], W[:, 1:]
        with autocast(device, precision):
            logits, state = model(X, state)
        # summed in float64 position by position: the sum is then the same however the streams are shared out
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1), reduction="none").double().sum()
    model.train(was_training)
    return total


@dataclass(frozen=True)
class Score:
    characters: int  # in the text, after normalization (bytes, in bytes mode)
    predicted: int  # characters the model predicted (all but each stream's first)
    unknown_characters: int  # read as <unk>
    loss: float  # nats per character
    perplexity: float
    bits_per_char: float  # bits per byte in bytes mode
    unit: str = "character"  # what a token is: "character", or "byte" in bytes mode
    baselines: Scored | None = None  # what the run's unigram and bigram models score on the same characters (baselines.py)


def score_ids(model: CharLM, ids: torch.Tensor, unknown: int, mode: str, batch_size: int, num_steps: int, device: torch.device, precision: str) -> Score:
    """Ids of a text, as the model was trained to read it, scored as validation scores (all of them)."""
    loss, count = evaluate(model.to(device), ids, batch_size, num_steps, device, precision)
    return Score(len(ids), count, unknown, loss, perplexity(loss), bits_per_char(loss), token_unit(mode))


def score_text(model: CharLM, vocab: Vocab, text: str, normalize: str, batch_size: int, num_steps: int, device: torch.device, precision: str) -> Score:
    """A text, normalized as the model was trained, scored as validation scores."""
    encoded = encode_text(text, vocab, normalize)
    return score_ids(model, encoded.ids, encoded.unknown, normalize, batch_size, num_steps, device, precision)
