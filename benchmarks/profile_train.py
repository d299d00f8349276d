"""Where a training step's time goes: torch.profiler over lstmlm's train_step, by operator.

    python benchmarks/profile_train.py [--config d2l|larger] [--core scratch|cudnn|both]
                                       [--precision fp32|bf16] [--threads N] [--steps 10] [--rows 15]

For each core: the step's wall time (the best of a few rounds, outside the profiler), then the
profiler's table of operators by self CPU time over `--steps` steps, and a summary that sorts
them into the matrix products, the elementwise work, the copies and the rest. The scratch
core's products are the per-step recurrent products (addmm_ forward, addmm backward) and the
sequence-wide ones (mm: weight gradients, input and output layers); everything else is what the
fast path adds around them. Run it on a quiet machine: a busy neighbour shifts every figure.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lstmlm.bench import Dims
from lstmlm.model import CharLM
from lstmlm.train import train_step

CONFIGS = {
    "d2l": Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35),
    "larger": Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100),
}
PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward")
COPIES = ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::contiguous", "aten::clone", "aten::index_select")
ELEMENTWISE = ("aten::sigmoid_", "aten::tanh", "aten::mul", "aten::mul_", "aten::addcmul", "aten::addcmul_", "aten::sub_",
               "aten::add_", "aten::add", "aten::sigmoid", "aten::sum", "aten::sub")  # fmt: skip


def step_fn(core: str, dims: Dims, precision: str) -> tuple[object, float]:
    """A training step of `core` on random ids, and its best wall time over a few rounds."""
    torch.manual_seed(0)
    model = CharLM(dims.vocab_size, dims.hidden, dims.layers, core=core, embedding=dims.embedding)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    X = torch.randint(0, dims.vocab_size, (dims.batch_size, dims.num_steps))
    Y = torch.randint(0, dims.vocab_size, (dims.batch_size, dims.num_steps))
    device = torch.device("cpu")

    def step() -> None:
        train_step(model, optimizer, X, Y, None, 1.0, device, precision)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            step()
        best = min(best, (time.perf_counter() - start) / 5)
    return step, best


def summary(averages: object, steps: int) -> dict[str, float]:
    """Milliseconds a step in the matrix products, the elementwise work, the copies and the rest."""
    groups = {"products": 0.0, "elementwise": 0.0, "copies": 0.0, "other": 0.0}
    for event in averages:  # type: ignore[attr-defined]
        ms = event.self_cpu_time_total / 1e3 / steps
        kind = "products" if event.key in PRODUCTS else "copies" if event.key in COPIES else "elementwise" if event.key in ELEMENTWISE else "other"
        groups[kind] += ms
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="d2l")
    parser.add_argument("--core", choices=["scratch", "cudnn", "both"], default="both")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dims = CONFIGS[args.config]
    print(f"{args.config}: {dims}, {args.precision}, {torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}")
    for core in ("scratch", "cudnn") if args.core == "both" else (args.core,):
        step, seconds = step_fn(core, dims, args.precision)
        tokens = dims.batch_size * dims.num_steps
        print(f"\n== {core} {args.precision}: {seconds * 1e3:.2f} ms a step, {tokens / seconds:,.0f} tokens/s")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()  # type: ignore[operator]
        averages = prof.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        groups = summary(averages, args.steps)
        total = sum(groups.values())
        print("a step under the profiler: " + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in groups.items()))


if __name__ == "__main__":
    main()
