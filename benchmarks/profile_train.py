"""Where a training step's time goes: by stage (wall clock), and torch.profiler by operator.

    python benchmarks/profile_train.py [--config d2l|larger|w1024-b64|…] [--core scratch|cudnn|both]
                                       [--precision fp32|bf16] [--threads N] [--steps 10] [--rows 15]
                                       [--recurrence compiled|loop]

For each core: the step's wall time (the best of a few rounds), then the profiler's table of
operators by self CPU time over `--steps` steps, sorted into the compiled recurrence (one
operator a layer and direction, lstmlm_recurrence::forward_<cell> and ::backward_<cell>, its
products, elementwise work and threads inside), matrix products, elementwise work, copies and
the rest. With `--recurrence compiled` (the default where it builds) the recurrence is
lstmlm/native.py's C++; `loop` is the Python loop it replaces. Run it on a quiet machine: a busy neighbour shifts every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lstmlm import native
from lstmlm.bench import Dims
from lstmlm.device import keep_freed_memory
from lstmlm.model import CharLM
from lstmlm.step import train_step

CONFIGS = {
    "d2l": Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35),
    "larger": Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100),
    **{f"w{h}-b{b}": Dims(vocab_size=65, hidden=h, layers=1, batch_size=b, num_steps=35) for h in (128, 256, 512, 1024) for b in (16, 64)},
}  # the widths: bench_train.py --config widths's
PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::mkldnn_rnn_layer", "aten::mkldnn_rnn_layer_backward",
            "mkldnn::_linear_pointwise")  # fmt: skip
COPIES = ("aten::copy_", "aten::_to_copy", "aten::cat", "aten::stack", "aten::contiguous", "aten::clone", "aten::index_select")
ELEMENTWISE = ("aten::sigmoid_", "aten::tanh", "aten::mul", "aten::mul_", "aten::addcmul", "aten::addcmul_", "aten::sub_",
               "aten::add_", "aten::add", "aten::sigmoid", "aten::sum", "aten::sub")  # fmt: skip


def best_ms(work: Callable[[], object], rounds: int = 5, repeats: int = 5) -> float:
    """The best mean over `rounds` of `repeats` calls, in milliseconds, after a warm-up."""
    for _ in range(3):
        work()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            work()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def make_step(core: str, dims: Dims, precision: str) -> tuple[CharLM, Callable[[], None]]:
    torch.manual_seed(0)
    model = CharLM(dims.vocab_size, dims.hidden, dims.layers, core=core, embedding=dims.embedding)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    X = torch.randint(0, dims.vocab_size, (dims.batch_size, dims.num_steps))
    Y = torch.randint(0, dims.vocab_size, (dims.batch_size, dims.num_steps))
    device = torch.device("cpu")

    def step() -> None:
        train_step(model, optimizer, X, Y, None, 1.0, device, precision)

    return model, step


def kind_of(key: str) -> str:
    """Which of the profile's groups an operator's time belongs to."""
    if key.startswith("lstmlm_recurrence::"):
        return "compiled recurrence"
    for kind, names in (("products", PRODUCTS), ("copies", COPIES), ("elementwise", ELEMENTWISE)):
        if key in names:
            return kind
    return "other"


def summary(averages: object, steps: int) -> dict[str, float]:
    """Milliseconds a step in the matrix products, the elementwise work, the copies and the rest."""
    groups = {"compiled recurrence": 0.0, "products": 0.0, "elementwise": 0.0, "copies": 0.0, "other": 0.0}
    for event in averages:  # type: ignore[attr-defined]
        ms = event.self_cpu_time_total / 1e3 / steps
        groups[kind_of(event.key)] += ms
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="d2l")
    parser.add_argument("--core", choices=["scratch", "cudnn", "both"], default="both")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--recurrence", choices=["compiled", "loop"], default="compiled")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as training does
    dims = CONFIGS[args.config]
    recurrence = native.disabled() if args.recurrence == "loop" else contextlib.nullcontext()
    with recurrence:
        print(f"{args.config}: {dims}, {args.precision}, {torch.get_num_threads()} torch threads, {torch.backends.cpu.get_cpu_capability()}, "
              f"recurrence: {native.status() if args.recurrence == 'compiled' else 'python loop (asked)'}")
        for core in ("scratch", "cudnn") if args.core == "both" else (args.core,):
            _, step = make_step(core, dims, args.precision)
            ms = best_ms(step)
            tokens = dims.batch_size * dims.num_steps
            print(f"\n== {core} {args.precision}: {ms:.2f} ms a step, {tokens / ms * 1e3:,.0f} tokens/s")
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    step()
            averages = prof.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
            groups = summary(averages, args.steps)
            total = sum(groups.values())
            print("a step under the profiler: " + ", ".join(f"{k} {v:.2f} ms ({v / total:.0%})" for k, v in groups.items()))


if __name__ == "__main__":
    main()
