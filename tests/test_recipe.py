"""The default recipe: `recipe.choose` on its boundaries (tiny and huge corpora, slow and fast
machines, more minutes or speed never a smaller model, always a valid config)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lstmlm import recipe
from lstmlm.config import Config
from lstmlm.data.batches import min_tokens
from lstmlm.errors import ConfigError, CorpusError
from lstmlm.recipe import Recipe, choose

SHAKESPEARE = 1_003_854  # training characters of tinyshakespeare (90%), 65 symbols


def as_config(r: Recipe) -> Config:
    return Config().with_overrides({"corpus": "book.txt", "max_minutes": 10.0, **r.overrides()})  # validates


@settings(max_examples=200, deadline=None)
@given(
    corpus=st.integers(min_value=3, max_value=10**10),
    vocab=st.integers(min_value=2, max_value=100_000),
    speed=st.floats(min_value=1.0, max_value=1e8),
    minutes=st.floats(min_value=0.01, max_value=10_000.0),
)
def test_always_a_valid_config_whose_batches_fit_the_corpus(corpus: int, vocab: int, speed: float, minutes: float) -> None:
    r = choose(corpus, vocab, speed, minutes)
    cfg = as_config(r)
    assert min_tokens(cfg.data.batch_size, cfg.data.num_steps) <= corpus
    assert recipe.MIN_HIDDEN <= r.hidden <= recipe.MAX_HIDDEN and 1 <= r.layers <= recipe.MAX_LAYERS
    assert recipe.MIN_LR <= r.lr <= recipe.MAX_LR and 0.0 <= r.dropout <= recipe.MAX_DROPOUT
    if r.hidden > recipe.MIN_HIDDEN:  # above the floor the two rules hold: enough tokens a weight, not too many weights
        assert r.tokens >= recipe.TOKENS_PER_PARAMETER * r.parameters and r.parameters <= recipe.PARAMETERS_PER_TOKEN * corpus


MINUTES = [0.1, 0.5, 1, 2, 5, 10, 30, 60, 180, 600, 3000]
SPEEDS = [50.0, 500.0, 5e3, 5e4, 5e5, 5e6]


@pytest.mark.parametrize(("corpus", "vocab"), [(SHAKESPEARE, 65), (100_000_000, 256), (20_000, 3000)])
def test_more_minutes_or_speed_never_choose_a_smaller_model(corpus: int, vocab: int) -> None:
    """Never fewer layers; with as many layers, never fewer units."""
    for speed in SPEEDS:
        shapes = [(r.layers, r.hidden) for r in (choose(corpus, vocab, speed, m) for m in MINUTES)]
        assert shapes == sorted(shapes), (speed, shapes)
    for minutes in MINUTES:
        shapes = [(r.layers, r.hidden) for r in (choose(corpus, vocab, s, minutes) for s in SPEEDS)]
        assert shapes == sorted(shapes), (minutes, shapes)


def test_a_slow_machine_gets_the_smallest_model_and_a_fast_one_a_large_one() -> None:
    slow, fast = choose(SHAKESPEARE, 65, 10.0, 1), choose(100_000_000, 256, 5e6, 600)
    assert (slow.layers, slow.hidden) == (1, recipe.MIN_HIDDEN) and slow.dropout == 0.0
    assert fast.layers > 1 and fast.hidden > recipe.WIDE // 2 and fast.batch_size == recipe.MAX_BATCH
    assert fast.lr < slow.lr  # wider layers, smaller steps


def test_a_tiny_corpus_gets_a_small_model_short_batches_and_dropout() -> None:
    r = choose(600, 30, 5e4, 10)
    assert r.hidden == recipe.MIN_HIDDEN and r.num_steps < recipe.NUM_STEPS and r.batch_size < recipe.MIN_BATCH
    assert (600 - r.num_steps - 1) // (r.batch_size * r.num_steps) >= recipe.BATCHES_PER_EPOCH - 1  # an epoch of several batches
    assert r.epochs > 1000 and r.dropout == recipe.MAX_DROPOUT  # seen over and over: regularized
    smallest = choose(3, 2, 1e4, 1)
    assert (smallest.batch_size, smallest.num_steps) == (1, 1)


def test_a_huge_corpus_is_seen_once_without_dropout() -> None:
    r = choose(10**10, 256, 5e4, 60)
    assert r.epochs < 1 and r.dropout == 0.0 and r.parameters <= 2 * 10**10


def test_the_model_grows_with_the_corpus_until_the_compute_caps_it() -> None:
    sizes = [choose(n, 65, 2e4, 10).parameters for n in (1_000, 10_000, 100_000, 1_000_000, 10_000_000)]
    assert sizes == sorted(sizes) and sizes[-1] == sizes[-2]  # the last two: the same compute, enough text for both


def test_the_hand_recipes_corner_is_near_the_hand_recipe() -> None:
    """The constants come from configs/tinyshakespeare.toml: its corpus and time give a model of
    its kind (one layer, some hundreds of units, Adam near 8e-3, no dropout, batches of 100 steps)."""
    r = choose(SHAKESPEARE, 65, 12_000.0, 10)
    assert r.layers == 1 and 256 <= r.hidden <= 768 and r.embedding == 48
    assert 4e-3 <= r.lr <= 1.2e-2 and r.dropout == 0.0 and r.num_steps == 100
    assert (r.optimizer, r.schedule) == ("adam", "cosine")


@pytest.mark.parametrize(("args", "error"), [((2, 65, 1e4, 1), CorpusError), ((1000, 65, 0.0, 1), ConfigError), ((1000, 65, 1e4, 0), ConfigError)])
def test_what_no_recipe_can_be_chosen_for(args: tuple[int, int, float, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        choose(*args)


def test_the_embedding_grows_with_the_vocabulary() -> None:
    sizes = [recipe.embedding_for(v) for v in (2, 28, 65, 256, 5000, 100_000)]
    assert sizes == sorted(sizes) and sizes[0] == 16 and sizes[2] == 48 and sizes[-1] == 256
