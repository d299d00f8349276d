"""A model's size from its shapes alone, counted by its cells: no torch, no tensor made.

`lstmlm runs` counts the parameters of every run it lists without loading a model (or torch);
training counts them to refuse a model too large for the memory there is (`model.training_bytes`);
the default recipe sizes a model by its FLOPs, and `lstmlm bench` measures against them.

FLOPs per token (the recipe's cost of a model, `lstmlm bench`'s yardstick of utilisation): each multiply-add counts 2 FLOPs, and only the
matrix products the model needs are counted (the cell's `step_flops`),

    forward  = 2 · Σ_k G·H·(H + I_k)  +  2 · H·V
    training = 3 · forward              (backward = 2 · forward: gradients of inputs and of weights)

with G the cell's blocks (4 for the LSTM, 3 for the GRU, 1 for the RNN), H the hidden size, V
the vocabulary, and I_k the width of layer k's input: 0 for the first layer on one-hot input (a
row gather, no product), the embedding size with an embedding, H above the first layer. The d2l
LSTM (H 256, V 28, one layer, one-hot) makes 538,624 FLOPs per token forward, 1,615,872 per
token trained. Elementwise work (gates, softmax, clipping) is left out: it is a few percent of
the products at these sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import cells
from .config import Config, ModelConfig


def num_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """The model's parameter count from its shapes alone: no tensor is made, so a size too large
    for any memory is counted, not allocated.

        embedding V×E · per layer k: the cell's (`cells.num_parameters`) · output H×V + V
    """
    H, E, V = cfg.hidden, cfg.embedding, vocab_size
    core = sum(cells.num_parameters(cfg.cell, cfg.gru_form, (E or V) if k == 0 else H, H, cfg.model) for k in range(cfg.layers))
    return V * E + core + H * V + V


@dataclass(frozen=True)
class Dims:
    """The shapes that decide the speed: the model's and the batch's."""

    vocab_size: int
    hidden: int = 256
    layers: int = 1
    batch_size: int = 32
    num_steps: int = 35
    embedding: int = 0  # 0: one-hot input, as the seed
    cell: str = cells.DEFAULT
    form: str = "cudnn"  # the cell's variant (the GRU's d2l form runs another path at another speed)

    @classmethod
    def from_config(cls, cfg: Config, vocab_size: int) -> Dims:
        m, d = cfg.model, cfg.data
        return cls(vocab_size, m.hidden, m.layers, d.batch_size, d.num_steps, m.embedding, m.cell, m.gru_form)

    def config(self, core: str) -> Config:
        """A training config of these shapes, with d2l's SGD (lr 1) and clipping (θ = 1)."""
        shapes = {"model": core, "cell": self.cell, "gru_form": self.form, "hidden": self.hidden, "layers": self.layers, "embedding": self.embedding}
        return Config().with_overrides({**shapes, "batch_size": self.batch_size, "num_steps": self.num_steps})


def forward_flops_per_token(dims: Dims) -> int:
    """2 · (multiply-adds of the products) for one token, forward (see the module docstring)."""
    H, V = dims.hidden, dims.vocab_size
    first_input = dims.embedding  # one-hot: a gather, no product
    inputs = [first_input] + [H] * (dims.layers - 1)
    cell = cells.get(dims.cell, dims.form)
    return sum(cell.step_flops(I, H) for I in inputs) + 2 * H * V


def training_flops_per_token(dims: Dims) -> int:
    return 3 * forward_flops_per_token(dims)
