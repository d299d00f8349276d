"""Text → vocabulary → token ids → the first max_tokens → train/validation split.

`prepare_data` is the one path training takes from a config to ids; `encode_text` is the same
normalization and encoding for a text scored by a trained model (`lstmlm evaluate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..corpus import Progress, locate
from ..errors import CorpusError
from ..vocab import Vocab
from . import batches, cache
from .text import content_sha1, normalize, read_text


@dataclass(frozen=True)
class Data:
    vocab: Vocab
    train: torch.Tensor  # int32 ids
    val: torch.Tensor  # int32 ids, empty without a validation split
    source_sha1: str | None = None  # the corpus's content hash (data.text.content_sha1): a resume checks it


def build_vocab(text: str, normalize: str) -> Vocab:
    """d2l: the seed's vocab (by descending frequency). raw: `<unk>` then every character by code point."""
    return Vocab.build(text, order="frequency" if normalize == "d2l" else "codepoint", unk=True)


def prepare_data(cfg: Config, vocab: Vocab | None = None, progress: Progress | None = None) -> Data:
    """The config's corpus as ids, split for training and validation.

    The vocabulary is built on the whole corpus (as d2l does) unless one is given (a resumed
    run keeps its own). The ids come from the content-keyed cache when it has them."""
    d = cfg.data
    path = locate(d.corpus, progress)
    where = cache.entry(path, d.normalize)
    hit = cache.load(where)
    if hit is not None and (vocab is None or hit[0] == vocab):
        vocab, ids = hit
    else:
        text = normalize(read_text(path), d.normalize)
        if not text:
            raise CorpusError(f"corpus {d.corpus} is empty after {d.normalize} normalization")
        built = build_vocab(text, d.normalize)
        ids = (vocab or built).encode(text)
        if vocab is None or vocab == built:
            cache.save(where, built, ids)
        vocab = vocab or built
    if d.max_tokens > 0:
        ids = ids[: d.max_tokens]
    parts = batches.split(ids, d.val_fraction)
    batches.check_length(len(parts.train), d.batch_size, d.num_steps, "training text")
    return Data(vocab, parts.train, parts.val, content_sha1(path))


@dataclass(frozen=True)
class Encoded:
    text: str  # normalized as the model was trained
    ids: torch.Tensor  # int32; characters outside the vocabulary read as <unk>
    unknown: int  # how many characters were outside the vocabulary


def encode_text(text: str, vocab: Vocab, mode: str) -> Encoded:
    """A text as a model trained in `mode` reads it."""
    seen = normalize(text, mode)
    ids = vocab.encode(seen)
    return Encoded(seen, ids, vocab.count_unknown(ids))
