"""Does the CUDA path work, and how fast is it? One script for a person with a GPU.

    python benchmarks/gpu_check.py [--corpus timemachine.txt] [--out gpu_check.json]
    python benchmarks/gpu_check.py --dry [--corpus FILE]    # any machine: every part at toy sizes

On a machine with the README's install and a CUDA GPU, within 8 minutes on an H100/H200 (each
part has a limit, and all of them one deadline; a part the deadline reaches is skipped, saying so):

1. tests     `pytest -m cuda`: the cores' equivalence on CUDA in fp32 and bf16, the dtype that
             reaches cuDNN, resume on CUDA, generating on CUDA and from a CUDA run on the CPU,
             the CUDA graph against the eager step, no host sync between steps      ≤ 180 s
2. d2l       the d2l config for 100 epochs, both cores, on CUDA and on the CPU: the last
             epoch's perplexity side by side (the corpus: --corpus, or The Time Machine
             downloaded into the cache)                                              ≤ 4 × 60 s
3. speed     training tokens/s of both cores in fp32 and bf16 for d2l (batch 32, 35 steps,
             256 hidden), for batch 64 × 100 steps × 512 hidden × 2 layers and for batch
             256 × 100 steps × 1024 hidden × 2 layers — each as a share of the measured product
             ceiling, bf16 also of the GPU's dense bf16 peak on paper — the scratch core's step
             a CUDA graph (lstmlm.graphs)                                            ≈ 60 s
4. generate  characters/s at batch 1 (greedy) and 64 (sampled), both cores            ≈ 10 s
5. torchrun  `torchrun --standalone --nproc_per_node 1 -m lstmlm train`, d2l          ≤ 60 s

then the issue's targets, each met or missed. It prints one table and writes it as JSON (--out).
Nothing needs the network when --corpus is given.

--dry runs every part at toy sizes on whatever device there is, in seconds — a check that the
script works (tests/test_gpu_check.py runs it on a CPU), not figures; the parts that need a GPU
(the CUDA tests, the CUDA column of d2l) are skipped with a line that says why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lstmlm.bench import Dims, machine, measure_generation, measure_matmul_ceiling, measure_training
from lstmlm.device import set_tf32

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 8 * 60
SHAPES = {
    "d2l": Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35),
    "512×2": Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100),
    "1024×2 b256": Dims(vocab_size=256, hidden=1024, layers=2, batch_size=256, num_steps=100),
}
TOY = Dims(vocab_size=28, hidden=16, layers=2, batch_size=4, num_steps=5)
# Dense bf16 tensor-core peaks on paper, TFLOP/s (NVIDIA's datasheets, without sparsity); the
# first name found in the device's name applies.
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.5, "H100": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class Row:
    part: str  # tests | d2l | speed | generate | torchrun | target
    measure: str
    precision: str = ""
    value: float | None = None
    unit: str = ""
    note: str = ""  # a share of a ceiling, a comparison, why it was skipped, an error
    of_peak: float | None = None  # bf16 training: the FLOPs counted a token, as a share of the GPU's dense bf16 peak


class Budget:
    """The one deadline, and each part's share of what is left."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self, limit: float) -> float:
        return max(0.0, min(limit, self.end - time.perf_counter()))


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str] | None:
    """The command's result, or None when it ran out of time."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return None


def last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1][:200]


# ---- the parts -----------------------------------------------------------------------------------


def cuda_tests(budget: Budget, skip: str | None) -> list[Row]:
    if skip:
        return [Row("tests", "pytest -m cuda", note=f"skipped: {skip}")]
    done = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"], budget.left(180))
    if done is None:
        return [Row("tests", "pytest -m cuda", note="ran out of its time (180 s)")]
    summary = last_line(done.stdout)
    return [Row("tests", "pytest -m cuda", note=("passed: " if done.returncode == 0 else "FAILED: ") + summary)]


def train_command(corpus: str | None, device: str, core: str, epochs: int, runs: Path, name: str) -> list[str]:
    """`lstmlm train`'s d2l run, JSON lines out (the run named by --name: torchrun reads --run as its own --run-path)."""
    cmd = ["-m", "lstmlm", "train", "--config", str(ROOT / "configs" / "d2l.toml"), "--epochs", str(epochs), "--model", core,
           "--device", device, "--runs-dir", str(runs), "--name", name, "--sample-every", "0", "--json"]  # fmt: skip
    return cmd + (["--corpus", corpus] if corpus else [])


def last_epoch(done: subprocess.CompletedProcess[str] | None, limit: float) -> dict[str, float] | str:
    """The last epoch's record of a `train --json`, or what went wrong."""
    if done is None:
        return f"ran out of its time ({limit:.0f} s)"
    if done.returncode != 0:
        return "error: " + last_line(done.stderr)
    epochs = [e for e in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")) if e.get("event") == "epoch"]
    return epochs[-1] if epochs else "error: no epoch reported"


def d2l_runs(budget: Budget, corpus: str | None, devices: list[str], skipped: dict[str, str], epochs: int, runs: Path) -> list[Row]:
    rows = []
    for core in ("scratch", "cudnn"):
        for device in ("cuda", "cpu"):
            what = f"d2l {epochs} epochs {core} {device}"
            if device not in devices:
                rows.append(Row("d2l", what, note=f"skipped: {skipped[device]}"))
                continue
            limit = budget.left(60)
            result = last_epoch(run([sys.executable, *train_command(corpus, device, core, epochs, runs, f"{core}-{device}")], limit), limit)
            if isinstance(result, str):
                rows.append(Row("d2l", what, note=result))
                continue
            rows.append(Row("d2l", what, "fp32", result["train_perplexity"], "perplexity", f"{result['tokens_per_s']:,.0f} tokens/s"))
    return rows


def bf16_peak(gpu: str | None) -> float | None:
    """The dense bf16 peak on paper, GFLOP/s, of the GPU so named; None when unknown."""
    for name, tflops in BF16_PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return tflops * 1000
    return None


def speed(budget: Budget, device: torch.device, shapes: dict[str, Dims], steps: int, ceiling_size: int, peak: float | None) -> list[Row]:
    rows, ceilings = [], {}
    for precision in ("fp32", "bf16"):
        ceiling = measure_matmul_ceiling(device, precision, max_size=ceiling_size, min_seconds=0.5 if steps > 1 else 0.0)
        ceilings[precision] = ceiling
        rows.append(Row("speed", f"matmul {ceiling.size}×{ceiling.size}", precision, ceiling.gflops, "GFLOP/s", "the measured ceiling"))
    for name, dims in shapes.items():
        for precision in ("fp32", "bf16"):
            for core in ("scratch", "cudnn"):
                what = f"train {name} {core}"
                if not budget.left(1):
                    rows.append(Row("speed", what, precision, note="skipped: the deadline came"))
                    continue
                try:
                    result = measure_training(core, dims, device, precision, steps=steps, ceiling=ceilings[precision])
                except Exception as e:  # an out-of-memory error or a kernel that fails is a row of the table, not the end of it
                    rows.append(Row("speed", what, precision, note=f"error: {type(e).__name__}: {e}"[:200]))
                    continue
                of_peak = result.gflops / peak if precision == "bf16" and peak else None
                note = f"{result.gflops / ceilings[precision].gflops:.1%} of the ceiling" + (f", {of_peak:.1%} of the bf16 peak" if of_peak else "")
                rows.append(Row("speed", what, precision, result.tokens_per_s, "tokens/s", note, of_peak))
    return rows


def generation(device: torch.device, dims: Dims, length: int) -> list[Row]:
    rows = []
    for core in ("scratch", "cudnn"):
        for samples in (1, 64):
            result = measure_generation(core, dims, device, "fp32", length=length, warmup=min(20, length), samples=samples)
            rows.append(Row("generate", f"generate {core} ×{samples}", "fp32", result.chars_per_s, "chars/s", "greedy" if samples == 1 else "sampled"))
    return rows


def torchrun_one(budget: Budget, corpus: str | None, device: str, epochs: int, runs: Path) -> list[Row]:
    what = f"torchrun --nproc_per_node 1 train d2l {epochs} epochs scratch {device}"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    limit = budget.left(60)
    result = last_epoch(run([sys.executable, *launcher, *train_command(corpus, device, "scratch", epochs, runs, "torchrun")], limit), limit)
    if isinstance(result, str):
        return [Row("torchrun", what, note=result)]
    return [Row("torchrun", what, "fp32", result["tokens_per_s"], "tokens/s", f"perplexity {result['train_perplexity']:.3f}")]


# ---- the targets -----------------------------------------------------------------------


def targets(rows: list[Row]) -> list[Row]:
    """The targets of issue 16 that these rows measure (a GPU of the H100/H200 class)."""
    value = {(r.measure, r.precision): r.value for r in rows if r.value is not None}
    of_peak = {r.measure: r.of_peak for r in rows if r.precision == "bf16"}

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    measured: list[tuple[str, float | None, float]] = []  # what, the figure, the least it must be (a negative: the most)
    for core in ("scratch", "cudnn"):
        gap = ratio(value.get((f"d2l 100 epochs {core} cuda", "fp32")), value.get((f"d2l 100 epochs {core} cpu", "fp32")))
        measured.append((f"d2l perplexity {core}: |CUDA / CPU - 1| ≤ 2%", None if gap is None else abs(gap - 1), -0.02))
    cudnn = value.get(("train d2l cudnn", "fp32"))
    measured.append(("train d2l cudnn fp32 ≥ 1,000,000 tokens/s", cudnn, 1e6))
    measured.append(("train d2l scratch fp32 ≥ 0.5 × cudnn", ratio(value.get(("train d2l scratch", "fp32")), cudnn), 0.5))
    measured.append(("train 512×2 cudnn bf16 ≥ 1,500,000 tokens/s", value.get(("train 512×2 cudnn", "bf16")), 1.5e6))
    for core in ("cudnn", "scratch"):
        measured.append((f"train 1024×2 b256 {core} bf16 ≥ 15% of the bf16 peak", of_peak.get(f"train 1024×2 b256 {core}"), 0.15))
    out = []
    for what, got, bound in measured:
        met = None if got is None else got <= -bound if bound < 0 else got >= bound
        out.append(Row("target", what, value=got, note="not measured" if met is None else "met" if met else "MISSED"))
    return out


# ---- the table -----------------------------------------------------------------------------------


def figure(row: Row) -> str:
    if row.value is None:
        return ""
    if abs(row.value) >= 100:
        return f"{row.value:,.0f}"
    return f"{row.value:.4g}"


def show(rows: list[Row], header: str) -> None:
    print(header)
    print(f"{'part':9} {'measure':54} {'prec':5} {'figure':>14} {'unit':10} note")
    for r in rows:
        print(f"{r.part:9} {r.measure:54} {r.precision:5} {figure(r):>14} {r.unit:10} {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--corpus", help="The Time Machine as a local file (default: download it into the cache)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON")
    parser.add_argument("--dry", action="store_true", help="every part at toy sizes, on any device: a check that the script runs, not figures")
    args = parser.parse_args()
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.dry:
        sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); --dry runs every part at toy sizes on the CPU")
    device = torch.device("cuda" if has_cuda else "cpu")
    no_gpu = "no CUDA GPU here"
    budget = Budget(DEADLINE_S)
    start = time.perf_counter()
    set_tf32(device, False)  # fp32 is fp32 on both cores, as `lstmlm train` runs it by default
    about = machine(device)
    epochs = 1 if args.dry else 100
    rows = cuda_tests(budget, "--dry" if args.dry else None if has_cuda else no_gpu)
    with tempfile.TemporaryDirectory() as runs:
        rows += d2l_runs(budget, args.corpus, ["cuda", "cpu"] if has_cuda else ["cpu"], {"cuda": no_gpu}, epochs, Path(runs))
        shapes = {"toy": TOY} if args.dry else SHAPES
        rows += speed(budget, device, shapes, steps=1 if args.dry else 30, ceiling_size=256 if args.dry else 8192, peak=bf16_peak(about.gpu))
        rows += generation(device, TOY if args.dry else SHAPES["d2l"], length=8 if args.dry else 1000)
        rows += torchrun_one(budget, args.corpus, device.type, epochs, Path(runs))
    rows += targets(rows)
    seconds = time.perf_counter() - start
    header = f"gpu_check{' --dry' if args.dry else ''}: {about.gpu or about.cpu}, torch {about.torch}, TF32 {'on' if about.tf32 else 'off'}, {seconds:.0f} s"
    result = {"machine": dataclasses.asdict(about), "dry": args.dry, "seconds": seconds, "rows": [dataclasses.asdict(r) for r in rows]}
    Path(args.out).write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)))
    show(rows, header)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
