"""Where a training step's time goes: by stage (wall clock), and torch.profiler by operator.

    python benchmarks/profile_train.py [--config d2l|larger] [--core scratch|cudnn|both]
                                       [--precision fp32|bf16] [--threads N] [--steps 10] [--rows 15]
                                       [--recurrence compiled|loop]

For each core: the step's wall time (the best of a few rounds), then for the scratch core its
stages, each timed alone on the step's own tensors: stacking the weights, every layer's forward
recurrence (fused.run_sequence), the backward recurrence (fused.recurrence_backward), the weight
gradients, and the rest of the step (the output layer, the loss, autograd, clipping, the
optimizer) as the difference. With `--recurrence compiled` (the default where it builds) the
recurrence is lstmlm/native.py's C++; `loop` is the Python loop it replaces. Then the
profiler's table of operators by self CPU time over `--steps` steps, sorted into matrix
products, elementwise work, copies and the rest. (The compiled recurrence's own products and
threads are inside one operator, lstmlm_recurrence::forward or ::backward, which is why the
stages come first.) Run it on a quiet machine: a busy neighbour shifts every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from lstmlm import fused, native
from lstmlm.bench import Dims
from lstmlm.device import DTYPES, keep_freed_memory
from lstmlm.model import CharLM
from lstmlm.step import train_step

CONFIGS = {
    "d2l": Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35),
    "larger": Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100),
}
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


def stages(model: CharLM, dims: Dims, precision: str) -> dict[str, float]:
    """The scratch core's stages, each timed alone (ms a step, every layer together)."""
    dtype = DTYPES[precision]
    scratch = model.scratch_core
    assert scratch is not None
    B, T, H = dims.batch_size, dims.num_steps, dims.hidden
    X: torch.Tensor = torch.randint(0, dims.vocab_size, (T, B))
    zeros = torch.zeros(B, H)
    times = {"stack weights": 0.0, "forward recurrence": 0.0, "backward recurrence": 0.0, "weight gradients": 0.0}
    with torch.no_grad():
        for k, layer in enumerate(scratch.scratch_layers()):
            ids = k == 0
            times["stack weights"] += best_ms(lambda layer=layer, ids=ids: fused.stack_weights(layer.W_x, layer.W_h, layer.b, dtype, ids))
            weights = fused.stack_weights(layer.W_x, layer.W_h, layer.b, dtype, ids)
            seq = fused.run_sequence(X, zeros, zeros, weights, torch.float32)
            times["forward recurrence"] += best_ms(lambda X=X, weights=weights: fused.run_sequence(X, zeros, zeros, weights, torch.float32))
            W_h = fused.as_dtype(layer.W_h.detach(), dtype).contiguous()
            dHs = torch.randn(T, H, B)
            times["backward recurrence"] += best_ms(lambda seq=seq, W_h=W_h, dHs=dHs: fused.recurrence_backward(dHs, None, seq.gates, seq.Cs, seq.tanh_C, W_h))
            dGates, dGates_c, _ = fused.recurrence_backward(dHs, None, seq.gates, seq.Cs, seq.tanh_C, W_h)
            times["weight gradients"] += best_ms(lambda X=X, seq=seq, dG=dGates, dG_c=dGates_c, n=layer.W_x.shape[0]: fused.weight_gradients(X, seq.Hs[:-1], dG, dG_c, n))
            X = seq.Hs[1:].transpose(1, 2)  # the next layer's input: this one's H, as the fast path hands it on
    return times


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
            model, step = make_step(core, dims, args.precision)
            ms = best_ms(step)
            tokens = dims.batch_size * dims.num_steps
            print(f"\n== {core} {args.precision}: {ms:.2f} ms a step, {tokens / ms * 1e3:,.0f} tokens/s")
            if core == "scratch":
                parts = stages(model, dims, args.precision)
                parts["the rest of the step"] = max(0.0, ms - sum(parts.values()))
                for name, part in parts.items():
                    print(f"  {name:24} {part:7.2f} ms  {part / ms:4.0%}")
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
