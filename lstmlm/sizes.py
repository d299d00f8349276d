"""A model's size from its config alone: no torch, no tensor made.

`lstmlm runs` counts the parameters of every run it lists without loading a model (or torch);
training counts them to refuse a model too large for the memory there is (`model.training_bytes`).
"""

from __future__ import annotations

from . import cells
from .config import ModelConfig


def num_parameters(cfg: ModelConfig, vocab_size: int) -> int:
    """The model's parameter count from its shapes alone: no tensor is made, so a size too large
    for any memory is counted, not allocated.

        embedding V×E · per layer k: the cell's (`cells.num_parameters`) · output H×V + V
    """
    H, E, V = cfg.hidden, cfg.embedding, vocab_size
    core = sum(cells.num_parameters(cfg.cell, cfg.gru_form, (E or V) if k == 0 else H, H, cfg.model) for k in range(cfg.layers))
    return V * E + core + H * V + V
