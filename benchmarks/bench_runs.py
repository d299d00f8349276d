"""How long `lstmlm runs` takes on a directory of many runs, as a whole process (the target: 200
runs in under 1 s).

    python benchmarks/bench_runs.py [--runs 200] [--max-epochs 500] [--repeat 5]

Makes --runs synthetic runs in a temporary directory, as training leaves them: config.json (the
models and corpora varied), vocab.json, run.json with the recorded end, metrics.jsonl with up
to --max-epochs epoch lines (the d2l config logs 500), latest.pt and best.pt (64 KiB each: never
opened, only their sizes and times are read) and the lock; one run in twenty damaged. Then
times `python -m lstmlm runs` (the table, in a pipe), `--json` and `--sort best`, each the
median of --repeat processes, beside `python -m lstmlm --help`: what starting the CLI alone
costs. Prints the machine: CPU model, cores, avx512_bf16, load average.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lstmlm.config import Config

CHARS = list(" etaoinshrdlcumwfgypbvkjxqz.,;:!?'\"-\nETAOINSHRDLCUMWFGYPBVKJXQZ0123456789")


def make_run(root: Path, i: int, max_epochs: int, rng: random.Random) -> None:
    """One run's files, as `lstmlm train` writes them."""
    root.mkdir()
    epochs = rng.randint(1, max_epochs)
    bytes_mode = i % 7 == 0
    cfg = Config().with_overrides({
        "corpus": ["timemachine", "tinyshakespeare", "enwik8", f"/data/corpus-{i}.txt", "src/linux/**/*.[ch]"][i % 5],
        "normalize": "bytes" if bytes_mode else "raw",
        "model": "cudnn" if i % 2 else "scratch",
        "hidden": rng.choice([128, 256, 512, 1024]),
        "layers": rng.choice([1, 2, 3]),
        "embedding": rng.choice([0, 64, 128]),
        "epochs": epochs,
    }).resolved()  # fmt: skip
    tokens = list(range(256)) if bytes_mode else ["<unk>", *CHARS]
    (root / "config.json").write_text(cfg.to_json())
    (root / "vocab.json").write_text(json.dumps({"format": "lstmlm-vocab", "version": 1, "tokens": [chr(t) if isinstance(t, int) else t for t in tokens]}))
    ppl, lines = 30.0, []
    for epoch in range(1, epochs + 1):
        ppl = max(2.5, ppl * 0.97)
        record = {
            "epoch": epoch, "train_perplexity": ppl * 0.95, "val_perplexity": ppl, "val_bpc": 0.0, "tokens_per_s": 7000.0 + epoch,
            "seconds": 12.5, "lr": 0.002, "train_loss": 1.2, "global_step": epoch * 300,
        }  # fmt: skip
        lines.append(json.dumps(record) + "\n")
    (root / "metrics.jsonl").write_text("".join(lines))
    for name in ("latest.pt", "best.pt"):
        (root / name).write_bytes(bytes(64 << 10))
    (root / ".lock").write_text("")
    done = {
        "reason": "completed", "epochs": epochs, "global_step": epochs * 300, "tokens": epochs * 87_500, "seconds": epochs * 12.5,
        "val_perplexity": ppl, "best_val_perplexity": ppl, "at": time.time(),
    }  # fmt: skip
    (root / "run.json").write_text(json.dumps({"corpus_sha1": "0" * 40, "done": done}))
    if i % 20 == 19:  # damaged: a garbage line in the middle of its metrics, or a config that is not JSON
        target = root / ("metrics.jsonl" if i % 40 == 19 else "config.json")
        target.write_text(target.read_text()[:40] + "\ngarbage\n")


def timed(command: list[str], repeat: int) -> tuple[float, float]:
    """(median, min) seconds of `repeat` runs of `command` as a process of its own."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def machine() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} cores (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    bf16 = "yes" if "avx512_bf16" in info else "no"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, avx512_bf16: {bf16}, load average {load}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--max-epochs", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-runs-") as tmp:
        runs_dir = Path(tmp) / "runs"
        runs_dir.mkdir()
        for i in range(args.runs):
            make_run(runs_dir / f"run-{i:03d}", i, args.max_epochs, rng)
        lines = sum(len((p / "metrics.jsonl").read_text().splitlines()) for p in runs_dir.iterdir())
        print(f"machine: {machine()}")
        print(f"{args.runs} runs, {lines:,} metrics lines in all; median (min) of {args.repeat} processes:")
        lstmlm = [sys.executable, "-m", "lstmlm"]
        commands = {
            "lstmlm --help (starting alone)": ["--help"],
            "lstmlm runs": ["runs", "--runs-dir", str(runs_dir)],
            "lstmlm runs --json": ["runs", "--json", "--runs-dir", str(runs_dir)],
            "lstmlm runs --sort best": ["runs", "--sort", "best", "--runs-dir", str(runs_dir)],
        }
        for label, extra in commands.items():
            median, least = timed([*lstmlm, *extra], args.repeat)
            print(f"  {label:32s} {median:6.3f} s ({least:.3f} s)")


if __name__ == "__main__":
    main()
