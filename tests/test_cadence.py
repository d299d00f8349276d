"""Cadences: checkpoints, samples and validations every N steps, every N minutes (a fake clock
here, never the wall clock), at every N-th epoch's end, or whichever comes first; validation
during training on a bounded, fixed sample; progress inside an epoch."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import lstmlm.step as step_mod
import lstmlm.train as train_mod
from lstmlm import config_file
from lstmlm.cadences import Cadence
from lstmlm.checkpoint import load_checkpoint
from lstmlm.config import Config
from lstmlm.errors import ConfigError
from lstmlm.evaluation import evaluate
from lstmlm.events import EpochEnded, Evaluated, Finished, Sampled, Saved, Started, Stepped
from lstmlm.train import Trainer

MakeTrainer = Callable[..., Trainer]


@pytest.mark.parametrize(
    ("written", "steps", "minutes", "epochs", "canonical"),
    [
        (2000, 2000, 0.0, 0, "2000"),
        ("2000", 2000, 0.0, 0, "2000"),
        ("10m", 0, 10.0, 0, "10m"),
        ("1.5m", 0, 1.5, 0, "1.5m"),
        ("2h", 0, 120.0, 0, "120m"),
        ("1e", 0, 0.0, 1, "1e"),
        ("1e,10m", 0, 10.0, 1, "1e,10m"),
        ("10m, 500, 3e", 500, 10.0, 3, "500,3e,10m"),
        (0, 0, 0.0, 0, "0"),
        ("1000000m", 0, 1e6, 0, "1000000m"),  # ":g" wrote 1e+06m, which reads as "1e" and then garbage
        ("1.23456789m", 0, 1.23456789, 0, "1.23456789m"),  # and 1.23457m, another cadence
    ],
)
def test_a_cadence_is_steps_minutes_epochs_or_several(written: Any, steps: int, minutes: float, epochs: int, canonical: str) -> None:
    cadence = Cadence.parse(written)
    assert (cadence.steps, cadence.minutes, cadence.epochs) == (steps, minutes, epochs)
    assert str(cadence) == canonical and Cadence.parse(canonical) == cadence
    assert str(Config().with_overrides({"checkpoint_every": written}).train.checkpoint_every) == canonical


@given(
    st.integers(0, 2**63 - 1),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=False),
    st.integers(0, 2**63 - 1),
)
def test_every_cadence_reads_back_from_its_written_form(steps: int, minutes: float, epochs: int) -> None:
    cadence = Cadence(steps, minutes, epochs)
    assert Cadence.parse(str(cadence)) == cadence
    held = Config().with_overrides({"eval_every": str(cadence)}).train.eval_every  # a config holds the value, parsed once
    assert held == cadence and Config().with_overrides({"eval_every": str(cadence)}).to_dict()["train"]["eval_every"] == str(cadence)


@pytest.mark.parametrize("written", ["-5", "ten", "1.5", "1.5e", "5s", "1e,", "", True, "1e10m"])
def test_a_bad_cadence_is_refused_by_name(written: Any) -> None:
    with pytest.raises(ConfigError, match=r"\[train\] checkpoint_every must be steps \(2000\), minutes \('10m'\)"):
        Config().with_overrides({"checkpoint_every": written})


def test_a_config_stored_before_cadences_reads_in_todays_terms() -> None:
    """Then checkpoints and samples were counted in epochs, validations in steps (0: every epoch)."""
    stored = json.loads(Config().to_json())
    for key in ("val_tokens", "split", "strict"):
        stored["train"].pop(key, None)
        stored["data"].pop(key, None)
    stored["train"].update(checkpoint_every=10, sample_every=0, eval_every=0)
    old = config_file.from_json(json.dumps(stored))
    assert tuple(map(str, (old.train.checkpoint_every, old.train.sample_every, old.train.eval_every))) == ("10e", "0", "1e")
    stored["train"].update(sample_every=100, eval_every=50)
    old = config_file.from_json(json.dumps(stored))
    assert (str(old.train.sample_every), str(old.train.eval_every)) == ("100e", "50")


class FakeClock:
    """Seconds that pass only when a training step runs (`per_step` each)."""

    def __init__(self, per_step: float) -> None:
        self.now, self.per_step = 1000.0, per_step

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], FakeClock]:
    def install(per_step: float) -> FakeClock:
        clock = FakeClock(per_step)
        real_step = step_mod.train_step

        def step(*args: Any, **kwargs: Any) -> Any:
            clock.now += clock.per_step
            return real_step(*args, **kwargs)

        monkeypatch.setattr(step_mod, "train_step", step)
        return clock  # the test builds its trainers with it: make_trainer(..., clock=clock)

    return install


def saves(events: list[Any], which: str = "latest") -> list[int]:
    """The global step of each checkpoint written, from the Stepped event before it."""
    at, step = [], 0
    for e in events:
        if isinstance(e, Stepped):
            step = e.global_step
        elif isinstance(e, Saved) and e.path.endswith(f"{which}.pt"):
            at.append(step)
    return at


def test_a_checkpoint_every_minute_lands_mid_epoch(make_trainer: MakeTrainer, fake_clock: Any) -> None:
    """25 s a step: a checkpoint at every third step (75 s ≥ 1 min since the last), inside the epochs."""
    clock = fake_clock(25.0)
    trainer = make_trainer(epochs=2, checkpoint_every="1m", eval_every="0", sample_every="0", val_fraction=0.0, clock=clock)
    events = list(trainer.run())
    total = trainer.progress.global_step
    assert saves(events) == [*range(3, total + 1, 3), *([total] if total % 3 else [])]  # and once at the end
    mid = make_trainer("mid", epochs=1, checkpoint_every="1m", eval_every="0", sample_every="0", val_fraction=0.0, clock=clock)
    for event in mid.run():
        if isinstance(event, Saved):
            break
    state = load_checkpoint(mid.store.path("latest"))["trainer"]["state"]
    assert (state["epoch"], state["batch"], state["global_step"]) == (0, 3, 3)  # mid-epoch: its position, carry and loss so far
    assert state["carry"] is not None and state["tokens"] == 3 * 8 * 10


def test_steps_and_epochs_cadences(make_trainer: MakeTrainer, fake_clock: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = fake_clock(0.0)  # the clock stands still: only steps and epochs count
    trainer = make_trainer(epochs=4, checkpoint_every=7, sample_every="2e", eval_every="1e,10", clock=clock)
    events = list(trainer.run())
    total, per_epoch = trainer.progress.global_step, [e for e in events if isinstance(e, EpochEnded)]
    assert saves(events) == [*range(7, total + 1, 7), *([total] if total % 7 else [])]
    assert sorted({e.epoch for e in events if isinstance(e, Sampled)}) == [2, 4]  # 4: the end's
    ends = [e for e in events if isinstance(e, (Stepped, EpochEnded))]
    epoch_end_steps = [ends[i - 1].global_step for i, e in enumerate(ends) if isinstance(e, EpochEnded)]
    validated = [e.global_step for e in events if isinstance(e, Evaluated)]
    assert validated == sorted(set(range(10, total + 1, 10)) | set(epoch_end_steps))
    assert len(per_epoch) == 4


def test_validation_during_training_reads_a_bounded_sample(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = train_mod.evaluate

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[6])
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", spy)
    list(make_trainer(epochs=1, val_tokens=123).run())
    assert seen and set(seen) == {123}


def test_a_bounded_validation_is_a_fixed_sample_of_rows_across_the_text(make_trainer: MakeTrainer) -> None:
    """Each of the streams reads the first max_tokens / streams characters of its row, from a
    zero state: rows start evenly across the whole text; all of it when the bound is larger."""
    trainer = make_trainer(epochs=1)
    model, ids = trainer.model.eval(), trainer.data.train
    whole, _ = evaluate(model, ids, 8, 10, torch.device("cpu"))
    assert evaluate(model, ids, 8, 10, torch.device("cpu"), max_tokens=len(ids) * 2) == evaluate(model, ids, 8, 10, torch.device("cpu"))
    loss, count = evaluate(model, ids, 8, 10, torch.device("cpu"), max_tokens=400)
    row_length, columns = (len(ids) - 1) // 8, 400 // 8
    assert count == 8 * columns
    total = 0.0
    with torch.no_grad():
        for r in range(8):
            window = ids[r * row_length : r * row_length + columns + 1].long()
            logits, _ = model(window[None, :-1], None)
            total += F.cross_entropy(logits[0], window[1:], reduction="sum").item()
    assert loss == pytest.approx(total / count, rel=1e-6)
    assert not math.isclose(loss, whole)


def test_a_long_epoch_shows_its_tokens_rate_and_time_left_on_a_bar_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `lstmlm train` draws from the Stepped events of an epoch of 10,000 batches."""
    from rich.console import Console

    import lstmlm.cli.train as cli_train

    screen = Console(file=io.StringIO(), force_terminal=True, width=160, record=True)
    monkeypatch.setattr(cli_train, "err", screen)
    assert cli_train.within_epoch(Stepped(1, 1500, 1500, 10_000, 12_300_000, 1_000_000_000, 7_700.0)) == (
        "12.3M/1.0G tokens  7,700 tok/s  epoch ends in 35:37:52"  # (1e9 - 12.3e6) / 7,700 = 128,272 s
    )
    started = Started("r", "cpu", "fp32", "scratch", "lstm", "compiled", 66, 1000, 10**9, 10**7, 10_000, 0, 1)
    steps = [Stepped(1, s, s, 10_000, s * 3200, 10_000 * 3200, 6400.0) for s in (1, 2, 5000)]
    done = Finished("interrupted", 9.0, None, 6400.0, "cpu", "scratch", "r", 0, 66, {})
    assert cli_train.render(Config(), iter([started, *steps, done]), as_json=False) is done
    shown = screen.export_text()
    assert "step 5000/10000" in shown and "16.0M/32.0M tokens  6,400 tok/s  epoch ends in 0:41:40" in shown


def test_each_step_reports_the_epochs_tokens_rate_and_size(make_trainer: MakeTrainer, fake_clock: Any) -> None:
    clock = fake_clock(2.0)
    trainer = make_trainer(epochs=1, clock=clock)
    steps = [e for e in trainer.run() if isinstance(e, Stepped)]
    assert [s.step for s in steps] == list(range(1, len(steps) + 1)) and steps[-1].batches == len(steps)
    for s in steps:
        assert s.tokens == s.step * 8 * 10 and s.epoch_tokens == s.batches * 8 * 10
        assert s.tokens_per_s == pytest.approx(s.tokens / (2.0 * s.step))  # 2 s a step on the fake clock


def test_under_a_time_limit_the_epoch_bar_ends_where_the_clock_will_end_the_run() -> None:
    """--max-minutes 1 at 1,000 tokens/s with 100,000-token epochs: 0.6 epochs, not --epochs' 500."""
    from lstmlm.cli.train import epoch_count

    start = Stepped(epoch=1, step=10, global_step=10, batches=100, tokens=10_000, epoch_tokens=100_000, tokens_per_s=1000.0, session_seconds=10.0)
    assert start.epochs_reached(500, max_minutes=1.0) == pytest.approx(0.1 + 50 * 1000 / 100_000)
    assert start.epochs_reached(500, max_minutes=0.0) == 500  # no limit: --epochs
    assert dataclasses.replace(start, tokens_per_s=1e6).epochs_reached(1, max_minutes=1.0) == 1  # the epochs end it first
    assert epoch_count(0.1, 0.6, True) == "0.1/~0.6" and epoch_count(3, 500, False) == "3/500"
