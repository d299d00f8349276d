"""The default recipe: a model and its training chosen from the corpus, the vocabulary, this
machine's speed and the minutes there are (`lstmlm train --corpus C --max-minutes M`, no config).

`choose` is a pure function of those four numbers. The speed is what `PROBE`, a fixed model,
trains at here (training.py times a few of its batches before the run is created); times its
FLOPs per token and the seconds, that is the compute the run has. training.py then times the
model chosen and chooses again for its rate (`probe_speed_of`): a wide layer's products run
nearer the machine's peak than the probe's. The rule:

    size      a model of P weights costs F(P) FLOPs per trained token (sizes.py's count, from the cell), so in
              the time it sees compute / F(P) tokens; the widest model that still sees
              TOKENS_PER_PARAMETER tokens per weight, and has at most PARAMETERS_PER_TOKEN
              weights per token of the corpus (past that it learns the text by heart)
    depth     one layer, a second (third) only once one layer would be wider than WIDE
    lr        Adam, BASE_LR for a BASE_HIDDEN-wide layer, × √(BASE_HIDDEN / hidden): wider
              layers sum more terms into each unit, so they take smaller steps
    batches   NUM_STEPS characters per sequence, a batch of a power of two that makes about
              TARGET_UPDATES optimizer steps; a tiny corpus gets shorter sequences and smaller
              batches, so an epoch still has BATCHES_PER_EPOCH of them
    dropout   none while the text is seen at most FREE_EPOCHS times, then DROPOUT_PER_DOUBLING
              for each doubling of the epochs
    resets    each row's carried state zeroed every RESET_EVERY batches (`reset_every`): trained
              on carried state alone, a model can learn cells that only ever grow (|C| in the
              thousands) and, started from zero at an unlucky place — as validation's streams
              and generation start — fall into a state it never leaves (README: The studies)

The constants are fitted to the tune studies in the README ("The studies"): shakespeare (prose,
4-minute trials), linux-5M (C code) and manpages-zh (Chinese, 1,938 symbols, 3-minute trials).
In each, the best of the seeded 1×384, 1×512 and 1×768 (no TPE trial beat them) saw about
0.5–2.5 training tokens per weight (the trials' speeds times their minutes; 0.5 for the Chinese
corpus, whose weights are mostly its 1,938-row input and output matrices). TOKENS_PER_PARAMETER
= 1.5 picks 1×544 for linux (best: 512), 1×672 for shakespeare (best: 768) and 1×288 for zh
(best: 512). The 768 winner has 2.6 weights per token of shakespeare's 1.0 M training tokens,
hence PARAMETERS_PER_TOKEN = 4. The batch rule (TARGET_UPDATES) is still the hand recipe's: the
studies' seeds all had batches of 32 or 64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import cells
from .config import ModelConfig
from .data.batches import min_tokens
from .errors import ConfigError, CorpusError
from .sizes import Dims, num_parameters, training_flops_per_token

TOKENS_PER_PARAMETER = 1.5  # the studies' best trials: 0.5–2.5 tokens seen per weight
PARAMETERS_PER_TOKEN = 4.0  # at most this many weights per training token (shakespeare's best: 2.6)
BASE_LR, BASE_HIDDEN, MIN_LR, MAX_LR = 8e-3, 512, 1e-3, 2e-2
MIN_HIDDEN, MAX_HIDDEN, HIDDEN_STEP = 32, 2048, 32
WIDE, MAX_LAYERS = 1024, 3
NUM_STEPS, MIN_BATCH, MAX_BATCH, TARGET_UPDATES, BATCHES_PER_EPOCH = 100, 16, 256, 3000, 8
FREE_EPOCHS, DROPOUT_PER_DOUBLING, MAX_DROPOUT = 4.0, 0.1, 0.5
MAX_WARMUP = 100  # warm-up steps: a fiftieth of the updates, at most this many
RESET_EVERY = 20  # batches: a row's state lives at most 2,000 characters; not fitted, one choice that worked

# What the probe trains: one layer of 256, batches of 32 × 50 (its embedding as the recipe's).
PROBE_HIDDEN, PROBE_BATCH, PROBE_STEPS = 256, 32, 50


@dataclass(frozen=True)
class Recipe:
    """The settings `choose` picks, and what it expects of them."""

    hidden: int
    layers: int
    embedding: int
    lr: float
    batch_size: int
    num_steps: int
    dropout: float
    warmup_steps: int
    parameters: int  # the model's weights
    tokens: float  # tokens the run is expected to train on in its minutes
    epochs: float  # passes over the corpus that makes
    optimizer: str = "adam"
    schedule: str = "cosine"  # annealed by the clock (max_minutes), so it ends at its floor on time
    reset_every: int = RESET_EVERY

    def overrides(self) -> dict[str, Any]:
        """The config fields this recipe sets (options given on the command line override them)."""
        return {key: getattr(self, key) for key in RECIPE_KEYS}


RECIPE_KEYS = ("hidden", "layers", "embedding", "lr", "batch_size", "num_steps", "dropout", "warmup_steps", "optimizer", "schedule", "reset_every")


def probe_speed_of(recipe: Recipe, tokens_per_s: float, vocab_size: int, cell: str = cells.DEFAULT, form: str = "cudnn") -> float:
    """The probe's tokens/s that `recipe`'s model training at `tokens_per_s` amounts to: the same
    FLOPs a second. A wide model keeps the matrix units busier than the 1×256 probe does, so its
    rate, timed, says better what the minutes hold (`choose` again with it)."""
    probe = training_flops_per_token(probe_dims(vocab_size, cell, form))
    return tokens_per_s * _flops(recipe.hidden, recipe.layers, vocab_size, recipe.embedding, cell) / probe


def embedding_for(vocab_size: int) -> int:
    """A multiple of 16 near 6·√vocab, in [16, 256]: 48 for Shakespeare's 65 characters, 96 for bytes."""
    return min(256, max(16, 16 * round(6 * math.sqrt(vocab_size) / 16)))


def probe_dims(vocab_size: int, cell: str = cells.DEFAULT, form: str = "cudnn") -> Dims:
    """The model whose training speed `choose` takes (`tokens_per_s`), of the cell to be trained
    in its form (the GRU's d2l form runs its loop, slower than nn.GRU's compiled one)."""
    return Dims(vocab_size, PROBE_HIDDEN, 1, PROBE_BATCH, PROBE_STEPS, embedding_for(vocab_size), cell, form)


def choose(corpus_tokens: int, vocab_size: int, tokens_per_s: float, minutes: float, cell: str = cells.DEFAULT, form: str = "cudnn") -> Recipe:
    """The recipe for `minutes` of training on a corpus of `corpus_tokens` training tokens and
    `vocab_size` symbols, on a machine that trains `probe_dims(vocab_size, cell, form)` at `tokens_per_s`."""
    if corpus_tokens < min_tokens(1, 1):
        raise CorpusError(f"the training text has {corpus_tokens} tokens: too short to train on")
    if vocab_size < 1 or not 0 < tokens_per_s < math.inf or not minutes > 0:
        raise ConfigError("a recipe needs a vocabulary, a positive speed and a positive number of minutes")
    compute = tokens_per_s * training_flops_per_token(probe_dims(vocab_size, cell, form)) * minutes * 60  # FLOPs the run has
    if not math.isfinite(compute):  # past any float: the sizes worked out from it would be too
        raise ConfigError(f'[train] max_minutes = {minutes:g} is more time than the default recipe can plan for: give fewer minutes, or recipe = "off"')
    embedding = embedding_for(vocab_size)
    layers, hidden = _shape(compute, corpus_tokens, vocab_size, embedding, cell, form)
    tokens = compute / _flops(hidden, layers, vocab_size, embedding, cell)
    num_steps, batch_size = _batches(corpus_tokens, tokens)
    updates = tokens / (batch_size * num_steps)
    epochs = tokens / corpus_tokens
    return Recipe(
        hidden=hidden,
        layers=layers,
        embedding=embedding,
        lr=float(f"{min(MAX_LR, max(MIN_LR, BASE_LR * math.sqrt(BASE_HIDDEN / hidden))):.2g}"),
        batch_size=batch_size,
        num_steps=num_steps,
        dropout=_dropout(epochs),
        warmup_steps=int(min(MAX_WARMUP, updates / 50)),
        parameters=_parameters(hidden, layers, vocab_size, embedding, cell, form),
        tokens=tokens,
        epochs=epochs,
    )


def _shape(compute: float, corpus_tokens: int, vocab_size: int, embedding: int, cell: str, form: str) -> tuple[int, int]:
    """(layers, hidden): the fewest layers whose widest fitting size is at most WIDE. More
    compute never gives fewer layers, nor, with as many layers, fewer units."""
    for layers in range(1, MAX_LAYERS + 1):
        hidden = _widest(layers, compute, corpus_tokens, vocab_size, embedding, cell, form)
        if hidden <= WIDE or layers == MAX_LAYERS:
            return layers, hidden
    raise AssertionError("unreachable")


def _widest(layers: int, compute: float, corpus_tokens: int, vocab_size: int, embedding: int, cell: str, form: str) -> int:
    """The widest layer (a multiple of HIDDEN_STEP) whose model sees enough tokens per weight in
    the compute there is and is not too large for the corpus; MIN_HIDDEN if none is."""

    def fits(hidden: int) -> bool:
        weights = _parameters(hidden, layers, vocab_size, embedding, cell, form)
        seen = compute / _flops(hidden, layers, vocab_size, embedding, cell)
        return seen >= TOKENS_PER_PARAMETER * weights and weights <= PARAMETERS_PER_TOKEN * corpus_tokens

    return max((h for h in range(MIN_HIDDEN, MAX_HIDDEN + 1, HIDDEN_STEP) if fits(h)), default=MIN_HIDDEN)


def _batches(corpus_tokens: int, tokens: float) -> tuple[int, int]:
    """(num_steps, batch_size): sequences of NUM_STEPS, a batch for about TARGET_UPDATES steps;
    both cut down for a corpus too small for BATCHES_PER_EPOCH such batches."""
    num_steps = min(NUM_STEPS, max(1, corpus_tokens // (BATCHES_PER_EPOCH * 2)))  # room for batches of two at least
    wanted = 2 ** max(0, math.floor(math.log2(max(1.0, tokens / (num_steps * TARGET_UPDATES)))))
    batch = min(MAX_BATCH, max(MIN_BATCH, wanted))
    batch = max(1, min(batch, corpus_tokens // (BATCHES_PER_EPOCH * num_steps)))
    while batch > 1 and min_tokens(batch, num_steps) > corpus_tokens:
        batch -= 1
    return num_steps, batch


def _dropout(epochs: float) -> float:
    """0 while the text is seen at most FREE_EPOCHS times; then a step per doubling, to the nearest 0.05."""
    if epochs <= FREE_EPOCHS:
        return 0.0
    return round(min(MAX_DROPOUT, DROPOUT_PER_DOUBLING * math.log2(epochs / FREE_EPOCHS)) * 20) / 20


def _parameters(hidden: int, layers: int, vocab_size: int, embedding: int, cell: str, form: str) -> int:
    return num_parameters(ModelConfig(cell=cell, gru_form=form, hidden=hidden, layers=layers, embedding=embedding), vocab_size)


def _flops(hidden: int, layers: int, vocab_size: int, embedding: int, cell: str) -> int:
    return training_flops_per_token(Dims(vocab_size, hidden, layers, embedding=embedding, cell=cell))
