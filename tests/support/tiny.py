"""Small data and models, so that tests run in seconds: a word salad to train on, an untrained
model lively enough that its outputs move, a tiny config, and d2l's configured data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lstmlm.config import Config
    from lstmlm.data.pipeline import Data
    from lstmlm.model import CharLM
    from lstmlm.vocab import Vocab

CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs"

# A few thousand characters of word salad over d2l-like words: fast to train on, learnable within
# a few epochs, and it holds every character of "time traveller" (so d2l samples work on it).
_WORDS = (
    "the time traveller for so it will be convenient to speak of him was expounding a recondite "
    "matter to us his grey eyes shone and twinkled and his usually pale face was flushed and animated"
).split()


def lively_model(
    vocab: Vocab, core: str = "scratch", layers: int = 1, embedding: int = 0, seed: int = 0, scale: float = 0.8, cell: str = "lstm", path: str = "auto"
) -> CharLM:
    """An untrained model (24 hiddens) with weights N(0, scale²), large enough that its logits, and
    their argmax, move from step to step."""
    import torch

    from lstmlm.model import CharLM

    torch.manual_seed(seed)
    net = CharLM(len(vocab), num_hiddens=24, num_layers=layers, core=core, embedding=embedding, cell=cell, path=path)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, scale)
    return net.eval()


def synthetic_text(lines: int = 60, seed: int = 1234) -> str:
    import random

    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(5, 12))) + "\n" for _ in range(lines))


def tiny_config(corpus: Path, **overrides: object) -> Config:
    """A config for a tiny model (16 hidden, batches of 8×10) on a local text file, raw mode."""
    from lstmlm.config import Config

    base = {
        "corpus": str(corpus), "normalize": "raw", "hidden": 16, "batch_size": 8, "num_steps": 10,
        "epochs": 3, "device": "cpu", "val_fraction": 0.1,
    }  # fmt: skip
    return Config().with_overrides({**base, **overrides}).resolved()


def d2l_data(corpus: Path, **overrides: object) -> Data:
    """What `lstmlm train --config configs/d2l.toml --corpus CORPUS` trains on: the path training takes."""
    from lstmlm import config_file
    from lstmlm.data.pipeline import prepare_data

    cfg = config_file.load(CONFIGS / "d2l.toml").with_overrides({"corpus": str(corpus), **overrides}).resolved()
    return prepare_data(cfg)
