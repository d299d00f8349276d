"""Generation's speed: one stream, 64 sampled rows at once, and `lstmlm serve` under 1 to 256
clients (its continuous batching), on a trained run.

    python benchmarks/bench_generate.py --runs-dir runs --run d2l [--length 2000] [--clients 1,8,64,256]
        [--characters 200000] [--max-batch 64] [--queue 256] [--threads 1] [--lanes N] [--skip-server]

Prints the machine (CPU model, cores, avx512_bf16 or not, the load average: figures taken under
load mean little), then a table, one line per case:

    batch 1, greedy              lstmlm generate's loop in this process (start-up left out)
    batch 64, T=1, top-p 0.95    --num-samples 64, every row sampled in one pass
    server, N clients            N clients at once, each streaming one --length sample
                                 (T=1, top-p 0.95, its own seed) from a server started here

with the characters/s in all, the time to the first character (median and 95th percentile:
for the in-process cases, the prefix read and the first step), the requests refused (503), and
peak memory (this process's for the in-process cases; the server's VmHWM for the server).

--leave also times what `serve/batching.py` chose between: a batch of 64 rows with 32 of them
ended, stepped masked (all 64) or with the ended rows removed (32, after one `Stepper.keep`).
The d2l model of the issue's targets is `lstmlm train --config configs/d2l.toml --name d2l`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from sse import read_stream


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown CPU")
    bf16 = "avx512_bf16" if "avx512_bf16" in cpuinfo else "no avx512_bf16"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, {bf16}, torch threads {torch.get_num_threads()}, load average {load}"


def percentiles(values: list[float]) -> tuple[float, float]:
    """(median, 95th percentile) in milliseconds."""
    if not values:
        return float("nan"), float("nan")
    values = sorted(values)
    return statistics.median(values) * 1000, values[min(len(values) - 1, round(0.95 * (len(values) - 1)))] * 1000


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_process(runs_dir: Path, run: str, characters: int, samples: int, options: dict[str, Any], precision: str = "fp32") -> tuple[float, float]:
    """(characters/s in all, seconds to the first character) of `lstmlm generate`'s loop."""
    from lstmlm.generate import Sampling
    from lstmlm.inference import continue_prefix, load

    trained = load(runs_dir, run, None, False, "cpu", precision)
    precision = trained.precision
    sampling = Sampling(length=characters // samples, num_samples=samples, **options)
    list(continue_prefix(trained, "the", Sampling(length=200, num_samples=samples, **options), precision).steps)  # warm up
    start = time.perf_counter()
    made_together = continue_prefix(trained, "the", sampling, precision).steps.as_made()  # as lstmlm generate reads them
    made = samples * len(next(made_together))
    first = time.perf_counter() - start
    made += samples * sum(len(group) for group in made_together)
    return made / (time.perf_counter() - start), first


def start_server(runs_dir: Path, args: argparse.Namespace, tree: Path | None = None) -> tuple[subprocess.Popen[str], str]:
    """`lstmlm serve` on a free loopback port, and its URL; with `tree`, that tree's code (its
    directory first on the path, started outside it: benchmarks/ab_serve.py)."""
    command = [sys.executable, "-m", "lstmlm", "serve", "--runs-dir", str(runs_dir.resolve()), "--port", "0", "--max-length", str(args.length)]
    command += ["--max-batch", str(args.max_batch), "--queue", str(args.queue), "--max-connections", "1024", "--deadline", "3600"]
    command += ["--threads", str(args.threads), "--precision", args.precision] + (["--lanes", str(args.lanes)] if args.lanes else [])
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree.resolve())}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=None if tree is None else "/")
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("serving the runs"):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split(" at ")[1].split(" ")[0].rstrip("/")
    raise SystemExit(f"lstmlm serve{'' if tree is None else f' from {tree}'} did not start (exit code {proc.wait()})")


def stream(url: str, body: dict[str, Any]) -> tuple[str, float, int]:
    """(outcome, seconds to the first character, characters) of one streamed generation."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=3600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return ("refused" if response.status == 503 else f"HTTP {response.status}"), float("nan"), 0
        return read_stream(response, start)
    except OSError as e:
        return type(e).__name__, float("nan"), 0
    finally:
        conn.close()


def server_peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def served(url: str, run: str, clients: int, length: int) -> tuple[float, list[float], int]:
    """(characters/s in all, seconds to each completed stream's first character, refusals) of
    `clients` streams started at once."""
    results: list[tuple[str, float, int]] = []
    bodies = [{"run": run, "prefix": "the", "length": length, "temperature": 1.0, "top_p": 0.95, "seed": i} for i in range(clients)]
    threads = [threading.Thread(target=lambda b=b: results.append(stream(url, b))) for b in bodies]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    firsts = [r[1] for r in results if r[0] == "completed"]
    return sum(r[2] for r in results) / elapsed, firsts, sum(r[0] == "refused" for r in results)


def leave(runs_dir: Path, run: str, steps: int = 200) -> str:
    """Masked (64 rows stepped, 32 of them ended) against removed (32 rows, after one keep)."""
    from lstmlm.generate import prime
    from lstmlm.inference import load

    trained = load(runs_dir, run, None, False, "cpu", "fp32")
    timings = {}
    with torch.inference_mode():
        for rows in (64, 32):
            step, last = prime(trained.model, trained.vocab, list("the"), 64)
            keep_s = 0.0
            if rows == 32:
                start = time.perf_counter()
                step.keep(list(range(0, 64, 2)))
                keep_s, last = time.perf_counter() - start, last[:32]
            start = time.perf_counter()
            for _ in range(steps):
                step(last)
            timings[rows] = ((time.perf_counter() - start) / steps, keep_s)
    (masked, _), (removed, copy) = timings[64], timings[32]
    return f"a step of 64 rows {masked * 1e3:.3f} ms; of the 32 left {removed * 1e3:.3f} ms, after a keep of {copy * 1e3:.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--run", required=True)
    parser.add_argument("--length", type=int, default=2000, help="Characters a server client asks for.")
    parser.add_argument("--characters", type=int, default=200_000, help="Characters the in-process cases make.")
    parser.add_argument("--clients", default="1,8,64,256")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--queue", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="The server's --threads: cores a step uses.")
    parser.add_argument("--lanes", type=int, default=None, help="The server's --lanes (default: its own, a lane a core).")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16 or auto: the products' precision, in process and in the server.")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument("--leave", action="store_true")
    args = parser.parse_args()

    print(f"{machine()}, precision {args.precision}")
    print(f"{'case':<28} {'characters/s':>13} {'first char (median, p95)':>26} {'refused':>8} {'peak MiB':>9}")
    rate, first = in_process(args.runs_dir, args.run, args.characters, 1, {}, args.precision)
    print(f"{'batch 1, greedy':<28} {rate:>13,.0f} {first * 1000:>17,.1f} ms{'':>7} {'–':>8} {peak_mib():>9,.0f}")
    rate, first = in_process(args.runs_dir, args.run, args.characters, 64, {"temperature": 1.0, "top_p": 0.95, "seed": 0}, args.precision)
    print(f"{'batch 64, T=1, top-p 0.95':<28} {rate:>13,.0f} {first * 1000:>17,.1f} ms{'':>7} {'–':>8} {peak_mib():>9,.0f}")
    if args.leave:
        print("ended rows, masked or removed:", leave(args.runs_dir, args.run))
    if args.skip_server:
        return
    proc, url = start_server(args.runs_dir, args)
    try:
        served(url, args.run, 2, 200)  # warm up: the model loaded, a batch run
        for clients in (int(c) for c in args.clients.split(",")):
            rate, firsts, refused = served(url, args.run, clients, args.length)
            median, p95 = percentiles(firsts)
            label = f"server, {clients} client{'s' if clients > 1 else ''}"
            print(f"{label:<28} {rate:>13,.0f} {median:>11,.0f}, {p95:>6,.0f} ms {refused:>8} {server_peak_mib(proc.pid):>9,.0f}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
