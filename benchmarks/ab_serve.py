"""A server's before and after, side by side: two `lstmlm serve` processes, one running the
code of another tree (`--before`: a checkout or `git worktree add` of the older commit) and one
this tree's, and the same load sent to each in turn, round after round.

    python benchmarks/ab_serve.py --before ../old --runs-dir RUNS --run d2l --clients 1 --length 20000 --rounds 8

On a host whose speed drifts by a quarter over minutes, two runs of bench_generate.py one after
the other compare the host's moods as much as the code; here both servers are up at once and
the rounds interleave (before, after, before, after), so a slow minute falls on both. It prints
each side's characters/s in all per round, their medians, the first character's p95 (median
over the rounds) and how many rounds the new code won.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_generate import machine, served, start_server

HERE = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="A tree of the older code (its lstmlm/ package inside).")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--run", required=True)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--length", type=int, default=2000, help="Characters each client asks for.")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not (args.before / "lstmlm" / "__init__.py").is_file():
        raise SystemExit(f"{args.before} holds no lstmlm package")

    print(machine())
    options = argparse.Namespace(length=args.length, max_batch=64, queue=256, threads=1, lanes=None, precision="fp32")
    servers = {side: start_server(args.runs_dir, options, tree) for side, tree in (("before", args.before), ("after", HERE))}
    try:
        rates: dict[str, list[float]] = {side: [] for side in servers}
        p95s: dict[str, list[float]] = {side: [] for side in servers}
        for _, url in servers.values():
            served(url, args.run, min(args.clients, 8), 200)  # warm up: the model loaded, the threads made
        for _ in range(args.rounds):
            for side, (_, url) in servers.items():
                rate, firsts, refused = served(url, args.run, args.clients, args.length)
                firsts.sort()
                rates[side].append(rate)
                p95s[side].append(firsts[max(0, round(0.95 * len(firsts)) - 1)] if firsts else float("nan"))
                if refused:
                    print(f"{side}: {refused} refused")
        for side in servers:
            each = ", ".join(f"{rate:,.0f}" for rate in rates[side])
            print(f"{side:<6} {args.clients} clients x {args.length}: {statistics.median(rates[side]):,.0f} characters/s ({each}); "
                  f"first character p95 {statistics.median(p95s[side]) * 1e3:,.0f} ms")  # fmt: skip
        won = sum(after > before for before, after in zip(rates["before"], rates["after"]))
        print(f"after / before {statistics.median(rates['after']) / statistics.median(rates['before']):.2f}; rounds the after side won: {won} of {args.rounds}")
    finally:
        for proc, _ in servers.values():
            proc.terminate()


if __name__ == "__main__":
    main()
