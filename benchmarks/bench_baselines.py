"""What the baselines cost (lstmlm/baselines.py): the time to count a training text's unigrams and
bigrams from its memory-mapped store and score the validation sample, and the memory that takes
beyond the store. Issue 28's target: the 1.2 GB Linux kernel tree (362 symbols) in ≤ 30 s on
2 cores and ≤ 300 MB beyond the store — on a quiet machine (figures taken while other work runs
are slower than the code is).

    python benchmarks/bench_baselines.py                          # 200M synthetic tokens, 362 symbols
    python benchmarks/bench_baselines.py --tokens 1.2G --vocab 362
    python benchmarks/bench_baselines.py --corpus 'linux/**/*.[ch]'   # a real corpus, encoded first

The synthetic store is written in a temporary directory (`--work`) as a raw file of ids in the
store's dtype and memory-mapped as training maps its store; its symbols follow a Zipf law with
sticky runs, so that most of the V² pairs occur, as in source code. A real corpus goes through
`prepare_data` (its encoding, which is not timed, uses a fresh cache in the work directory);
Debian's kernel source is `apt-get download linux-source-6.1`, its .c and .h files unpacked.

Memory is sampled every 5 ms from /proc/self/status: RssAnon, the memory the process owns (the
figure "beyond the store"), and RssFile, the store's pages mapped (clean: the kernel drops them
when memory is short); each reported as its peak above where it stood before.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    number, unit = (text[:-1], text[-1]) if text[-1] in SIZES else (text, "")
    return int(float(number) * SIZES[unit])


def status(field: str) -> int:
    """A /proc/self/status field in bytes (kB there)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The peaks of RssAnon and RssFile above their values when the block began."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self._stop = threading.Event()

    def __enter__(self) -> Peak:
        self.base_anon, self.base_file = status("RssAnon"), status("RssFile")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.anon = max(self.anon, status("RssAnon") - self.base_anon)
            self.file = max(self.file, status("RssFile") - self.base_file)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def machine() -> dict[str, Any]:
    with open("/proc/cpuinfo") as f:
        info = f.read()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return {
        "cpu": model,
        "cores": len(os.sched_getaffinity(0)),
        "avx512_bf16": "avx512_bf16" in info,
        "load_average_1m": os.getloadavg()[0],
        "numpy": np.__version__,
    }


def synthetic_store(work: Path, tokens: int, vocab: int, seed: int = 0) -> np.ndarray:
    """`tokens` ids over `vocab` symbols in a raw file, memory-mapped: Zipf-distributed symbols,
    each repeated with probability 0.3 (runs, as of spaces and tabs)."""
    dtype = np.uint8 if vocab <= 256 else np.uint16
    path = work / "store.ids"
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, vocab + 1)
    cdf = np.cumsum(weights / weights.sum())
    with open(path, "wb") as f:
        for start in range(0, tokens, 1 << 24):
            n = min(1 << 24, tokens - start)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n)), vocab - 1).astype(dtype)
            repeat = rng.random(n) < 0.3
            repeat[0] = False
            ids[repeat] = ids[np.flatnonzero(repeat) - 1]  # one step of stickiness, vectorized
            f.write(ids.tobytes())
    return np.memmap(path, dtype=dtype, mode="r")


def corpus_store(work: Path, corpus: str) -> tuple[Any, Any, int]:
    """A real corpus as training reads it: (train ids, validation ids, vocabulary size)."""
    os.environ["LSTMLM_HOME"] = str(work / "home")
    from lstmlm.config import Config
    from lstmlm.data.pipeline import prepare_data

    data = prepare_data(Config().with_overrides({"corpus": corpus, "normalize": "raw"}).resolved(), scratch=work)
    return data.train, data.val, len(data.vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="200M", help="synthetic store's size (k, M, G)")
    parser.add_argument("--vocab", type=int, default=362, help="synthetic store's symbols (the kernel tree has 362)")
    parser.add_argument("--corpus", help="a real corpus instead (a file, directory or glob)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="synthetic: the tail held out for validation")
    parser.add_argument("--workers", type=int, default=None, help="counting threads (default: the library's)")
    parser.add_argument("--work", type=Path, default=None, help="where the store goes (default: a temporary directory)")
    args = parser.parse_args()

    from lstmlm import baselines, evaluation  # noqa: F401 (torch, which training has loaded by then: not timed)

    if args.workers is not None:
        baselines.WORKERS = args.workers
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        made = time.perf_counter()
        if args.corpus:
            train, val, vocab = corpus_store(work, args.corpus)
        else:
            ids = synthetic_store(work, parse_size(args.tokens), args.vocab)
            cut = int(len(ids) * (1 - args.val_fraction))
            train, val, vocab = ids[:cut], ids[cut:], args.vocab
        made = time.perf_counter() - made
        run = work / "run"
        run.mkdir()
        with Peak() as peak:  # what training pays at its start: count, keep the counts, score, keep the figures
            start = time.perf_counter()
            figures = baselines.for_training(run, train, val, vocab, "character", 32, 35, 250_000)
            seconds = time.perf_counter() - start
        counts = baselines.load_counts(run)
        store_bytes = baselines.as_array(train).nbytes
    print(json.dumps({
        "corpus": args.corpus or f"synthetic, {args.vocab} symbols", "train_tokens": len(train), "val_tokens": len(val), "vocab": vocab,
        "store_mb": round(store_bytes / 1e6, 1), "prepare_s": round(made, 1),
        "baselines_s": round(seconds, 2), "tokens_per_s": round(len(train) / seconds),
        "peak_anon_mb": round(peak.anon / 1e6, 1), "peak_file_mb": round(peak.file / 1e6, 1),
        "bits": {"uniform": round(figures.uniform, 3), "unigram": round(figures.unigram, 3), "bigram": round(figures.bigram, 3)},
        "distinct_pairs": len(counts.pairs) if counts is not None else None,
        "workers": baselines.WORKERS,
        "machine": machine(),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
