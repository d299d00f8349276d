"""The CUDA path, on a machine with a GPU: `python -m pytest -m cuda` (benchmarks/gpu_check.py runs it).

Tolerances, by device and precision, for "the scratch core computes what nn.LSTM computes"
(outputs, final state, every gradient, relative to max(1, the largest value)):

    CPU  fp32 1e-5   fp64 1e-10   (tests/test_lstm.py)
    CUDA fp32 1e-5   with TF32 off (lstmlm's default: cuBLAS and cuDNN both strict fp32)
    CUDA bf16 3e-2   products in bf16 (8 bits of mantissa), the cell state and sums in fp32

Every test here skips, with the reason, on a machine without CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm.checkpoint import load_checkpoint
from lstmlm.config import TrainConfig
from lstmlm.device import set_tf32
from lstmlm.lstm import CudnnLSTM, ScratchLSTM
from lstmlm.model import CharLM, convert, loss_fn
from lstmlm.session import load_trained
from lstmlm.train import build_optimizer

from conftest import assert_close, cli, predict_ch8

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, and this machine has none"),
]

TOL = {"fp32": 1e-5, "bf16": 3e-2}
CUDA = torch.device("cuda")


def cores(num_inputs: int, num_hiddens: int, num_layers: int, **regularization: Any) -> tuple[ScratchLSTM, CudnnLSTM]:
    torch.manual_seed(0)
    cudnn = CudnnLSTM(num_inputs, num_hiddens, num_layers, **regularization)
    with torch.no_grad():
        for p in cudnn.parameters():
            p.uniform_(-0.3, 0.3)
    scratch = ScratchLSTM(num_inputs, num_hiddens, num_layers, **regularization)
    scratch.load_state_dict({k.removeprefix("core."): v for k, v in convert({f"core.{k}": v for k, v in cudnn.state_dict().items()}, "scratch").items()})
    return scratch.to(CUDA), cudnn.to(CUDA)


# DropConnect and locked dropout between layers draw their masks from torch's CUDA generator in
# both cores (cuDNN's own per-element dropout between layers draws elsewhere: not compared).
REGULARIZED = [pytest.param({}, id="plain"), pytest.param({"weight_drop": 0.3, "dropout": 0.4, "locked": True}, id="dropconnect-locked")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("regularization", REGULARIZED)
def test_the_cores_agree_on_cuda(precision: str, num_layers: int, regularization: dict[str, Any]) -> None:
    set_tf32(CUDA, False)
    scratch, cudnn = cores(28, 64, num_layers, **regularization)
    X = torch.randint(0, 28, (35, 32), device=CUDA)
    state = (torch.randn(num_layers, 32, 64, device=CUDA) * 0.5, torch.randn(num_layers, 32, 64, device=CUDA) * 0.5)
    results = []
    for core in (scratch, cudnn):
        torch.manual_seed(5)  # the same masks in both
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            outputs, (H, C) = core(X, state)
        (outputs.float().square().mean() + C.square().mean()).backward()
        results.append((outputs.float(), H.float(), C, {n: p.grad for n, p in core.named_parameters()}))
    (o1, h1, c1, g1), (o2, h2, c2, g2) = results
    tol = TOL[precision]
    assert c1.dtype == c2.dtype == torch.float32  # the cell state stays fp32
    for name, a, b in (("outputs", o1, o2), ("H", h1, h2), ("C", c1, c2)):
        assert_close(a, b, tol, name)
    mapped = {k.removeprefix("core."): v for k, v in convert({f"core.{k}": v for k, v in g1.items()}, "cudnn").items()}
    for name, grad in g2.items():
        assert_close(mapped[name.replace("bias_hh", "bias_ih")], grad, tol, f"d{name}")


def test_bf16_reaches_cudnn_as_bf16_not_fp16() -> None:
    """CUDA's autocast would cast cuDNN's RNN to fp16 whatever it is asked; the core hands it bf16."""
    _, cudnn = cores(28, 64, 2)
    seen: list[torch.dtype] = []
    hook = cudnn.lstm.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs, (H, C) = cudnn(torch.randint(0, 28, (10, 4), device=CUDA))
    hook.remove()
    assert seen == [torch.bfloat16] and outputs.dtype == torch.bfloat16
    assert H.dtype == C.dtype == torch.float32  # the state carried to the next batch


def test_tf32_follows_the_config() -> None:
    assert set_tf32(CUDA, True) and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not set_tf32(CUDA, False) and not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def train_args(corpus: Path, runs: Path, *extra: str) -> list[str | Path]:
    return ["train", "--corpus", corpus, "--normalize", "d2l", "--runs-dir", runs, "--hidden", "32", "--batch-size", "8",
            "--num-steps", "10", "--device", "cuda", "--optimizer", "adam", "--lr", "0.01", *extra]  # fmt: skip


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_resume_on_cuda_is_exact_within_the_tolerance(core: str, corpus_file: Path, runs_dir: Path) -> None:
    assert cli(*train_args(corpus_file, runs_dir, "--model", core, "--epochs", "4", "--run", "straight")).code == 0
    assert cli(*train_args(corpus_file, runs_dir, "--model", core, "--epochs", "2", "--run", "split")).code == 0
    assert cli("train", "--resume", "--run", "split", "--runs-dir", runs_dir, "--epochs", "4").code == 0
    a, b = (load_checkpoint(runs_dir / r / "latest.pt")["model"] for r in ("straight", "split"))
    for name in a:
        assert_close(b[name], a[name], TOL["fp32"], name)


def test_fused_optimizers_on_cuda() -> None:
    model = CharLM(28, 16).to(CUDA)
    for name in ("sgd", "adam", "adamw"):
        assert build_optimizer(TrainConfig(optimizer=name), model).defaults["fused"] is True


def test_a_cuda_run_generates_on_cuda_and_on_the_cpu_alike(corpus_file: Path, runs_dir: Path) -> None:
    assert cli(*train_args(corpus_file, runs_dir, "--epochs", "3", "--run", "g")).code == 0
    args = ["generate", "--run", "g", "--runs-dir", runs_dir, "--prefix", "time traveller", "--length", "60"]
    on_cpu, on_cuda = cli(*args, "--device", "cpu"), cli(*args, "--device", "cuda")
    assert on_cpu.code == on_cuda.code == 0
    trained = load_trained(runs_dir, "g")
    with torch.no_grad():
        assert on_cpu.stdout == predict_ch8("time traveller", 60, trained.model, trained.vocab) + "\n"
    assert on_cuda.stdout == on_cpu.stdout


def test_the_loss_is_fp32_under_bf16_on_cuda() -> None:
    model = CharLM(28, 32, core="scratch").to(CUDA)
    X = torch.randint(0, 28, (4, 10), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, (_, C) = model(X)
        loss = loss_fn(logits, X)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and C.dtype == torch.float32
