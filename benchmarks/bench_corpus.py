"""Real-size corpora on this machine: encoding time and memory, the first optimizer step of a
second run, training speed and memory, per-batch data time, and the disk the store takes — at
several corpus sizes, on a quiet machine (figures taken while other work runs are wrong).

    python benchmarks/bench_corpus.py --source linux --sizes 10M,1G,10G
    python benchmarks/bench_corpus.py --source text --sizes 10M,100M --minutes 0.5

Corpora are made in a temporary directory (`--work`, default the system's) and deleted at the
end (`--keep` keeps them):

    linux   Debian's linux-source-6.1 (`apt-get download`), its .c and .h files: 1G is the tree
            itself, read as a glob ('linux/**/*.[ch]', ~1.18 GB, 55,000 files); smaller sizes the
            first files of it concatenated; larger ones the concatenation repeated
    text    a real text repeated ($LSTMLM_TEST_DATA/mobydick.txt, else tinyshakespeare there)

For each size, in fresh processes with a fresh cache ($LSTMLM_HOME in the work directory):

    encode      the library path `lstmlm train` takes to its data (`prepare_data`): wall time
    train       `lstmlm train` again, the store now cached: time from the process's start to its
                first optimizer step, then training for --minutes; tokens/s and a sample
    data        the median time to gather one batch from the store, sequential and random, over
                200 consecutive batches from somewhere in an epoch with a training step's work
                (as long as the train phase's steps) between them, as training walks them; and the random
                iterator's shuffle, once an epoch
    store       the store file's size against the corpus's

Memory is sampled every 20 ms from /proc/PID/status of the process and its children (the
encoding workers): RssAnon (memory the processes own) and RssFile (file pages mapped — the
store's pages, clean and dropped by the kernel when memory is short), each the peak of the
sum over the process tree; and ru_maxrss of the largest process (`resource.getrusage`),
which counts both.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lstmlm.data.cache import RACY_NS

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"k": 10**3, "M": 10**6, "G": 10**9}

# the first optimizer step, stamped on stderr; then the CLI as a user runs it
FIRST_STEP_DRIVER = r"""
import sys, time
import lstmlm.step as step_mod
real_step = step_mod.train_step
stamped = []

def step(*args, **kwargs):
    result = real_step(*args, **kwargs)
    if not stamped:
        stamped.append(time.time())
        print(f"FIRST-STEP {stamped[0]:.3f}", file=sys.stderr, flush=True)
    return result

step_mod.train_step = step
from lstmlm.cli import app
app(sys.argv[1:], prog_name="lstmlm")
"""

ENCODE_CHILD = r"""
import json, sys, time
start = time.perf_counter()
from lstmlm.config import Config
from lstmlm.data.pipeline import prepare_data
imported = time.perf_counter()
cfg = Config().with_overrides({"corpus": sys.argv[1], "normalize": sys.argv[2]}).resolved()
data = prepare_data(cfg)
done = time.perf_counter()
print(json.dumps({"encode_s": done - imported, "tokens": len(data.train) + len(data.val) + len(data.test),
                  "vocab": len(data.vocab), "dtype": str(data.train.dtype), "skipped": len(data.skipped)}))
"""

DATA_CHILD = r"""
import json, random, statistics, sys, time
from lstmlm.config import Config
from lstmlm.data.batches import BatchSource
from lstmlm.data.pipeline import prepare_data
cfg = Config().with_overrides({"corpus": sys.argv[1], "normalize": sys.argv[2]}).resolved()
data = prepare_data(cfg)
import torch
pause = float(sys.argv[5])  # a training step's time: what the next batch's read-ahead has
work = torch.randn(256, 256)

def train_for(seconds):  # stands for a training step: the cores busy with products, as between batches
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work @ work

out = {}
for iterator in ("sequential", "random"):
    source = BatchSource(data.train, int(sys.argv[3]), int(sys.argv[4]), iterator)
    start = time.perf_counter()
    epoch = source.epoch(random.Random(0))
    out[f"{iterator}_epoch_setup_s"] = time.perf_counter() - start
    epoch.skip = random.Random(1).randrange(max(1, len(epoch) - 300))
    batches, times = iter(epoch), []
    for _ in range(200):  # consecutive batches from somewhere in the epoch, as training walks them
        start = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - start)
        train_for(pause)
    out[f"{iterator}_batch_us"] = statistics.median(times) * 1e6
print(json.dumps(out))
"""


# ---- measuring a process tree -------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return fields


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        p = queue.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                queue += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


@dataclass
class Measured:
    seconds: float
    stdout: str
    stderr: str
    peak_anon: int
    peak_file: int
    maxrss: int  # the largest process's, from getrusage(RUSAGE_CHILDREN)
    marks: dict[str, float] = field(default_factory=dict)  # stderr lines "NAME <unix time>" → seconds from start


def measure(argv: list[str], env: dict[str, str], timeout: float) -> Measured:
    """Run `argv`, sampling its process tree's memory; fail loudly on a non-zero exit."""
    start_wall, start = time.time(), time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = {"anon": 0, "file": 0}
    done = threading.Event()
    streams: dict[str, str] = {}

    def sample() -> None:
        while not done.wait(0.02):
            stats = [_status(p) for p in _tree(proc.pid)]
            peak["anon"] = max(peak["anon"], sum(s.get("RssAnon", 0) for s in stats))
            peak["file"] = max(peak["file"], sum(s.get("RssFile", 0) + s.get("RssShmem", 0) for s in stats))

    def read(name: str, stream: Any) -> None:
        streams[name] = stream.read()

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read, args=("out", proc.stdout), daemon=True),
               threading.Thread(target=read, args=("err", proc.stderr), daemon=True)]  # fmt: skip
    for t in threads:
        t.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss of it or its largest descendant
    killer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    stdout, stderr = streams.get("out", ""), streams.get("err", "")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    marks = {}
    for line in stderr.splitlines():
        name, _, value = line.partition(" ")
        if name.isupper() and value.replace(".", "", 1).isdigit():
            marks[name] = float(value) - start_wall
    return Measured(seconds, stdout, stderr, peak["anon"], peak["file"], usage.ru_maxrss * 1024, marks)


# ---- making corpora ----------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    return int(float(text[:-1]) * SIZES[text[-1]]) if text[-1] in SIZES else int(text)


def linux_tree(work: Path) -> Path:
    """Debian's linux-source-6.1, its .c and .h files only, unpacked under work/linux."""
    tree = work / "linux"
    if tree.is_dir():
        return tree
    subprocess.run(["apt-get", "download", "linux-source-6.1"], cwd=work, check=True)
    deb = next(work.glob("linux-source-6.1_*.deb"))
    tarball = "./usr/src/linux-source-6.1.tar.xz"
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE) as fs:
        subprocess.run(["tar", "-x", "-C", str(work), tarball], stdin=fs.stdout, check=True)
    tree.mkdir()
    subprocess.run(["tar", "-xJf", str(work / tarball), "-C", str(tree), "--wildcards", "*.c", "*.h"], check=True)
    deb.unlink()
    (work / tarball).unlink()
    return tree


def sorted_files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file() and p.suffix in (".c", ".h"))


def concatenated(files: list[Path], size: int, out: Path) -> Path:
    """The files one after the other, repeated as needed, cut to `size` bytes at a line end."""
    written = 0
    with open(out, "wb") as f:
        while written < size:
            for path in files:
                data = path.read_bytes()
                if written + len(data) >= size:  # the last one: up to its last line end that fits
                    f.write(data[: data.rfind(b"\n", 0, size - written) + 1])
                    return out
                f.write(data)
                written += len(data)
    return out


def make_corpus(source: str, size: int, work: Path) -> tuple[str, int]:
    """(the corpus argument for --corpus, its size in bytes)."""
    if source == "linux":
        tree = linux_tree(work)
        files = sorted_files(tree)
        total = sum(p.stat().st_size for p in files)
        if abs(size - total) < 0.25 * total:  # "1G": the tree itself, read as a glob
            return f"{tree}/**/*.[ch]", total
        path = concatenated(files, size, work / f"linux-{size}.txt")
        return str(path), path.stat().st_size
    data = os.environ.get("LSTMLM_TEST_DATA", str(ROOT.parent / "shared" / "data"))
    unit = next(p for p in (Path(data) / "mobydick.txt", Path(data) / "tinyshakespeare.txt") if p.is_file())
    path = concatenated([unit], size, work / f"text-{size}.txt")
    return str(path), path.stat().st_size


# ---- the measurements -------------------------------------------------------------------------------


def settle(corpus: str) -> None:
    """Wait until the corpus's newest file is older than the cache's racy window: the index that
    lets a second run skip reading the text is not written for a file changed within it (a
    later change could keep its timestamp), so a corpus encoded the moment it is made is read
    again by the second run. A user's corpus is older than that."""
    files = glob.glob(corpus, recursive=True) if any(c in corpus for c in "*?[") else [corpus]
    newest = max(os.stat(f).st_mtime_ns for f in files)
    wait = (newest + RACY_NS - time.time_ns()) / 1e9
    if wait > 0:
        time.sleep(wait + 0.1)


def bench_size(label: str, corpus: str, nbytes: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    home = work / f"home-{label}"
    env = {**os.environ, "LSTMLM_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    settle(corpus)
    py = sys.executable
    row: dict[str, Any] = {"size": label, "corpus_bytes": nbytes}

    encoded = measure([py, "-c", ENCODE_CHILD, corpus, args.normalize], env, args.timeout)
    info = json.loads(encoded.stdout.strip().splitlines()[-1])
    row.update(info, encode_wall_s=encoded.seconds, encode_anon=encoded.peak_anon, encode_file=encoded.peak_file, encode_maxrss=encoded.maxrss)
    row["store_bytes"] = sum(p.stat().st_size for p in (home / "encoded").glob("*.tokens"))

    train = [py, "-c", FIRST_STEP_DRIVER, "train", "--corpus", corpus, "--normalize", args.normalize, "--runs-dir", str(work / "runs"),
             "--run", f"bench-{label}", "--max-minutes", str(args.minutes), "--json", *args.train_args.split()]  # fmt: skip
    trained = measure(train, env, args.timeout + args.minutes * 120)
    done = json.loads([line for line in trained.stdout.splitlines() if line.startswith("{")][-1])
    row.update(
        first_step_s=trained.marks.get("FIRST-STEP"),
        train_anon=trained.peak_anon,
        train_file=trained.peak_file,
        train_maxrss=trained.maxrss,
        tokens_per_s=done["tokens_per_s"],
        val_perplexity=done["val_perplexity"],
        sample=next(iter(done["samples"].values()), ""),
    )
    batch, steps = (int(x) for x in args.batch.split("x"))
    step_s = batch * steps / done["tokens_per_s"]  # a training step of the run above
    timed = measure([py, "-c", DATA_CHILD, corpus, args.normalize, str(batch), str(steps), f"{step_s:.4f}"], env, args.timeout)
    row.update(json.loads(timed.stdout.strip().splitlines()[-1]))
    return row


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f} MB"


def report(rows: list[dict[str, Any]]) -> None:
    print()
    print(f"{'size':>6} {'corpus':>10} {'encode':>8} {'enc anon':>9} {'enc file':>9} {'store':>10} {'1st step':>9} "
          f"{'train anon':>10} {'train file':>10} {'maxrss':>8} {'tok/s':>8} {'seq µs':>7} {'rand µs':>7} {'shuffle':>8}")  # fmt: skip
    for r in rows:
        print(f"{r['size']:>6} {mb(r['corpus_bytes']):>10} {r['encode_s']:>7.1f}s {mb(r['encode_anon']):>9} {mb(r['encode_file']):>9} "
              f"{mb(r['store_bytes']):>10} {r['first_step_s'] or float('nan'):>8.1f}s {mb(r['train_anon']):>10} {mb(r['train_file']):>10} "
              f"{mb(max(r['encode_maxrss'], r['train_maxrss'])):>8} {r['tokens_per_s']:>8,.0f} {r['sequential_batch_us']:>7.0f} "
              f"{r['random_batch_us']:>7.0f} {r['random_epoch_setup_s']:>7.1f}s")  # fmt: skip
    print()
    for r in rows:
        print(f"{r['size']}: {r['tokens']:,} tokens, vocabulary {r['vocab']} ({r['dtype']}), {r['skipped']} files skipped; "
              f"validation perplexity {r['val_perplexity']}; sample: {r['sample']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("linux", "text"), default="text")
    parser.add_argument("--sizes", default="10M,100M", help="comma-separated: 10M, 1G, 10G (bytes, SI)")
    parser.add_argument("--normalize", default="raw", choices=("raw", "bytes"))
    parser.add_argument("--minutes", type=float, default=1.0, help="training per size (the second run)")
    parser.add_argument("--train-args", default="--model cudnn --hidden 512 --embedding 48 --num-steps 100 --optimizer adam --lr 0.008 --val-tokens 100000",
                        help="further options of the timed `lstmlm train`")  # fmt: skip
    parser.add_argument("--batch", default="32x100", help="batch size x steps for the data timing")
    parser.add_argument("--work", type=Path, default=None, help="where to make the corpora (needs ~2.2x the largest size free)")
    parser.add_argument("--keep", action="store_true", help="keep the corpora and stores")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lstmlm-bench-corpus-", dir=args.work))
    print(f"work directory {work}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    rows = []
    try:
        for label in args.sizes.split(","):
            corpus, nbytes = make_corpus(args.source, parse_size(label), work)
            print(f"{label}: {corpus} ({nbytes:,} bytes)", flush=True)
            rows.append(bench_size(label, corpus, nbytes, args, work))
            for made in (work / "runs", *work.glob("home-*")):  # the next size starts from a fresh cache
                shutil.rmtree(made, ignore_errors=True)
            for made in work.glob("*.txt"):
                made.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(rows)


if __name__ == "__main__":
    main()
