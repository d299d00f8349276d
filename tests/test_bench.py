"""lstmlm.bench: the figures `lstmlm bench` shows are computed from the right quantities.
Behaviour only, at tiny sizes: no assertion here depends on how fast the machine is."""

from __future__ import annotations

import time

import pytest
import torch

from lstmlm import bench
from lstmlm.bench import Dims
from lstmlm.errors import DeviceError

TINY = Dims(vocab_size=7, hidden=8, layers=2, batch_size=3, num_steps=5)


def test_flops_of_the_d2l_model() -> None:
    """4H·H for the gates' recurrent product, H·V for the output, no product for one-hot input."""
    d2l = Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35)
    assert bench.forward_flops_per_token(d2l) == 2 * (4 * 256 * 256 + 256 * 28) == 538_624
    assert bench.training_flops_per_token(d2l) == 3 * 538_624


def test_flops_count_the_input_products_of_dense_inputs() -> None:
    dims = Dims(vocab_size=65, hidden=512, layers=2, embedding=64)
    first, second = 4 * 512 * (512 + 64), 4 * 512 * (512 + 512)
    assert bench.forward_flops_per_token(dims) == 2 * (first + second + 512 * 65)


def test_ceiling_is_a_positive_rate_of_a_square_product() -> None:
    ceiling = bench.measure_matmul_ceiling("cpu", "fp32", max_size=256, min_seconds=0.0)
    assert ceiling.precision == "fp32" and ceiling.device == "cpu"
    assert ceiling.size == 256 and ceiling.gflops > 0


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_training_speed_is_tokens_over_time(core: str) -> None:
    ceiling = bench.Ceiling("cpu", "fp32", 256, 100.0)
    speed = bench.measure_training(core, TINY, "cpu", steps=2, warmup=1, ceiling=ceiling)
    assert speed.core == core and speed.precision == "fp32" and speed.steps == 2
    assert speed.tokens_per_s == pytest.approx(2 * 3 * 5 / speed.seconds)
    assert speed.flops_per_token == bench.training_flops_per_token(TINY)
    assert speed.gflops == pytest.approx(speed.tokens_per_s * speed.flops_per_token / 1e9)
    assert speed.utilisation == pytest.approx(speed.gflops / 100.0)
    assert speed.peak_memory_bytes is None or speed.peak_memory_bytes >= 0


def test_training_speed_without_a_ceiling_has_no_utilisation() -> None:
    speed = bench.measure_training("scratch", TINY, "cpu", steps=1, warmup=0)
    assert speed.utilisation is None


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_both_cores_train_in_bf16_on_any_cpu(core: str) -> None:
    speed = bench.measure_training(core, TINY, "cpu", "bf16", steps=1, warmup=0)
    assert speed.precision == "bf16" and speed.tokens_per_s > 0


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(DeviceError, match="unknown precision 'fp16'"):
        bench.measure_generation("scratch", TINY, "cpu", "fp16")


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_generation_speed_is_characters_over_time(core: str) -> None:
    speed = bench.measure_generation(core, TINY, "cpu", length=20, warmup=2)
    assert speed.core == core and speed.length == 20 and speed.chars_per_s > 0


def test_peak_memory_sees_a_large_allocation() -> None:
    with bench.PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
        block.add_(1)
        time.sleep(0.05)  # a few samples
    if memory.peak is None:
        pytest.skip("no /proc/self/statm here")
    assert memory.peak >= 32 << 20


def test_bench_command_measures_every_core(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from lstmlm.cli import app

    config = tmp_path / "tiny.toml"
    config.write_text("[data]\nbatch_size = 2\nnum_steps = 3\n[model]\nhidden = 8\n")
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--device", "cpu", "--steps", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["what"] for r in rows] == ["matmul " + rows[0]["what"].split()[1], "train scratch", "train cudnn", "generate scratch", "generate cudnn"]
    train = [r for r in rows if r["what"].startswith("train")]
    assert all(r["tokens_per_s"] > 0 and r["flops_per_token"] == train[0]["flops_per_token"] for r in train)
    assert all(0 < r["utilisation"] for r in train)
