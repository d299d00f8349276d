"""One optimizer step, and how a training (or a benchmark) builds it.

`train_step` is the step itself — forward, mean loss, backward, clip, update — as the seed
does it. `build_step` makes one ready to run on a model: the net it runs (the model, or its
DistributedDataParallel wrapper), the optimizer, and the step, a CUDA graph of it where one
pays and can hold it (`graphs`), else eager with the reason why. The trainer and `lstmlm
bench` both build theirs here, so what the benchmark times is what a training runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import graphs, native
from .cells.base import State
from .config import Config, TrainConfig
from .device import autocast, resolve_precision
from .distributed import World
from .events import Noted, Warned
from .model import CharLM, Dropouts, activation_penalty, loss_fn


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    state: State | None,
    clip: float,
    device: torch.device,
    precision: str = "fp32",
    ar: float = 0.0,
    tar: float = 0.0,
    grad_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Forward, mean loss, backward, clip, update. Returns the loss — the cross-entropy alone,
    whatever AR (`ar`) and TAR (`tar`) add to the objective — on the device, no sync. The
    gradient's global norm before clipping is added to `grad_norms` (a float64 scalar on the
    device, updated in place, so a CUDA graph holds the addition too), if given."""
    with autocast(device, precision):
        if ar > 0 or tar > 0:
            logits, state, top = model(X, state, top=True)  # (batch, steps, vocab)
            loss = loss_fn(logits, Y)
            objective = loss + activation_penalty(top, ar, tar)
        else:
            logits, state = model(X, state)
            objective = loss = loss_fn(logits, Y)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True) if clip > 0 else None
    if grad_norms is not None:
        if norm is None:  # not clipped: measured for the record alone
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
        grad_norms += norm.double()
    optimizer.step()
    return loss.detach(), state


def build_optimizer(t: TrainConfig, model: CharLM, graphed: bool = False) -> torch.optim.Optimizer:
    """d2l's SGD (param -= lr · grad), Adam or AdamW; on a GPU their fused kernels (one launch
    for every parameter instead of several a tensor). `graphed`: a CUDA graph holds the update,
    so fused wherever it runs (the learning rate, a tensor then, read by the kernel, not the
    host) and Adam and AdamW capturable (their step count on the device)."""
    params = list(model.parameters())
    fused = params[0].is_cuda or graphed or None  # None: torch's choice (foreach) off CUDA
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    adam = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused, capturable=graphed)


@dataclass(frozen=True)
class BuiltStep:
    """What `build_step` returns."""

    net: torch.nn.Module  # what the step runs: the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    run: graphs.Step  # (X, Y, state) → (loss, state): a GraphedStep, or the eager step
    eager_because: str | None  # why a step that would pay as a CUDA graph runs eagerly; None otherwise
    grad_norms: torch.Tensor  # the steps' gradient norms summed on the device (float64, zeroed by the reader)

    @property
    def graphed(self) -> bool:
        return isinstance(self.run, graphs.GraphedStep)


def build_step(
    cfg: Config,
    model: CharLM,
    device: torch.device,
    world: World = World(),
    *,
    precision: str | None = None,
    capture: graphs.Capture | None = None,
) -> BuiltStep:
    """The training step of `cfg` on `model` (already on `device`). `precision`: as resolved
    for the device (default: the config's, resolved); `capture`: records the step as a graph
    on any device, as tests do on a CPU (default: a CUDA graph where one pays)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    precision = precision or resolve_precision(t.precision, device)
    net: torch.nn.Module = model
    if world.active:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    wants_graph = t.path in ("auto", "graph") and (capture is not None or graphs.pays(device, model.path))
    eager_because = graphs.why_eager(Dropouts.of(m).draws, world.active) if wants_graph else None
    if t.path == "graph" and not wants_graph and model.path == "fused":  # asked for by name where it cannot be: said, as any path is
        eager_because = f"a CUDA graph needs a CUDA GPU, and this run is on {device.type}"
    graphed = wants_graph and eager_because is None
    optimizer = build_optimizer(t, model, graphed)
    grad_norms = torch.zeros((), dtype=torch.float64, device=device)

    def eager(X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        return train_step(net, optimizer, X, Y, state, t.clip, device, precision, t.ar, t.tar, grad_norms=grad_norms)

    run: graphs.Step = eager
    if graphed:
        state_shape = (m.layers, d.batch_size, m.hidden)
        run = graphs.GraphedStep(eager, optimizer, state_shape, len(model.cell.state), capture or graphs.CudaGraph(device))
    return BuiltStep(net, optimizer, run, eager_because, grad_norms)


def lr_factor(t: TrainConfig, step: int, steps_per_epoch: int, time_used: float = 0.0) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps.

    `time_used` is the fraction of the session's `max_minutes` spent (0 without a limit). The
    cosine anneals over whichever ends the run first, its epochs or its time limit: its
    progress is the larger of the two fractions, so a time-limited run ends with the learning
    rate at its floor however fast the machine is. (A resumed session has its own limit, so
    its learning rate rises back to where its steps put it and anneals again.)"""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "step":
        return t.gamma ** (step // (t.step_every * steps_per_epoch))
    if t.schedule == "cosine":
        total = max(1, t.epochs * steps_per_epoch - t.warmup_steps)
        progress = min(1.0, max((step - t.warmup_steps) / total, time_used))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def build_schedule(t: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int, time_used: Callable[[], float]) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule (`lr_factor`), `time_used` read at each step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(t, s, steps_per_epoch, time_used()))


BUILDING = "compiling the scratch core's recurrence for this CPU (once)"  # said where a first build waits


def settle_path(model: CharLM, asked: str = "auto") -> Iterator[Noted | Warned]:
    """The scratch core's path, settled before a training's clock starts: a compiled recurrence
    this machine has not built yet is built here (said, since it takes a while, once), and
    where it cannot be, or the path asked for cannot run here, the path taken instead is said
    (and a path asked of torch's core, which has none, said not to be used)."""
    scratch = model.scratch_core
    if scratch is None:
        if asked != "auto":
            yield Warned(f"path {asked} is not used: it chooses how the scratch core runs, and this run's model is cudnn (torch's own layer)")
        return
    if scratch.path == "compiled" and native.needs_build():
        yield Noted(BUILDING)
    why = scratch.settle()
    if why:
        yield Warned(f"the scratch core runs its {scratch.path} path: {why}")


def timed_steps(cfg: Config, model: CharLM, device: torch.device, world: World, precision: str, steps: int, warmup: int) -> float:
    """Seconds that `steps` training steps of `cfg` on `model` take (after `warmup` untimed),
    on random ids, the recurrent state carried from batch to batch and detached: the step a
    training builds (`build_step`). Under torchrun each process trains its rows of the batch."""
    d = cfg.data
    run_step = build_step(cfg, model, device, world, precision=precision).run
    batches = torch.randint(0, model.vocab_size, (2, d.batch_size, d.num_steps + 1), device=device)
    rows = world.rows(d.batch_size)  # this process's streams: all of them in one process

    def run(n: int) -> None:
        state: State | None = None
        loss = torch.zeros(())
        for i in range(n):
            X, Y = batches[i % 2, rows, :-1], batches[i % 2, rows, 1:]
            loss, state = run_step(X, Y, state)
            state = tuple(S.detach() for S in state)
        loss.item()  # wait for the device

    run(warmup)
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start
