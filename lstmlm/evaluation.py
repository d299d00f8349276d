"""How well a model predicts a text: mean loss in nats, perplexity, bits per character.

The one evaluation both training's validation and `lstmlm evaluate` run, so the figure that
`evaluate` prints for the validation text is the one training reported.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.pipeline import encode_text
from .device import autocast
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
    model: CharLM, ids: torch.Tensor, batch_size: int, num_steps: int, device: torch.device, precision: str = "fp32"
) -> tuple[float, int]:
    """(mean loss in nats, characters predicted) over the whole text, the state carried.

    The text is cut into `streams` contiguous rows read in parallel, each from a zero state;
    every character after a row's first is predicted once.
    """
    streams = min(batch_size, max(1, (len(ids) - 1) // num_steps))
    columns = (len(ids) - 1) // streams
    if columns < 1:
        raise TrainingError(f"text of {len(ids)} characters is too short to evaluate")
    X = ids[: streams * columns].long().reshape(streams, columns).to(device)
    Y = ids[1 : streams * columns + 1].long().reshape(streams, columns).to(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    for i in range(0, columns, num_steps):
        with autocast(device, precision):
            logits, state = model(X[:, i : i + num_steps], state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y[:, i : i + num_steps].reshape(-1), reduction="sum").double()
    model.train(was_training)
    return total.item() / (streams * columns), streams * columns


@dataclass(frozen=True)
class Score:
    characters: int  # in the text, after normalization
    predicted: int  # characters the model predicted (all but each stream's first)
    unknown_characters: int  # read as <unk>
    loss: float  # nats per character
    perplexity: float
    bits_per_char: float


def score_text(
    model: CharLM, vocab: Vocab, text: str, normalize: str, batch_size: int, num_steps: int, device: torch.device, precision: str
) -> Score:
    """A text, normalized as the model was trained, scored as validation scores."""
    encoded = encode_text(text, vocab, normalize)
    loss, count = evaluate(model.to(device), encoded.ids, batch_size, num_steps, device, precision)
    return Score(len(encoded.text), count, encoded.unknown, loss, perplexity(loss), bits_per_char(loss))
