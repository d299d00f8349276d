"""Is a loss any good? What three simple models of the training text score on the validation
text, in bits per character (per byte in bytes mode), beside the model's own figure:

    uniform   log2 V: every symbol of the vocabulary alike (V counts <unk>)
    unigram   add-one (Laplace) smoothing:  P(b) = (c(b) + 1) / (N + V)
    bigram    interpolated Kneser–Ney (Chen & Goodman 1998), one discount D for both orders:

              P(b | a)   = max(c(ab) − D, 0) / c(a•) + D · N1+(a•) / c(a•) · P_kn(b)
              P_kn(b)    = max(N1+(•b) − D, 0) / N1+(••) + D · N1+(•*) / N1+(••) · 1/V

              c(ab) the count of the pair, c(a•) = Σ_b c(ab), N1+(a•) the distinct symbols seen
              after a, N1+(•b) those seen before b, N1+(••) the distinct pairs, N1+(•*) the
              symbols seen after anything. The lower order counts the contexts a symbol
              continues, not its occurrences (Kneser–Ney's point), and gives every symbol of
              the vocabulary a share, so no text scores an infinite loss. A context never seen
              (c(a•) = 0) falls back to P_kn. D = n1 / (n1 + 2·n2) (Ney, Essen & Kneser 1994;
              n1, n2: the pairs seen once, twice), kept within [0.1, 0.9].

The counts come from the training text, read from its memory-mapped store a chunk at a time:
np.bincount of the pair codes a·V + b (V² bins where V ≤ 2,048, else np.unique per chunk),
on a few threads, never a Python loop over tokens. The model scores the very characters
training's validation predicts (`evaluation.layout`, on the `val_tokens` sample), so the
figures are directly comparable; a run without validation text scores its training text
(in-sample, which flatters the bigram: said so in the record's `text`).

A run keeps both: `baselines.json` (the figures, read without torch: plot, the server) and
`counts.npz` (the counts, from which `lstmlm evaluate` scores any text the same way).
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import write_atomic, write_text_atomic
from .errors import CheckpointError
from .runs import open_regular, read_regular

if TYPE_CHECKING:
    import torch

    Ids = np.ndarray | torch.Tensor

UNIGRAM = "Laplace add-one"
BIGRAM = "interpolated Kneser–Ney"
FIGURES, COUNTS = "baselines.json", "counts.npz"
NAMES = ("uniform", "unigram", "bigram")  # the three models, worst first: the fields of Baselines that are bits
FORMAT = 1

CHUNK = 1 << 22  # tokens a thread counts at a time: ~50 MB of int64 codes and temporaries
WORKERS = 2  # threads counting at once (numpy's casts and arithmetic run without the GIL)
DENSE_BINS = 1 << 22  # V² bins counted densely up to here (V ≤ 2,048): 32 MB a thread
SCORE_BLOCK = 1 << 20  # positions scored at a time
MAX_INFLATION = 64  # counts.npz inflates to 2–4 times its size; a file claiming more than this is not counts
MAX_BITS = 1024  # a stored baseline at or above it is damage: 2^bits, its perplexity, is beyond a float
D_RANGE = (0.1, 0.9)  # Ney's discount where the counts give one; 0.75 where they do not (no pair seen once or twice)


# ---- counts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """A text's unigram and bigram counts, the bigrams as the sorted codes a·V + b of the pairs seen."""

    vocab_size: int
    unigrams: np.ndarray  # (V,) int64: c(b) over every token
    pairs: np.ndarray  # (P,) int64 codes a·V + b, ascending
    pair_counts: np.ndarray  # (P,) int64 c(ab)

    @property
    def tokens(self) -> int:
        return int(self.unigrams.sum())


def as_array(ids: Ids) -> np.ndarray:
    """A token store's ids (a torch view of the memory map, or numpy) as numpy, without a copy."""
    return ids if isinstance(ids, np.ndarray) else ids.numpy()


def count(ids: Ids, vocab_size: int, chunk: int = CHUNK, workers: int = WORKERS) -> Counts:
    """Unigram and bigram counts of `ids`, a chunk of pairs at a time on `workers` threads."""
    tokens = as_array(ids)
    V = vocab_size
    unigrams = np.zeros(V, dtype=np.int64)
    if len(tokens) == 0:
        return Counts(V, unigrams, np.zeros(0, np.int64), np.zeros(0, np.int64))
    starts = range(0, len(tokens) - 1, chunk)  # chunk i holds the pairs (t, t + 1) for t in [start, start + chunk)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        if V * V <= DENSE_BINS:
            total = np.zeros(V * V, dtype=np.int64)
            for bins in pool.map(lambda s: _dense(tokens[s : s + chunk + 1], V), starts):
                total += bins
            pairs = np.flatnonzero(total)
            pair_counts = total[pairs]
        else:
            pairs, pair_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for codes, n in pool.map(lambda s: np.unique(_codes(tokens[s : s + chunk + 1], V), return_counts=True), starts):
                pairs, pair_counts = _merge(pairs, pair_counts, codes, n)
    np.add.at(unigrams, pairs % V, pair_counts)  # every token but the first follows one
    unigrams[int(tokens[0])] += 1
    return Counts(V, unigrams, pairs.astype(np.int64), pair_counts.astype(np.int64))


def _codes(window: np.ndarray, V: int) -> np.ndarray:
    """The pair codes a·V + b of consecutive tokens in `window`."""
    codes = window[:-1].astype(np.int64)
    codes *= V
    codes += window[1:]
    return codes


def _dense(window: np.ndarray, V: int) -> np.ndarray:
    return np.bincount(_codes(window, V), minlength=V * V)


def _merge(pairs: np.ndarray, counts: np.ndarray, more: np.ndarray, more_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted sparse counts as one."""
    codes, where = np.unique(np.concatenate([pairs, more]), return_inverse=True)
    merged = np.zeros(len(codes), dtype=np.int64)
    np.add.at(merged, where, np.concatenate([counts, more_counts]))
    return codes, merged


# ---- the models ----------------------------------------------------------------------------------


def add_one(counts: Counts) -> np.ndarray:
    """P(b) = (c(b) + 1) / (N + V): the unigram model, (V,) float64."""
    return (counts.unigrams + 1.0) / (counts.tokens + counts.vocab_size)


@dataclass(frozen=True)
class KneserNey:
    """The interpolated Kneser–Ney bigram model of `counts` (the module's docstring has its equations)."""

    counts: Counts
    discount: float  # D
    context_total: np.ndarray  # (V,) c(a•)
    context_types: np.ndarray  # (V,) N1+(a•)
    lower: np.ndarray  # (V,) P_kn(b)

    @classmethod
    def of(cls, counts: Counts) -> KneserNey:
        V, pairs, n = counts.vocab_size, counts.pairs, counts.pair_counts
        before, after = pairs // V, pairs % V
        context_total = np.zeros(V, dtype=np.int64)
        np.add.at(context_total, before, n)
        context_types = np.bincount(before, minlength=V)
        continued = np.bincount(after, minlength=V)  # N1+(•b)
        D = discount(n)
        types = len(pairs)  # N1+(••)
        if types == 0:  # a text of one token: no pair to learn from
            lower = np.full(V, 1.0 / V)
        else:
            lower = np.maximum(continued - D, 0.0) / types + D * np.count_nonzero(continued) / types / V
        return cls(counts, D, context_total, context_types, lower)

    def probability(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """P(b | a) for each pair of the two id arrays."""
        V, pairs = self.counts.vocab_size, self.counts.pairs
        codes = a.astype(np.int64) * V + b
        at = np.minimum(np.searchsorted(pairs, codes), max(len(pairs) - 1, 0))
        seen = (pairs[at] == codes) if len(pairs) else np.zeros(len(codes), dtype=bool)
        c_ab = np.where(seen, self.counts.pair_counts[at] if len(pairs) else 0, 0)
        total = self.context_total[a]
        safe = np.maximum(total, 1)
        p = np.maximum(c_ab - self.discount, 0.0) / safe + self.discount * self.context_types[a] / safe * self.lower[b]
        chosen: np.ndarray = np.where(total > 0, p, self.lower[b])
        return chosen


def discount(pair_counts: np.ndarray) -> float:
    """Ney's D = n1 / (n1 + 2·n2), within D_RANGE; 0.75 where no pair was seen once or twice."""
    n1, n2 = int(np.count_nonzero(pair_counts == 1)), int(np.count_nonzero(pair_counts == 2))
    if n1 == 0 and n2 == 0:
        return 0.75
    return min(max(n1 / (n1 + 2 * n2), D_RANGE[0]), D_RANGE[1])


# ---- scoring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    unigram: float  # bits per token
    bigram: float
    uniform: float
    discount: float
    predicted: int  # tokens scored


def score(counts: Counts, ids: Ids, streams: int, row_length: int, columns: int) -> Scored:
    """Bits per token of each model over the tokens `evaluation.evaluate` predicts when it reads
    `ids` as `streams` rows of `row_length` (`columns` of each): token s·row_length + 1 + j
    after the one before it, for each stream s and j < columns."""
    tokens = as_array(ids)
    unigram, bigram = np.log2(add_one(counts)), KneserNey.of(counts)
    starts = np.arange(streams, dtype=np.int64)[:, None] * row_length + 1  # (streams, 1)
    step = max(1, SCORE_BLOCK // streams)
    uni_bits = bi_bits = 0.0
    for j in range(0, columns, step):
        at = (starts + np.arange(j, min(columns, j + step))).ravel()  # (streams × block,) positions predicted
        b, a = tokens[at].astype(np.int64), tokens[at - 1].astype(np.int64)
        uni_bits -= float(unigram[b].sum())
        bi_bits -= float(np.log2(bigram.probability(a, b)).sum())
    n = streams * columns
    return Scored(uni_bits / n, bi_bits / n, math.log2(counts.vocab_size), bigram.discount, n)


# ---- what a run keeps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Baselines:
    """A run's baselines, as `baselines.json` keeps them."""

    uniform: float  # bits per token: log2 V
    unigram: float  # add-one
    bigram: float  # interpolated Kneser–Ney
    discount: float  # its D
    text: str  # what was scored: "validation", or "training" (in-sample) where the run has no validation text
    predicted: int  # tokens scored
    counted: int  # training tokens counted
    vocab_size: int
    unit: str  # "character", or "byte" in bytes mode
    val_tokens: int  # the validation sample they were scored on (train.val_tokens; 0: all)
    seconds: float  # counting and scoring took
    unigram_smoothing: str = UNIGRAM
    bigram_smoothing: str = BIGRAM

    @classmethod
    def from_dict(cls, raw: Any) -> Baselines | None:
        """The record, or None for one this version cannot read (missing fields, wrong types, a
        figure no scoring gives: each is drawn as a line at 2^bits, which must be a number)."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            return None
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = raw.get(f.name)
            kind = {"float": (int, float), "int": (int,), "str": (str,)}[str(f.type)]
            if not isinstance(value, kind) or isinstance(value, bool):
                return None
            try:
                values[f.name] = float(value) if f.type == "float" else value
            except OverflowError:  # an integer too large for a float (JSON's digits have no limit)
                return None
        if not all(0 <= values[name] < MAX_BITS for name in NAMES):  # NaN fails it too
            return None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


def read(run_dir: Path) -> Baselines | None:
    """A run's baselines, or None where it has none (made before lstmlm kept them) or they do
    not read: they are a reference beside the run's figures, never a reason to fail."""
    path = Path(run_dir) / FIGURES
    if not path.is_file():
        return None
    try:
        return Baselines.from_dict(json.loads(read_regular(path)))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, CheckpointError):
        return None


def write(run_dir: Path, baselines: Baselines) -> None:
    write_text_atomic(Path(run_dir) / FIGURES, json.dumps(baselines.to_dict(), indent=2, ensure_ascii=False), "run's baselines")


def save_counts(run_dir: Path, counts: Counts) -> None:
    def write_npz(f: Any) -> None:
        np.savez_compressed(f, vocab_size=counts.vocab_size, unigrams=counts.unigrams, pairs=counts.pairs, pair_counts=counts.pair_counts)

    write_atomic(Path(run_dir) / COUNTS, write_npz, "run's counts")


def load_counts(run_dir: Path) -> Counts | None:
    """The run's counts, or None where it has none or they do not read (never pickles: no code runs)."""
    path = Path(run_dir) / COUNTS
    if not path.is_file():
        return None
    try:
        with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as f:
            if sum(entry.file_size for entry in zipfile.ZipFile(f).infolist()) > MAX_INFLATION * max(os.fstat(f.fileno()).st_size, 1 << 16):
                return None  # a zip bomb, not counts: numpy would inflate it whole
            f.seek(0)
            with np.load(f, allow_pickle=False) as npz:
                V = int(npz["vocab_size"])
                counts = Counts(V, npz["unigrams"].astype(np.int64), npz["pairs"].astype(np.int64), npz["pair_counts"].astype(np.int64))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, CheckpointError, MemoryError):  # MemoryError: a header claiming more than there is
        return None
    sane = len(counts.unigrams) == V and len(counts.pairs) == len(counts.pair_counts) and bool(np.all(counts.pairs < V * V))
    return counts if sane else None


def for_training(run_dir: Path, train: Ids, val: Ids, vocab_size: int, unit: str, batch_size: int, num_steps: int, val_tokens: int) -> Baselines:
    """The run's baselines: those it keeps, where they were scored as this training validates;
    else counted (or taken from its counts.npz), scored, and kept."""
    from .evaluation import layout

    stored = read(run_dir)
    if stored is not None and (stored.vocab_size, stored.counted, stored.val_tokens) == (vocab_size, len(train), val_tokens):
        return stored
    start = time.perf_counter()
    counts = load_counts(run_dir)
    if counts is None or (counts.vocab_size, counts.tokens) != (vocab_size, len(train)):
        counts = count(train, vocab_size)
        save_counts(run_dir, counts)
    text, ids = ("validation", val) if len(val) > 1 else ("training", train)
    scored = score(counts, ids, *layout(len(ids), batch_size, num_steps, val_tokens))
    seconds = time.perf_counter() - start
    baselines = Baselines(
        scored.uniform, scored.unigram, scored.bigram, scored.discount, text, scored.predicted, counts.tokens, vocab_size, unit, val_tokens, seconds
    )
    write(run_dir, baselines)
    return baselines


def for_text(run_dir: Path, ids: Ids, batch_size: int, num_steps: int) -> Scored | None:
    """The baselines of any text (`lstmlm evaluate`), from the run's counts, scored on the very
    characters evaluate predicts; None for a run that keeps no counts."""
    from .evaluation import layout

    counts = load_counts(run_dir)
    if counts is None or len(ids) < 2:
        return None
    return score(counts, ids, *layout(len(ids), batch_size, num_steps))
