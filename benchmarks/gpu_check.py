"""Does the CUDA path work, and how fast is it? One script for a person with a GPU.

    python benchmarks/gpu_check.py [--corpus timemachine.txt] [--out gpu_check.json] [--quick]

On a machine with the README's install and a CUDA GPU, in about 8 minutes on an H100/H200:

1. the CUDA tests: `pytest -m cuda` (the cores' equivalence on CUDA in fp32 and bf16, the dtype
   that reaches cuDNN, resume on CUDA, generating on CUDA and from a CUDA run on the CPU);
2. the d2l config for 100 epochs on both cores, on CUDA and on the CPU: perplexity side by side
   (the corpus: --corpus, or The Time Machine downloaded into the cache);
3. the speed table: training tokens/s of both cores in fp32 and bf16 for d2l (batch 32, 35
   steps, 256 hidden), the larger config (batch 64, 100 steps, 512 hidden, 2 layers) and a large
   one (batch 256, 100 steps, 1024 hidden, 2 layers), each with its share of the GPU's measured
   product ceiling; generation characters/s at batch 1 and 64; and `torchrun --nproc_per_node 1`.

It prints one table and writes it all as JSON (--out). Nothing here needs the network when
--corpus is given.
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
from pathlib import Path

import torch

from lstmlm.bench import Dims, machine, measure_generation, measure_matmul_ceiling, measure_training, training_flops_per_token

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "d2l": Dims(vocab_size=28, hidden=256, layers=1, batch_size=32, num_steps=35),
    "larger": Dims(vocab_size=65, hidden=512, layers=2, batch_size=64, num_steps=100),
    "large": Dims(vocab_size=256, hidden=1024, layers=2, batch_size=256, num_steps=100),
}


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def cuda_tests() -> dict[str, object]:
    done = run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"], timeout=240)
    tail = done.stdout.strip().splitlines()[-1:] or [""]
    return {"passed": done.returncode == 0, "summary": tail[0], "output": done.stdout[-4000:] + done.stderr[-2000:]}


def d2l_perplexity(corpus: str | None, device: str, core: str, epochs: int, runs: Path) -> dict[str, object]:
    """The d2l config on `device`: the last epoch's perplexity and tokens/s, as --json reports them."""
    cmd = [sys.executable, "-m", "lstmlm", "train", "--config", str(ROOT / "configs" / "d2l.toml"), "--epochs", str(epochs),
           "--model", core, "--device", device, "--runs-dir", str(runs), "--run", f"{core}-{device}", "--json"]  # fmt: skip
    if corpus:
        cmd += ["--corpus", corpus]
    start = time.perf_counter()
    done = run(cmd, timeout=600)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    last = [e for e in events if e.get("event") == "epoch"][-1]
    return {"perplexity": last["train_perplexity"], "tokens_per_s": last["tokens_per_s"], "wall_s": time.perf_counter() - start}


def speed_table(quick: bool) -> list[dict[str, object]]:
    device = torch.device("cuda")
    rows: list[dict[str, object]] = []
    ceilings = {p: measure_matmul_ceiling(device, p, max_size=8192) for p in ("fp32", "bf16")}
    for p, c in ceilings.items():
        rows.append({"what": f"matmul {c.size}×{c.size}", "precision": p, "figure": c.gflops, "unit": "GFLOP/s", "of_ceiling": 1.0})
    for name, dims in SHAPES.items():
        for precision in ("fp32", "bf16"):
            for core in ("scratch", "cudnn"):
                try:
                    speed = measure_training(core, dims, device, precision, steps=5 if quick else 30, ceiling=ceilings[precision])
                    rows.append({"what": f"train {name} {core}", "precision": precision, "figure": speed.tokens_per_s, "unit": "tokens/s",
                                 "of_ceiling": speed.utilisation, "flops_per_token": training_flops_per_token(dims)})  # fmt: skip
                except Exception as e:
                    rows.append({"what": f"train {name} {core}", "precision": precision, "error": f"{type(e).__name__}: {e}"[:200]})
    for core in ("scratch", "cudnn"):
        for samples in (1, 64):
            gen = measure_generation(core, SHAPES["d2l"], device, "fp32", length=200 if quick else 1000, samples=samples)
            rows.append({"what": f"generate d2l {core}" + (f" ×{samples}" if samples > 1 else ""), "precision": "fp32",
                         "figure": gen.chars_per_s, "unit": "chars/s"})  # fmt: skip
    return rows


def torchrun_one() -> dict[str, object]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "lstmlm", "bench",
           "--device", "cuda", "--steps", "5", "--json"]  # fmt: skip
    done = run(cmd, timeout=300)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {"returncode": done.returncode, "rows": rows, "error": done.stderr[-1000:] if done.returncode else None}


def show(result: dict[str, object]) -> None:
    print(f"\nmachine: {result['machine']}")
    tests = result["cuda_tests"]
    print(f"CUDA tests: {'passed' if tests['passed'] else 'FAILED'} — {tests['summary']}")  # type: ignore[index]
    print("\nd2l, 100 epochs: last epoch's perplexity (tokens/s)")
    for core, by_device in result["d2l"].items():  # type: ignore[union-attr]
        cells = [f"{dev} {r['perplexity']:.3f} ({r['tokens_per_s']:,.0f})" if "perplexity" in r else f"{dev} error: {r['error']}"
                 for dev, r in by_device.items()]  # fmt: skip
        gap = [r.get("perplexity") for r in by_device.values()]
        within = f"  CUDA/CPU {gap[0] / gap[1]:.4f}" if all(isinstance(g, float) for g in gap) else ""
        print(f"  {core:8} " + "   ".join(cells) + within)
    print(f"\n{'measure':32} {'precision':9} {'figure':>16} {'of ceiling':>10}")
    for row in result["speed"]:  # type: ignore[union-attr]
        if "error" in row:
            print(f"{row['what']:32} {row['precision']:9} {'error: ' + row['error']}")
            continue
        share = f"{row['of_ceiling']:.1%}" if isinstance(row.get("of_ceiling"), float) else ""
        print(f"{row['what']:32} {row['precision']:9} {row['figure']:>12,.0f} {row['unit']:<8} {share:>6}")
    tr = result["torchrun"]
    print(f"\ntorchrun --nproc_per_node 1 bench: exit {tr['returncode']}, {len(tr['rows'])} rows")  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", help="The Time Machine as a local file (default: download it into the cache)")
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="fewer steps: a check that the script runs, not figures")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False)")
    start = time.perf_counter()
    result: dict[str, object] = {"machine": dataclasses.asdict(machine(torch.device("cuda")))}
    result["cuda_tests"] = cuda_tests()
    with tempfile.TemporaryDirectory() as runs:
        result["d2l"] = {core: {dev: d2l_perplexity(args.corpus, dev, core, args.epochs, Path(runs)) for dev in ("cuda", "cpu")}
                         for core in ("scratch", "cudnn")}  # fmt: skip
    result["speed"] = speed_table(args.quick)
    result["torchrun"] = torchrun_one()
    result["seconds"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and not math.isfinite(o) else str(o)))
    show(result)
    print(f"\nwritten: {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
