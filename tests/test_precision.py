"""`--precision auto`, a training's default: fp32 or bf16 as timed on the model to be trained
(`precision.choose`), decided once before the run is made and stored with it; the rules where
nothing is timed (as asked, d2l mode, under torchrun); what `lstmlm train` says of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import config_file
from lstmlm import precision as precisions
from lstmlm import training as trainings
from lstmlm.config import Config
from lstmlm.distributed import World

from support.cli import cli
from support.tiny import CONFIGS, synthetic_text

CPU = torch.device("cpu")


def tiny(**overrides: Any) -> Config:
    """A model just large enough to be timed: its recurrent product is 2.4 MFLOP (precision.SMALLEST: 1)."""
    settings = {"corpus": "book.txt", "hidden": 96, "embedding": 8, "batch_size": 32, "num_steps": 12, "precision": "auto"}
    return Config().with_overrides({**settings, **overrides}).resolved()


@pytest.fixture
def untimed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Timing anything fails the test: the choice must come from a rule."""

    def refuse(*_args: object) -> float:
        raise AssertionError("timed where a rule decides")

    monkeypatch.setattr(precisions, "product_ratio", refuse)
    monkeypatch.setattr(precisions, "measure", refuse)


@pytest.fixture
def book(tmp_path: Path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(synthetic_text(60), encoding="utf-8")
    return path


# ---- the decision -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("bf16", "chosen"), [(2_000.0, "bf16"), (1_100.0, "bf16"), (1_099.0, "fp32"), (500.0, "fp32")])
def test_bf16_is_taken_from_the_margin_and_the_reason_names_both_speeds(bf16: float, chosen: str) -> None:
    choice = precisions.decide({"fp32": 1_000.0, "bf16": bf16})
    assert choice.precision == chosen
    assert f"{bf16:,.0f} against 1,000 tokens/s" in choice.reason
    assert choice.tokens_per_s == {"fp32": 1_000.0, "bf16": bf16}


@pytest.mark.parametrize("asked", ["fp32", "bf16"])
def test_a_precision_asked_for_is_kept_untimed(asked: str, untimed: None) -> None:
    choice = precisions.choose(tiny(precision=asked), 20, CPU)
    assert (choice.precision, choice.reason, choice.tokens_per_s) == (asked, f"--precision {asked}", None)


def test_d2l_mode_trains_in_fp32_untimed(untimed: None) -> None:
    choice = precisions.choose(tiny(normalize="d2l"), 28, CPU)
    assert choice.precision == "fp32" and "d2l mode" in choice.reason


def test_a_model_too_small_for_bf16_to_pay_is_fp32_untimed(untimed: None) -> None:
    choice = precisions.choose(tiny(hidden=16, batch_size=4), 20, CPU)
    assert choice.precision == "fp32" and choice.reason.startswith("too small a model for bf16 to pay: its recurrent product is 8 kFLOP")


def test_under_torchrun_every_process_takes_the_hardwares_rule_untimed(untimed: None) -> None:
    world = World(rank=0, size=2)
    choice = precisions.choose(tiny(), 20, CPU, world)
    assert choice.precision == precisions.resolve_precision("auto", CPU) and "torchrun" in choice.reason


def test_bf16_products_far_slower_end_it_before_a_step_is_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precisions, "product_ratio", lambda *_: 0.02)
    monkeypatch.setattr(precisions, "measure", lambda *_: pytest.fail("a step timed though bf16's products were hopeless"))
    choice = precisions.choose(tiny(), 20, CPU)
    assert choice.precision == "fp32" and "0.02× fp32's speed" in choice.reason and choice.tokens_per_s is None


def test_products_that_may_pay_have_the_steps_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precisions, "product_ratio", lambda *_: 2.0)
    monkeypatch.setattr(precisions, "measure", lambda *_: {"fp32": 100.0, "bf16": 180.0})
    assert precisions.choose(tiny(), 20, CPU).precision == "bf16"


# ---- the timings, real ------------------------------------------------------------------------------


def test_the_model_to_train_is_timed_in_both_precisions_here() -> None:
    speeds = precisions.measure(tiny(), 20, CPU)
    assert set(speeds) == {"fp32", "bf16"} and all(s > 0 for s in speeds.values())
    assert precisions.product_ratio(tiny(), CPU) > 0


def test_the_choice_here_is_one_of_the_two_with_its_reason() -> None:
    choice = precisions.choose(tiny(), 20, CPU)
    assert choice.precision in ("fp32", "bf16") and choice.reason.startswith("timed here: ")


# ---- in a training --------------------------------------------------------------------------------


def test_the_plan_stores_the_precision_chosen_not_auto(book: Path, runs_dir: Path) -> None:
    plan = trainings.plan(runs_dir, "r", {"corpus": str(book), "device": "cpu", "hidden": 16, "batch_size": 4, "num_steps": 12})
    assert plan.precision is not None and plan.config.train.precision == plan.precision.precision
    assert "precision" in plan.chosen_keys  # shown in the start table: the run chose it


def test_a_precision_given_is_no_choice_to_report(book: Path, runs_dir: Path) -> None:
    plan = trainings.plan(runs_dir, "r", {"corpus": str(book), "device": "cpu", "precision": "fp32", "batch_size": 4, "num_steps": 12})
    assert plan.precision is None and plan.config.train.precision == "fp32"


def test_the_recipes_probe_is_timed_in_the_precision_chosen_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(precisions, "choose", lambda cfg, *_: precisions.Choice("bf16", "a test's"))
    monkeypatch.setattr(trainings, "timed_steps", lambda _cfg, _model, _device, _world, precision, *_a, **_k: asked.append(precision) or 1.0)
    assert trainings.probe_speed(tiny(), 20, CPU) > 0 and asked == ["bf16"]


@pytest.mark.parametrize("again", [[], ["--precision", "auto"]], ids=["bare", "auto-again"])
def test_train_says_what_auto_chose_and_why_and_a_resume_keeps_it(book: Path, runs_dir: Path, monkeypatch: pytest.MonkeyPatch, again: list[str]) -> None:
    """The command that started the run with --precision auto, plus --resume, chose anew (on
    another machine, or with its choice forgotten: another precision, the resume no longer exact)."""
    common = ["--corpus", book, "--device", "cpu", "--hidden", "16", "--batch-size", "4", "--num-steps", "12", "--runs-dir", runs_dir]
    result = cli("train", *common, "--epochs", "1", "--run", "r")
    assert result.code == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("precision "))
    stored = json.loads((runs_dir / "r" / "config.json").read_text())["train"]["precision"]
    assert stored == "fp32" and line.startswith("precision fp32: too small a model for bf16 to pay")  # 1×16 at batch 4
    monkeypatch.setattr(precisions, "choose", lambda *_: precisions.Choice("bf16", "another machine's"))
    resumed = cli("train", "--run", "r", "--resume", "--epochs", "2", "--runs-dir", runs_dir, *again)
    assert resumed.code == 0, resumed.stderr
    assert not any(line.startswith("precision ") for line in resumed.stdout.splitlines())  # nothing chosen anew
    assert json.loads((runs_dir / "r" / "config.json").read_text())["train"]["precision"] == stored


@pytest.mark.parametrize("name", ["d2l.toml", "d2l-gru.toml", "d2l-rnn.toml"])
def test_the_d2l_configs_pin_fp32(name: str) -> None:
    assert config_file.load(CONFIGS / name).train.precision == "fp32"


# ---- remembered -------------------------------------------------------------------------------------


def test_a_choice_timed_is_remembered_for_the_machine_and_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precisions, "timed", lambda *_: precisions.Choice("bf16", "timed here: a test's"))
    first = precisions.choose(tiny(), 20, CPU)
    monkeypatch.setattr(precisions, "timed", lambda *_: pytest.fail("timed again"))
    again = precisions.choose(tiny(), 20, CPU)
    assert (first.precision, again.precision) == ("bf16", "bf16") and again.reason.startswith("timed here: a test's (remembered: ")
    monkeypatch.setattr(precisions, "timed", lambda *_: precisions.Choice("fp32", "timed here: another shape"))
    assert precisions.choose(tiny(hidden=128), 20, CPU).precision == "fp32"  # another model is timed anew


@pytest.mark.parametrize("content", ["not json {", '["a list"]', '{"%s": {"precision": "fp64", "reason": "x"}}', '{"%s": "bf16"}'])
def test_a_remembered_file_not_of_this_module_is_ignored(content: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LSTMLM_HOME", str(tmp_path))
    key = precisions.machine_key(tiny(), 20, CPU)
    (tmp_path / precisions.REMEMBERED).write_text(content.replace("%s", key), encoding="utf-8")
    monkeypatch.setattr(precisions, "timed", lambda *_: precisions.Choice("fp32", "timed here: a test's"))
    assert precisions.choose(tiny(), 20, CPU).reason == "timed here: a test's"
    assert json.loads((tmp_path / precisions.REMEMBERED).read_text())[key]["precision"] == "fp32"  # replaced by what was timed


def test_a_cache_that_cannot_be_written_costs_only_the_timing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocked = tmp_path / "a file, not a directory"
    blocked.write_text("", encoding="utf-8")
    monkeypatch.setenv("LSTMLM_HOME", str(blocked))
    monkeypatch.setattr(precisions, "timed", lambda *_: precisions.Choice("fp32", "timed here: a test's"))
    assert precisions.choose(tiny(), 20, CPU).precision == "fp32"
