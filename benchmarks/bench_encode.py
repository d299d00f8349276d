"""How fast Vocab.build and Vocab.encode are on a ~100 MB corpus, and how much memory they take.

    python benchmarks/bench_encode.py [--mb 100] [--runs 3]

The corpus is mobydick.txt from $LSTMLM_TEST_DATA repeated (UTF-8 with curly quotes and dashes),
or, without it, a synthetic text mixing ASCII, accents, CJK and emoji. Speeds are the median of
`--runs` runs, in MB of UTF-8 per second; memory is the peak resident size above the size before
each step, sampled from /proc/self/statm (torch allocates outside tracemalloc's view).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lstmlm.vocab import Vocab

SYNTHETIC_LINE = "The Time Traveller — “naïve” café, 时间机器, 時間旅行者, 시간 여행자, 😀🎉𝄞 done.\n"
PAGE = os.sysconf("SC_PAGE_SIZE")


def corpus_text(megabytes: int) -> tuple[str, str]:
    """(the text, where it came from), about `megabytes` MB of UTF-8."""
    data = os.environ.get("LSTMLM_TEST_DATA")
    source = Path(data) / "mobydick.txt" if data else None
    if source is not None and source.is_file():
        unit, origin = source.read_text(encoding="utf-8"), f"{source} repeated"
    else:
        unit, origin = SYNTHETIC_LINE * 10_000, "synthetic mixed-Unicode text"
    copies = max(1, round(megabytes * 1e6 / len(unit.encode("utf-8"))))
    return unit * copies, origin


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """The largest resident size seen while the block runs, sampled every few milliseconds."""

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = rss_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.baseline) / 1e6


def measure(step: Callable[[], Any], runs: int) -> tuple[float, float, Any]:
    """(median seconds, peak extra MB over all runs, the last result)."""
    seconds: list[float] = []
    extra: list[float] = []
    result = None
    for _ in range(runs):
        result = None  # let the previous result go before the next run is measured
        with PeakRss() as peak:
            start = time.perf_counter()
            result = step()
            seconds.append(time.perf_counter() - start)
        extra.append(peak.extra_mb)
    return statistics.median(seconds), max(extra), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="corpus size in MB of UTF-8")
    parser.add_argument("--runs", type=int, default=3, help="runs per step (the median is reported)")
    args = parser.parse_args()

    text, origin = corpus_text(args.mb)
    megabytes = len(text.encode("utf-8")) / 1e6
    print(f"corpus: {origin}: {megabytes:,.1f} MB UTF-8, {len(text):,} characters")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")

    build_s, build_mb, vocab = measure(lambda: Vocab.build(text), args.runs)
    print(f"Vocab.build:  {build_s:6.2f} s  {megabytes / build_s:7.1f} MB/s  peak +{build_mb:,.0f} MB  ({len(vocab)} tokens)")
    encode_s, encode_mb, ids = measure(lambda: vocab.encode(text), args.runs)
    ids_mb = ids.numel() * ids.element_size() / 1e6
    print(f"Vocab.encode: {encode_s:6.2f} s  {megabytes / encode_s:7.1f} MB/s  peak +{encode_mb:,.0f} MB  (ids {ids_mb:,.0f} MB)")
    print(f"process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:,.0f} MB")


if __name__ == "__main__":
    main()
