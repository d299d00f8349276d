"""lstmlm.bench: the figures `lstmlm bench` shows are computed from the right quantities.

The clock is replaced by one that advances a fixed second per reading, so every figure has
an exact expected value and no assertion depends on how fast the machine is."""

from __future__ import annotations

import mmap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import bench
from lstmlm import step as step_mod
from lstmlm.bench import Dims
from lstmlm.config_file import load as load_config
from lstmlm.errors import DeviceError

from support.cli import assert_one_error_line, cli

TINY = Dims(vocab_size=7, hidden=8, layers=2, batch_size=3, num_steps=5)


class Clock:
    """time, as bench reads it: each perf_counter() call is one second after the last."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(bench, "time", fake)
    monkeypatch.setattr(step_mod, "time", fake)  # bench times the training step where it is built
    return fake


@pytest.fixture
def steps_taken(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every training step bench takes, with the shapes and precision it took it in."""
    taken: list[dict[str, Any]] = []
    real = step_mod.train_step

    def step(model: Any, optimizer: Any, X: torch.Tensor, Y: torch.Tensor, state: Any, clip: float, device: Any, precision: str, *rest: Any, **kw: Any) -> Any:
        taken.append({"X": tuple(X.shape), "precision": precision, "clip": clip})
        return real(model, optimizer, X, Y, state, clip, device, precision, *rest, **kw)

    monkeypatch.setattr(step_mod, "train_step", step)  # the step bench builds, as training does (step.build_step)
    return taken


def test_flops_of_the_d2l_model() -> None:
    """4H·H for the gates' recurrent product, H·V for the output, no product for one-hot input."""
    d2l = Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35)
    assert bench.forward_flops_per_token(d2l) == 538_624
    assert bench.training_flops_per_token(d2l) == 1_615_872


def test_flops_count_the_input_products_of_dense_inputs() -> None:
    """With an embedding the first layer multiplies its input (64 wide), the second its input from below."""
    dims = Dims(vocab_size=65, hidden=512, layers=2, embedding=64)
    assert bench.forward_flops_per_token(dims) == 2 * (1_179_648 + 2_097_152 + 33_280)  # 4H(H+64), 4H(H+H), HV


def test_ceiling_is_two_n_cubed_flops_over_the_fastest_product(clock: Clock) -> None:
    """Each product reads the clock twice (one second apart): 2·256³ FLOPs per second."""
    ceiling = bench.measure_matmul_ceiling("cpu", "fp32", max_size=256, min_seconds=3.0)
    assert (ceiling.precision, ceiling.device, ceiling.size) == ("fp32", "cpu", 256)
    assert ceiling.gflops == pytest.approx(2 * 256**3 / 1.0 / 1e9)


def test_the_ceilings_size_grows_until_a_product_is_slow_enough_or_the_limit() -> None:
    ceiling = bench.measure_matmul_ceiling("cpu", "fp32", max_size=512, min_seconds=0.0)
    assert ceiling.size in (256, 512)  # 256 is kept only if one product took over 0.1 s
    assert bench.measure_matmul_ceiling("cpu", "fp32", max_size=256, min_seconds=0.0).size == 256


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_training_speed_is_the_timed_steps_tokens_over_their_time(core: str, clock: Clock, steps_taken: list[dict[str, Any]]) -> None:
    ceiling = bench.Ceiling("cpu", "fp32", 256, 100.0)
    speed = bench.measure_training(core, TINY, "cpu", steps=4, warmup=2, ceiling=ceiling)
    assert len(steps_taken) == 6 and {s["X"] for s in steps_taken} == {(3, 5)}  # warm-up and timed steps, whole batches
    assert all(s["clip"] == 1.0 and s["precision"] == "fp32" for s in steps_taken)  # d2l's step
    assert speed.seconds == 1.0  # two clock readings around the timed steps only
    assert speed.tokens_per_s == 4 * 3 * 5
    assert speed.gflops == pytest.approx(60 * bench.training_flops_per_token(TINY) / 1e9)
    assert speed.utilisation == pytest.approx(speed.gflops / 100.0)
    assert bench.measure_training(core, TINY, "cpu", steps=1, warmup=0).utilisation is None  # no ceiling, no share


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_bf16_training_steps_run_in_bf16_on_any_cpu(core: str, steps_taken: list[dict[str, Any]]) -> None:
    speed = bench.measure_training(core, TINY, "cpu", "bf16", steps=1, warmup=0)
    assert speed.precision == "bf16" and [s["precision"] for s in steps_taken] == ["bf16"]


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(DeviceError, match="unknown precision 'fp16'"):
        bench.measure_generation("scratch", TINY, "cpu", "fp16")


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_generation_speed_is_characters_over_their_time(core: str, clock: Clock) -> None:
    speed = bench.measure_generation(core, TINY, "cpu", length=20, warmup=2)
    assert (speed.core, speed.length, speed.chars_per_s) == (core, 20, 20.0)


def test_peak_memory_sees_a_large_allocation() -> None:
    with bench.PeakMemory(torch.device("cpu")) as memory:
        # 64 MiB of fresh pages, touched: a tensor could reuse memory an earlier test freed and the
        # process kept (device.keep_freed_memory), which makes the process no larger
        block = mmap.mmap(-1, 64 << 20)
        for page in range(0, len(block), mmap.PAGESIZE):
            block[page] = 1
        time.sleep(0.05)  # a few samples
    if memory.peak is None:
        pytest.skip("no /proc/self/statm here")
    assert memory.peak >= 32 << 20
    with bench.PeakMemory(torch.device("cpu")) as nothing:
        time.sleep(0.02)
    assert nothing.peak is not None and nothing.peak < 16 << 20


def test_bench_command_measures_every_core_against_its_ceiling(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text("[data]\nbatch_size = 2\nnum_steps = 3\n[model]\nhidden = 8\n")
    result = cli("bench", "--config", config, "--device", "cpu", "--steps", "1", "--json")
    assert result.code == 0, result.stderr
    machine, *rows = result.json()
    assert machine["event"] == "machine" and machine["auto_precision"] in ("fp32", "bf16") and machine["torch_threads"] >= 1
    assert machine["tf32"] is False  # TF32 exists only on a GPU (tests/test_cuda.py: reported as set there)
    assert [r["what"] for r in rows] == [rows[0]["what"], "train scratch", "train cudnn",
                                        "generate scratch", "generate scratch ×64", "generate cudnn", "generate cudnn ×64"]  # fmt: skip
    assert [r["samples"] for r in rows[3:]] == [1, 64, 1, 64]
    assert rows[0]["what"].startswith("matmul ")
    ceiling = rows[0]["gflops"]
    for train in rows[1:3]:
        assert (train["flops_per_token"], train["steps"]) == (bench.training_flops_per_token(Dims(28, 8, 1, 2, 3)), 1)
        assert train["utilisation"] == pytest.approx(train["gflops"] / ceiling)  # the share of this run's own ceiling
    table = cli("bench", "--config", config, "--device", "cpu", "--steps", "1")
    assert table.code == 0 and "train scratch" in table.stdout and "of ceiling" in table.stdout and "--precision auto picks" in table.stdout


def test_bench_measures_the_gru_in_the_configs_form(tmp_path: Path) -> None:
    """A config's gru_form is what bench trains and generates with; the d2l form has no torch
    module, so the cudnn rows say so instead of timing nn.GRU's other function."""
    config = tmp_path / "gru-d2l.toml"
    config.write_text('[data]\nbatch_size = 2\nnum_steps = 3\n[model]\ncell = "gru"\ngru_form = "d2l"\nhidden = 8\n')
    result = cli("bench", "--config", config, "--device", "cpu", "--steps", "1", "--json")
    assert result.code == 0, result.stderr
    machine, *measured = result.json()
    rows = {r["what"]: r for r in measured[1:]}
    assert rows["train scratch"]["tokens_per_s"] > 0 and rows["generate scratch"]["chars_per_s"] > 0
    # the d2l form has no compiled kernel: its loop is what ran, and the machine line says so
    # (it said "compiled (C++)", the compiled recurrence's status, whatever the cell)
    assert machine["recurrence"] == "loop (the equations): the GRU (d2l) has no compiled kernel"
    for what in ("train cudnn", "generate cudnn", "generate cudnn ×64"):
        assert "no torch module" in rows[what]["skipped"]
    dims = Dims.from_config(load_config(config), 28)
    assert bench.build_model("scratch", dims, torch.device("cpu")).cell.form == "d2l"
    table = cli("bench", "--config", config, "--device", "cpu", "--steps", "1")
    assert table.code == 0 and "gru (d2l form)" in table.stdout and "recurrence: loop (the equations)" in table.stdout


def test_a_vocabulary_past_the_characters_there_are_skips_generation_and_one_past_torchs_sizes_is_one_line(tmp_path: Path) -> None:
    """Generation named its symbols chr(0x100 + i): past U+10FFFF, "internal error: ValueError:
    chr() arg not in range(0x110000)", after training was measured. Past 2**63, torch's
    "Overflow when unpacking long long" was an internal error too."""
    config = tmp_path / "tiny.toml"
    config.write_text("[data]\nbatch_size = 1\nnum_steps = 2\n[model]\nhidden = 2\nembedding = 1\n")
    vocab = bench.GENERATION_VOCAB + 1
    result = cli("bench", "--config", config, "--device", "cpu", "--steps", "1", "--vocab-size", vocab, "--json")
    assert result.code == 0, result.stderr
    rows = {r["what"]: r for r in result.json()[2:]}
    assert rows["train scratch"]["tokens_per_s"] > 0
    for what in ("generate scratch", "generate scratch ×64", "generate cudnn", "generate cudnn ×64"):
        assert rows[what]["skipped"] == f"generation decodes characters, and a vocabulary of {vocab:,} has more symbols than the 1,113,857 it can use"
    assert_one_error_line(cli("bench", "--vocab-size", 2**64, "--steps", "1", "--device", "cpu"), f"--vocab-size is too large: {2**64}")
