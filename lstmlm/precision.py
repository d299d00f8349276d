"""`--precision auto` for a training: fp32 or bf16, whichever trains the model to be trained
faster here, timed on this machine before the run is made (`choose`).

bf16 rounds each product's inputs to 8 bits of mantissa, so it is taken only where it pays:
at least MARGIN times fp32's speed. Where bf16 is emulated (a CPU without AVX512-BF16 or AMX)
it is many times slower, which timing one of the model's products tells in milliseconds
(`product_ratio`), before a step in bf16 could take seconds; where the matrix units multiply
it natively it wins once the products are large enough to outweigh each step's casts.

A choice timed is remembered for the machine and the model's shape (`remembered`): the same
command trains in the same precision the next time, bit for bit, whatever the load then.

Not timed, and why:
    a small model    its recurrent product under SMALLEST FLOPs (narrower than 64 units at batch
                     32) takes microseconds, mostly a call's cost, which bf16 does not cut: fp32
    d2l mode         the seed's text reproduces the book, which trains in fp32
    mps              has no bf16 (`device.resolve_precision`)
    a CUDA GPU       without bf16 (before Ampere): fp32
    under torchrun   every process must train in the same precision, and the process group
                     that could agree on one starts later: the hardware's rule
                     (`device.resolve_precision("auto")`) instead, and once the group has
                     started every process takes rank 0's (`training.start`), as machines differ
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from . import cells
from .atomic import write_text_atomic
from .config import Config
from .data.home import cache_dir
from .device import PRECISIONS, cpu_has_fast_bf16, cpu_name, resolve_precision, synchronize
from .distributed import World
from .errors import WriteError
from .model import CharLM
from .step import timed_steps

MARGIN = 1.1  # bf16 is taken from this many times fp32's speed: below it, the rounding is not worth it
WARMUP, MIN_STEPS, MAX_ROUND_STEPS, ROUND_S = 1, 2, 50, 0.1  # a round: fp32's steps in ROUND_S (2 to 50), after one untimed
REMEMBERED, MAX_REMEMBERED_BYTES = "precision.json", 1 << 20  # in the cache's root (data.home): the choices timed
MAX_STEPS = 20  # characters per sequence timed: a step's cost per character barely depends on it
PRODUCTS, PRODUCTS_S = 10, 0.05  # recurrent products timed per precision; bf16's stop past these seconds
SMALLEST = 1_000_000  # FLOPs of a recurrent product below which nothing is timed: microseconds, all of them a call's cost
HOPELESS = 0.5  # bf16's products at less than this times fp32's speed cannot make its steps faster: not timed


@dataclass(frozen=True)
class Choice:
    """The precision a training runs in, and why: what `--precision auto` timed, or the rule it kept."""

    precision: str  # "fp32" or "bf16"
    reason: str  # one clause, for the command line: "d2l mode trains as the book does, in fp32"
    tokens_per_s: dict[str, float] | None = None  # the timed speeds, by precision (None where not timed)


def choose(cfg: Config, vocab_size: int, device: torch.device, world: World | None = None) -> Choice:
    """fp32 or bf16 for training `cfg` (its model, its batches) on `device`: as asked, or for
    `auto` the faster where timed (see the module's docstring for where it is not)."""
    asked = cfg.train.precision
    if asked != "auto":
        return Choice(resolve_precision(asked, device), f"--precision {asked}")
    if cfg.data.normalize == "d2l":
        return Choice("fp32", "d2l mode trains as the book does, in fp32")
    if device.type == "mps":
        return Choice("fp32", "mps has no bf16")
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Choice("fp32", "this GPU has no bf16")
    if world is not None and world.active:
        native = device.type == "cuda" or cpu_has_fast_bf16()
        return Choice(resolve_precision("auto", device), f"under torchrun, by the hardware: bf16 {'native' if native else 'emulated'} here")
    flops = product_flops(cfg)
    if flops < SMALLEST:
        small = f"its recurrent product is {flops / 1e3:,.0f} kFLOP, microseconds that are mostly a call's cost"
        return Choice("fp32", f"too small a model for bf16 to pay: {small}")
    key = machine_key(cfg, vocab_size, device)
    known = remembered(key)
    if known is not None:
        return known
    choice = timed(cfg, vocab_size, device)
    remember(key, choice)
    return choice


def timed(cfg: Config, vocab_size: int, device: torch.device) -> Choice:
    """The products first, then, if bf16 may pay, the steps (`product_ratio`, `measure`)."""
    products = product_ratio(cfg, device)
    if products < HOPELESS:
        emulated = " (emulated on this CPU)" if device.type == "cpu" and not cpu_has_fast_bf16() else ""
        return Choice("fp32", f"timed here: bf16 multiplies this model's matrices at {products:.2g}× fp32's speed{emulated}")
    return decide(measure(cfg, vocab_size, device))


def product_flops(cfg: Config) -> int:
    """FLOPs of one recurrent product: a batch of H times the gates' weights (blocks·H columns)."""
    rows, hidden = cfg.data.batch_size, cfg.model.hidden
    return 2 * rows * hidden * cells.REGISTRY[cfg.model.cell].blocks * hidden


def decide(tokens_per_s: dict[str, float]) -> Choice:
    """bf16 where it trains at least MARGIN times as fast as fp32, else fp32; the reason names both speeds."""
    fp32, bf16 = tokens_per_s["fp32"], tokens_per_s["bf16"]
    ratio = bf16 / fp32
    speeds = f"{bf16:,.0f} against {fp32:,.0f} tokens/s"
    if ratio >= MARGIN:
        return Choice("bf16", f"timed here: bf16 trains this model {ratio:.2f}× as fast as fp32 ({speeds})", tokens_per_s)
    return Choice("fp32", f"timed here: bf16 would train this model at {ratio:.2f}× fp32's speed ({speeds}; it is taken from {MARGIN:g}×)", tokens_per_s)


def measure(cfg: Config, vocab_size: int, device: torch.device) -> dict[str, float]:
    """Training tokens/s of `cfg`'s model and batches (sequences cut to MAX_STEPS) in fp32 and in
    bf16, the best of two rounds each, taken in turn (fp32, bf16, fp32, bf16) so that a machine
    slowing or speeding up in between weighs on both alike. A round has as many steps as fp32
    takes ROUND_S to train, so that a small model's few milliseconds a step are not timed alone."""
    short = replace(cfg, data=replace(cfg.data, num_steps=min(cfg.data.num_steps, MAX_STEPS)))
    torch.manual_seed(0)
    model = CharLM.from_config(short.model, vocab_size, device=device).to(device)
    one = timed_steps(short, model, device, World(), "fp32", 1, WARMUP)
    steps = max(MIN_STEPS, min(MAX_ROUND_STEPS, math.ceil(ROUND_S / one)))
    tokens = steps * short.data.batch_size * short.data.num_steps
    best = {"fp32": 0.0, "bf16": 0.0}
    for _round in range(2):
        for precision in best:
            seconds = timed_steps(short, model, device, World(), precision, steps, WARMUP)
            best[precision] = max(best[precision], tokens / seconds)
    return best


# ---- remembered: one machine, one model shape, one choice ------------------------------------------


def machine_key(cfg: Config, vocab_size: int, device: torch.device) -> str:
    """What a timing depends on: the machine (its CPU or GPU, torch's build, the threads) and the
    model and batches timed."""
    m, d = cfg.model, cfg.data
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    machine = f"{device.type} {where} {torch.__version__} {torch.get_num_threads()} threads"
    model = f"{m.model} {m.cell} {m.gru_form} {m.layers}x{m.hidden} embedding {m.embedding} vocab {vocab_size} path {cfg.train.path}"
    return f"{machine} | {model} | batch {d.batch_size}x{min(d.num_steps, MAX_STEPS)}"


def remembered(key: str) -> Choice | None:
    """The choice timed before for `key` on this machine (in the cache's REMEMBERED file), or None:
    a second run of one command trains in the precision the first did, not in what a busier
    moment's timing might choose. A file that is not what this module writes is ignored."""
    entry = _read().get(key)
    if not isinstance(entry, dict) or entry.get("precision") not in PRECISIONS or not isinstance(entry.get("reason"), str):
        return None
    return Choice(entry["precision"], f"{entry['reason']} (remembered: {cache_dir() / REMEMBERED})")


def remember(key: str, choice: Choice) -> None:
    """Keep `choice` for `key`; a cache that cannot be written costs only the timing next time."""
    choices = _read()
    choices[key] = {"precision": choice.precision, "reason": choice.reason}
    with contextlib.suppress(WriteError, OSError):
        (cache_dir()).mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_dir() / REMEMBERED, json.dumps(choices, indent=1, sort_keys=True), "precision cache")


def _read() -> dict[str, object]:
    with contextlib.suppress(OSError, ValueError):
        path = cache_dir() / REMEMBERED
        if path.is_file() and path.stat().st_size <= MAX_REMEMBERED_BYTES:
            found = json.loads(path.read_text(encoding="utf-8"))
            return found if isinstance(found, dict) else {}
    return {}


def product_ratio(cfg: Config, device: torch.device) -> float:
    """bf16's speed over fp32's on the recurrence's product at this model's size (a batch of H
    times the gates' weights): the fastest of a few products each, bf16's cut short after
    PRODUCTS_S. Milliseconds, where a training step emulated in bf16 can take seconds."""
    rows, hidden = cfg.data.batch_size, cfg.model.hidden
    columns = product_flops(cfg) // (2 * rows * hidden)
    h, W = torch.randn(rows, hidden, device=device), torch.randn(hidden, columns, device=device)
    fp32 = fastest(lambda: h @ W, device)
    h, W = h.bfloat16(), W.bfloat16()
    return fp32 / fastest(lambda: h @ W, device, PRODUCTS_S)


def fastest(product: Callable[[], torch.Tensor], device: torch.device, budget_s: float = math.inf) -> float:
    """The fewest seconds one `product` took in PRODUCTS tries (the first warms up), or in those
    made before `budget_s` was spent, two at least."""
    best, spent = math.inf, 0.0
    for tries in range(1, PRODUCTS + 1):
        start = time.perf_counter()
        product()
        synchronize(device)
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s and tries >= 2:
            break
    return best
