"""`lstmlm serve` under load: many clients streaming generations at once, for a while.

    python benchmarks/bench_serve.py --runs-dir runs --run shakespeare [--clients 32] [--seconds 30]
        [--length 500] [--max-batch 64] [--queue 256] [--temperature 0.8]

Starts `lstmlm serve` on a free loopback port (or uses --url, a server already running), warms
it up, then runs --clients threads that each stream one generation after another (POST
/api/generate, server-sent events) until --seconds have passed; a client refused past the
server's queue waits what the 503's Retry-After says before it asks again, as a client
should (--no-wait: at once, a storm of refusals the server spends its cores answering). Prints what happened to the
requests (completed, refused with 503 past the queue, failed), the characters the
server streamed per second in all, the time to a stream's first characters and to its end
(median and 95th percentile, of completed streams), the most generations seen running at
once, and the server's resident memory: before the load, every 30 s under it, and after (where
the server runs on this machine: the one it started, or --pid for --url's).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sse import read_stream


def start_server(runs_dir: str, max_batch: int, queue: int, max_length: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstmlm", "serve", "--runs-dir", runs_dir, "--port", "0",
         "--max-batch", str(max_batch), "--queue", str(queue), "--max-length", str(max_length)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("serving the runs"):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, line.split(" at ")[1].split(" ")[0].rstrip("/")
    raise SystemExit(f"lstmlm serve did not start (exit code {proc.wait()})")


MEMORY_EVERY = 30.0  # seconds between looks at the server's memory under load


def rss_mib(pid: int | None) -> float | None:
    """The process's resident memory in MiB; None where there is no process to read (none
    named, or it has ended)."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def memory_line(trail: list[float | None]) -> str:
    """The server's memory before the load, every MEMORY_EVERY seconds under it, and after."""
    if not trail or trail[0] is None:
        return "unknown (a server named by --url: --pid reads its memory)"
    looks = ", ".join(f"{mib:,.0f}" for mib in trail[1:-1] if mib is not None)
    after = "gone" if trail[-1] is None else f"{trail[-1]:,.0f} MiB"
    return f"{trail[0]:,.0f} MiB before; every {MEMORY_EVERY:.0f} s under load: {looks or '-'}; {after} after"


def authorization(token: str | None) -> dict[str, str]:
    """The header a server started with --token wants (none for one without)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def get_json(url: str, path: str, token: str | None = None) -> Any:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", path, headers=authorization(token))
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def running(url: str, token: str | None = None) -> int | None:
    """The generations /api/status counts as running; None where the server no longer answers
    (it has ended: the clients' outcomes say how)."""
    try:
        return int(get_json(url, "/api/status", token)["running"])
    except OSError:
        return None


def stream(url: str, body: dict[str, Any], token: str | None = None) -> tuple[str, float, float, int, float]:
    """(outcome, seconds to the first characters, seconds to the end, characters, the seconds a
    refusal's Retry-After asks to wait) of one generation."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json", **authorization(token)})
        response = conn.getresponse()
        if response.status == 503:
            response.read()
            return "refused", float("nan"), time.perf_counter() - start, 0, float(response.getheader("Retry-After") or 0)
        if response.status != 200:
            return f"HTTP {response.status}", float("nan"), time.perf_counter() - start, 0, 0.0
        outcome, first, chars = read_stream(response, start)
        return outcome, first, time.perf_counter() - start, chars, 0.0
    except OSError as e:
        return type(e).__name__, float("nan"), time.perf_counter() - start, 0, 0.0
    finally:
        conn.close()


def percentiles(values: list[float]) -> str:
    if not values:
        return "–"
    values = sorted(values)
    p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
    return f"median {statistics.median(values) * 1000:,.0f} ms, 95% {p95 * 1000:,.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--run", required=True)
    parser.add_argument("--url", help="A server already running (default: start one on a free loopback port).")
    parser.add_argument("--token", default=os.environ.get("LSTMLM_SERVE_TOKEN"), help="The server's token, if it has one (default: $LSTMLM_SERVE_TOKEN).")
    parser.add_argument("--pid", type=int, help="--url's server's process id, where it runs on this machine: its memory is read too.")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--length", type=int, default=500)
    parser.add_argument("--prefix", default="\n")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--queue", type=int, default=256)
    parser.add_argument("--no-wait", action="store_true", help="Ask again at once after a refusal, ignoring Retry-After.")
    args = parser.parse_args()

    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.runs_dir, args.max_batch, args.queue, args.length)
    body = {"run": args.run, "prefix": args.prefix, "length": args.length, "temperature": args.temperature}
    try:
        for _ in range(3):  # the model loaded, the worker threads started
            outcome = stream(url, body, args.token)[0]
            if outcome != "completed":
                raise SystemExit(
                    f"a warm-up generation was {outcome}: is --run right (and --token, where the server has one), "
                    "and can its model read --prefix (d2l models have no line breaks)?"
                )
        pid = proc.pid if proc else args.pid
        memory = [rss_mib(pid)]
        results: list[tuple[str, float, float, int, float]] = []
        active: list[int] = []
        end = time.perf_counter() + args.seconds

        def client() -> None:
            while time.perf_counter() < end:
                results.append(stream(url, body, args.token))
                wait = 0.0 if args.no_wait else min(results[-1][4], end - time.perf_counter())
                if wait > 0:
                    time.sleep(wait)

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        started = time.perf_counter()
        look = started + MEMORY_EVERY
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            if (n := running(url, args.token)) is not None:
                active.append(n)
            if time.perf_counter() >= look:
                memory.append(rss_mib(pid))
                look += MEMORY_EVERY
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        memory.append(rss_mib(pid))
        alive = proc.poll() is None if proc is not None else running(url, args.token) is not None
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()

    outcomes = Counter(r[0] for r in results)
    done = [r for r in results if r[0] == "completed"]
    chars = sum(r[3] for r in results)
    refused = "asks again at once" if args.no_wait else "waits its Retry-After"
    print(f"{args.clients} clients for {elapsed:.1f} s, run {args.run}, {args.length} characters a stream, "
          f"at most {args.max_batch} stepping together on the server, {args.queue} waiting; a refused client {refused}")  # fmt: skip
    print("requests:            " + ", ".join(f"{n:,} {k}" for k, n in outcomes.most_common()))
    print(f"streamed:            {chars:,} characters, {chars / elapsed:,.0f} characters/s in all")
    print(f"first characters:    {percentiles([r[1] for r in done])}")
    print(f"whole stream:        {percentiles([r[2] for r in done])}")
    print(f"running at once:     at most {max(active, default=0)} seen")
    print(f"server memory (RSS): {memory_line(memory)}")
    print(f"still up:            {'yes' if alive else 'NO'}")


if __name__ == "__main__":
    main()
