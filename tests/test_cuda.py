"""The CUDA path, on a machine with a GPU: `python -m pytest -m cuda` (benchmarks/gpu_check.py runs it).

Tolerances, by device and precision, for "the scratch core computes what nn.LSTM computes"
(outputs, final state, every gradient, relative to max(1, the largest value)):

    CPU  fp32 1e-5   fp64 1e-10   (tests/test_lstm.py)
    CUDA fp32 1e-5   with TF32 off (lstmlm's default: cuBLAS and cuDNN both strict fp32)
    CUDA bf16 3e-2   products in bf16 (8 bits of mantissa), the cell state and sums in fp32

Every test here skips, with the reason, on a machine without CUDA.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from lstmlm import cells, graphs
from lstmlm.bench import machine
from lstmlm.cells.base import State
from lstmlm.cells.cores import ScratchCore, TorchCore
from lstmlm.checkpoint import load_checkpoint
from lstmlm.config import TrainConfig
from lstmlm.data.batches import BatchSource, on_device
from lstmlm.device import set_tf32
from lstmlm.events import Stepped, Warned
from lstmlm.generate import Sampling, generate
from lstmlm.inference import load as load_trained
from lstmlm.model import CharLM, convert, loss_fn
from lstmlm.step import build_optimizer, train_step
from lstmlm.train import Trainer
from lstmlm.vocab import Vocab

from support.cli import cli
from support.references import assert_close, predict_ch8

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU, and this machine has none"),
]

TOL = {"fp32": 1e-5, "bf16": 3e-2}
CUDA = torch.device("cuda")


LSTM = cells.get("lstm")


def cores(num_inputs: int, num_hiddens: int, num_layers: int, **regularization: Any) -> tuple[ScratchCore, TorchCore]:
    """The scratch LSTM on its GPU path (fused) and nn.LSTM, the same weights."""
    torch.manual_seed(0)
    cudnn = TorchCore(LSTM, num_inputs, num_hiddens, num_layers, **regularization)
    with torch.no_grad():
        for p in cudnn.parameters():
            p.uniform_(-0.3, 0.3)
    scratch = ScratchCore(LSTM, num_inputs, num_hiddens, num_layers, device=CUDA, **regularization)
    scratch.load_state_dict({k.removeprefix("core."): v for k, v in convert({f"core.{k}": v for k, v in cudnn.state_dict().items()}, "scratch", LSTM).items()})
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
    mapped = {k.removeprefix("core."): v for k, v in convert({f"core.{k}": v for k, v in g1.items()}, "cudnn", LSTM).items()}
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


def test_tf32_follows_the_config_and_bench_reports_it() -> None:
    assert set_tf32(CUDA, True) and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert machine(CUDA).tf32
    assert not set_tf32(CUDA, False) and not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not machine(CUDA).tf32


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


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_a_run_moves_between_the_cpu_and_cuda(core: str, corpus_file: Path, runs_dir: Path) -> None:
    """Adam's state from a CPU run into a fused (and, graphed, capturable) optimizer on CUDA, and back."""
    args = train_args(corpus_file, runs_dir, "--model", core, "--run", "moving")
    assert cli(*[a if a != "cuda" else "cpu" for a in args], "--epochs", "2").code == 0
    assert cli("train", "--resume", "--run", "moving", "--runs-dir", runs_dir, "--epochs", "4", "--device", "cuda").code == 0
    assert cli("train", "--resume", "--run", "moving", "--runs-dir", runs_dir, "--epochs", "6", "--device", "cpu").code == 0
    assert load_checkpoint(runs_dir / "moving" / "latest.pt")["trainer"]["state"]["epoch"] == 6


def test_fused_optimizers_on_cuda() -> None:
    model = CharLM(28, 16, device=CUDA).to(CUDA)
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
    model = CharLM(28, 32, core="scratch", device=CUDA).to(CUDA)
    X = torch.randint(0, 28, (4, 10), device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, (_, C) = model(X)
        loss = loss_fn(logits, X)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and C.dtype == torch.float32


# ---- the loop without host syncs, the graph ------------------------------------------------------


@pytest.mark.parametrize("iterator", ["sequential", "random"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.int32])
def test_batches_made_on_the_gpu_are_the_cpu_batches(iterator: str, dtype: torch.dtype) -> None:
    tokens = torch.randint(0, 200, (5000,), generator=torch.Generator().manual_seed(0)).to(dtype)
    placed = on_device(tokens, CUDA)
    assert placed.is_cuda
    on_gpu = list(BatchSource(placed, 8, 10, iterator, device=CUDA).epoch(random.Random(4)))
    on_cpu = list(BatchSource(tokens, 8, 10, iterator).epoch(random.Random(4)))
    staged = list(BatchSource(tokens, 8, 10, iterator, device=CUDA).epoch(random.Random(4)))  # a memory map's path
    for (X, Y), (X0, Y0), (X1, Y1) in zip(on_gpu, on_cpu, staged, strict=True):
        assert X.is_cuda and X1.is_cuda and torch.equal(X.cpu(), X0) and torch.equal(Y.cpu(), Y0) and torch.equal(X1.cpu(), X0) and torch.equal(Y1.cpu(), Y0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_graphed_step_on_cuda_is_the_eager_step(optimizer: str) -> None:
    def run(graphed: bool) -> tuple[list[float], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = CharLM(28, 64, num_layers=2, device=CUDA).to(CUDA)
        opt = build_optimizer(TrainConfig(optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 0.01), model, graphed)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

        def eager(X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
            return train_step(model, opt, X, Y, state, 1.0, CUDA)

        step: graphs.Step = graphs.GraphedStep(eager, opt, (2, 16, 64), 2, graphs.CudaGraph(CUDA)) if graphed else eager
        ids = torch.randint(0, 28, (12, 16, 21), device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
        losses, state = [], None
        for i, batch in enumerate(ids):
            loss, (H, C) = step(batch[:, :-1], batch[:, 1:], None if i % 4 == 0 else state)
            losses.append(loss.item())
            state = (H.detach(), C.detach())
            schedule.step()
        if graphed:
            assert isinstance(step, graphs.GraphedStep) and step.failure is None and step.replays == 12 - graphs.WARMUP
        return losses, [p.detach().clone() for p in model.parameters()]

    set_tf32(CUDA, False)
    (eager_losses, eager_weights), (graphed_losses, graphed_weights) = run(False), run(True)
    assert graphed_losses == pytest.approx(eager_losses, rel=1e-6)
    for a, b in zip(graphed_weights, eager_weights):
        assert_close(a, b, TOL["fp32"], "weights")


def cuda_trainer(make_trainer: Callable[..., Trainer], **overrides: object) -> Trainer:
    trainer = make_trainer(**overrides)
    return Trainer(trainer.store, trainer.cfg, trainer.data, CUDA, "fp32")


def test_a_cuda_training_step_never_waits_for_the_host_between_reports(make_trainer: Callable[..., Trainer]) -> None:
    """torch's sync debug mode raises on any synchronizing call: on from one step to the next
    (after the first epoch, in which the graph is recorded: recording synchronizes once)."""
    for model in ("scratch", "cudnn"):
        trainer = cuda_trainer(make_trainer, name=model, model=model, epochs=3, layers=2)
        assert isinstance(trainer.run_step, graphs.GraphedStep) == (model == "scratch")
        try:
            for event in trainer.run():
                between_steps = isinstance(event, Stepped) and event.epoch > 1 and event.step < event.batches
                torch.cuda.set_sync_debug_mode("error" if between_steps else "default")
                assert not isinstance(event, Warned)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_generation_on_cuda_copies_ids_back_a_chunk_at_a_time() -> None:
    vocab = Vocab(["<unk>", *"abcdefghij"])
    model = CharLM(len(vocab), 32, device=CUDA).to(CUDA).eval()
    samplings = (Sampling(length=96), Sampling(length=96, temperature=1.0, top_k=5, top_p=0.9, seed=1), Sampling(length=96, num_samples=8, temperature=1.0))
    for sampling in samplings:
        steps = generate(model, vocab, "abc", sampling)
        next(steps)  # the prefix read and the first chunk made
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                rest = list(steps)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert len(rest) == 95
        assert len(seen) <= 2  # the two chunks after the first: one copy each
