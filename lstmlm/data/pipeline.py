"""Corpus → token store → the first max_tokens → train / validation (/ test) split.

`prepare_data` is the one path training (and `evaluate --part`) takes from a config to ids;
`encode_file` is the same reading of any text file under a trained model's vocabulary
(`lstmlm evaluate FILE`); `encode_text` the same for a short string.

Every part is a view of the memory-mapped store (`store.py`): slicing off max_tokens or a split
copies nothing, whatever the corpus's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config
from ..errors import CorpusError
from ..splits import parse_split
from ..vocab import Vocab
from . import batches
from .download import StageProgress
from .files import Skipped, select
from .store import encode_corpus
from .storefile import TokenStore
from .text import normalize


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8)


@dataclass(frozen=True)
class Data:
    vocab: Vocab
    train: torch.Tensor  # ids (uint8, uint16 or int32): a view of the memory-mapped store
    val: torch.Tensor  # ids; empty without a validation split
    test: torch.Tensor = field(default_factory=_empty)  # ids; empty without a test split
    source_sha1: str = ""  # the content hash of the corpus files as read (skipped files left out)
    skipped: tuple[Skipped, ...] = ()  # files of a directory or glob that were left out
    warnings: tuple[str, ...] = ()  # one line each, for the user (the CLI prints them)


def build_vocab(text: str, normalize: str) -> Vocab:
    """A whole text's vocabulary, as a store's is built: d2l by descending frequency, else `<unk>`
    then every character by code point (`benchmarks/bench_train.py` uses it on the seed's text)."""
    return Vocab.build(text, order="frequency" if normalize == "d2l" else "codepoint", unk=True)


def prepare_data(cfg: Config, vocab: Vocab | None = None, progress: StageProgress | None = None, scratch: Path | None = None) -> Data:
    """The config's corpus as ids, split for training, validation (and test).

    The vocabulary is built on the whole corpus (as d2l does) unless one is given (a resumed
    run keeps its own). The ids come from the content-keyed store when it has them; otherwise
    the corpus is encoded into one (`progress` follows each stage: downloading, reading,
    encoding). `scratch`: where a store goes if the cache cannot take it."""
    d = cfg.resolved().data
    encoded = encode_corpus(select(d.corpus, progress), d.normalize, vocab, d.strict, progress, scratch)
    store = encoded.store
    ids = store.ids[: d.max_tokens] if d.max_tokens > 0 else store.ids
    if d.split:
        train, val, test = split_by_sizes(ids, d.split)
    else:
        parts = batches.split(ids, d.val_fraction)
        train, val, test = parts.train, parts.val, ids[:0]
    batches.check_length(len(train), d.batch_size, d.num_steps, "training text")
    return Data(store.vocab, train, val, test, store.source_sha1, encoded.skipped, encoded.warnings)


def split_by_sizes(ids: torch.Tensor, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train, validation and test from the start of the text, by `split`'s sizes ('90M,5M,5M':
    the first 90 M tokens train, the next 5 M validate, the 5 M after test; fractions likewise)."""
    parsed = parse_split(split)
    counts = [int(len(ids) * s) if parsed.fractions else int(s) for s in parsed.sizes]
    if sum(counts) > len(ids):
        raise CorpusError(f"the split {split} asks for {sum(counts):,} tokens; the corpus has {len(ids):,}")
    counts += [0] * (3 - len(counts))
    a, b, c = counts
    return ids[:a], ids[a : a + b], ids[a + b : a + b + c]


@dataclass(frozen=True)
class EncodedFile:
    ids: torch.Tensor
    unknown: int  # characters outside the vocabulary, read as <unk>


def encode_file(path: Path, vocab: Vocab, mode: str, progress: StageProgress | None = None, scratch: Path | None = None) -> EncodedFile:
    """A text file (or directory, or glob) as a model trained in `mode` reads it, under its
    vocabulary: streamed into a store like a corpus, so a file of any size is scored."""
    if not os.path.lexists(path) and not any(c in str(path) for c in "*?["):  # a link that loops exists: stat says why it cannot be read
        raise CorpusError(f"corpus file not found: {path}")
    store: TokenStore = encode_corpus(select(str(path), progress), mode, vocab, progress=progress, scratch=scratch).store
    return EncodedFile(store.ids, store.unknown)


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
