"""What this machine does: the matrix-product ceiling, training tokens/s, generation characters/s.

The functions behind `lstmlm bench` return plain dataclasses and print nothing (the CLI renders).

FLOPs per token, the yardstick of `utilisation`, are counted from the cells (`sizes.py`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import get_args

import torch

from . import cells, distributed, graphs, native, recurrence
from .config import Config, Core
from .config_file import load as load_config
from .device import DTYPES, PRECISIONS, cpu_has_fast_bf16, cpu_name, describe, keep_freed_memory, resolve_device, resolve_precision, set_tf32, synchronize
from .distributed import World
from .errors import ConfigError, DeviceError
from .generate import Sampling, generate
from .model import CharLM, check_memory
from .recurrence import times_T
from .sizes import Dims as Dims
from .sizes import forward_flops_per_token as forward_flops_per_token
from .sizes import training_flops_per_token
from .step import timed_steps
from .vocab import Vocab

# ---- the ceiling -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ceiling:
    device: str
    precision: str  # fp32 | bf16
    size: int  # n of the n×n by n×n product timed
    gflops: float  # the best of the repeats, 1e9 FLOP/s


def measure_matmul_ceiling(device: torch.device | str, precision: str = "fp32", max_size: int = 2048, min_seconds: float = 0.5) -> Ceiling:
    """GFLOP/s of a large square matrix product, the best of repeats over `min_seconds`, by
    the product lstmlm's fast path takes (fused.times_T: on a CPU in fp32 oneDNN's, which on AMD
    CPUs runs at twice MKL's rate, torch.mm's).

    The size grows from 256 until one product takes a tenth of a second or reaches `max_size`,
    so a precision the hardware emulates slowly (bf16 on a CPU without AVX512-BF16) is
    measured in seconds, not minutes."""
    device = torch.device(device)
    dtype = DTYPES[precision]
    size = 256
    while True:
        seconds = _time_matmul(size, dtype, device)
        if size >= max_size or seconds > 0.1:
            break
        size *= 2
    best, spent = seconds, seconds
    while spent < min_seconds:
        seconds = _time_matmul(size, dtype, device)
        best, spent = min(best, seconds), spent + seconds
    return Ceiling(str(device), precision, size, 2 * size**3 / best / 1e9)


def _time_matmul(size: int, dtype: torch.dtype, device: torch.device) -> float:
    A = torch.randn(size, size, device=device).to(dtype)
    B = torch.randn(size, size, device=device).to(dtype)
    times_T(A, B)  # warm up: kernels chosen, memory mapped
    synchronize(device)
    start = time.perf_counter()
    times_T(A, B)
    synchronize(device)
    return time.perf_counter() - start


# ---- training ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSpeed:
    core: str  # scratch | cudnn
    precision: str
    device: str
    tokens_per_s: float
    gflops: float  # tokens_per_s × training_flops_per_token
    utilisation: float | None  # gflops / the ceiling passed in, when one was
    flops_per_token: int
    peak_memory_bytes: int | None  # see `PeakMemory`
    steps: int
    seconds: float


def measure_training(
    core: str,
    dims: Dims,
    device: torch.device | str,
    precision: str = "fp32",
    steps: int = 20,
    warmup: int = graphs.WARMUP + 2,  # past a CUDA graph's eager steps and its recording
    ceiling: Ceiling | None = None,
    seed: int = 0,
    world: World = World(),
) -> TrainingSpeed:
    """Tokens/s of `steps` optimizer steps on random ids, as training runs them: d2l's SGD
    (lr 1) and clipping (θ = 1), the state carried from batch to batch and detached, the
    scratch core's step a CUDA graph on a GPU (`graphs`). Under torchrun (`world` active) every
    process trains its share of the batch's rows through DistributedDataParallel, and the
    figure is the whole batch's tokens/s."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = torch.device(device)
    check_precision(precision)
    if device.type == "cpu":
        keep_freed_memory()  # as a training does
    torch.manual_seed(seed)
    with PeakMemory(device) as memory:
        model = build_model(core, dims, device)
        seconds = timed_steps(dims.config(core), model, device, world, precision, steps, warmup)
    tokens_per_s = steps * dims.batch_size * dims.num_steps / seconds
    flops = training_flops_per_token(dims)
    gflops = tokens_per_s * flops / 1e9
    utilisation = gflops / ceiling.gflops if ceiling is not None else None
    return TrainingSpeed(core, precision, str(device), tokens_per_s, gflops, utilisation, flops, memory.peak, steps, seconds)


def build_model(core: str, dims: Dims, device: torch.device) -> CharLM:
    """An untrained model of `dims`'s shapes and cell, in its form, on `core`."""
    cell = cells.get(dims.cell, dims.form)
    return CharLM(dims.vocab_size, dims.hidden, dims.layers, core=core, embedding=dims.embedding, cell=cell, device=device).to(device)


def why_not_core(core: str, dims: Dims) -> str | None:
    """Why `core` cannot run `dims`'s cell, or None: the GRU's d2l form has no torch module."""
    cell = cells.get(dims.cell, dims.form)
    if core == "cudnn" and not cell.torch_equivalent:
        return f"the {cell.title} in its {cell.form} form has no torch module"
    return None


GENERATION_VOCAB = 1 + 0x110000 - 0x100  # <unk>, and a character from U+0100 on for each other symbol (measure_generation)


def why_not_generate(core: str, dims: Dims) -> str | None:
    """Why generation cannot be measured on `core` for `dims`, or None: its symbols are
    characters, and Unicode has too few for a vocabulary this large."""
    if dims.vocab_size > GENERATION_VOCAB:
        return f"generation decodes characters, and a vocabulary of {dims.vocab_size:,} has more symbols than the {GENERATION_VOCAB:,} it can use"
    return why_not_core(core, dims)


def check_precision(precision: str) -> None:
    if precision not in DTYPES:
        raise DeviceError(f"unknown precision '{precision}' (expected fp32 or bf16)")


# ---- generation --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSpeed:
    core: str
    precision: str
    device: str
    chars_per_s: float  # all samples' characters together
    length: int  # characters generated per sample in the timed run
    samples: int  # continuations made at once, as one batch
    peak_memory_bytes: int | None


def measure_generation(
    core: str,
    dims: Dims,
    device: torch.device | str,
    precision: str = "fp32",
    length: int = 500,
    prefix: int = 10,
    warmup: int = 20,
    seed: int = 0,
    samples: int = 1,
) -> GenerationSpeed:
    """Characters/s of generation — the path `lstmlm generate` takes, on an untrained model of
    the given shape: the state primed on a `prefix`-character prefix, then one inference step
    (generate.Stepper), the next character chosen and decoded, per character. One sample is
    greedy (d2l's predict); several are sampled at temperature 1, as one batch, and counted
    together (`lstmlm generate --num-samples N`)."""
    device = torch.device(device)
    check_precision(precision)
    torch.manual_seed(seed)
    vocab = Vocab(["<unk>"] + [chr(0x100 + i) for i in range(dims.vocab_size - 1)])  # any distinct characters
    with PeakMemory(device) as memory:
        model = build_model(core, dims, device).eval()
        text = "".join(vocab.tokens[1 + i % (dims.vocab_size - 1)] for i in range(prefix))

        def run(n: int) -> None:
            sampling = Sampling(length=n, num_samples=samples, temperature=0.0 if samples == 1 else 1.0, seed=seed)
            for _ in generate(model, vocab, text, sampling, precision=precision):
                pass

        run(warmup)
        start = time.perf_counter()
        run(length)
        seconds = time.perf_counter() - start
    return GenerationSpeed(core, precision, str(device), samples * length / seconds, length, samples, memory.peak)


# ---- the machine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What decides the figures: the processor and its matrix units, torch's threads, what `auto` picks."""

    cpu: str
    cores: int | None
    torch_threads: int
    cpu_capability: str  # torch's vectorization level: DEFAULT, AVX2, AVX512
    native_bf16: bool  # AVX512-BF16 or AMX: bf16 products in hardware
    gpu: str | None
    torch: str
    auto_precision: str  # what --precision auto picks on the device measured
    tf32: bool = False  # fp32 products in TF32 on the GPU measured (cuBLAS and cuDNN), as set for the measurement
    recurrence: str = ""  # the scratch core's recurrence on a CPU: compiled (native.py), or the Python loop and why


def machine(device: torch.device, dims: Dims = Dims(28)) -> Machine:
    """The machine, and how the scratch core of `dims`'s cell (default: the d2l LSTM) runs here."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    tf32 = device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    return Machine(cpu_name(), os.cpu_count(), torch.get_num_threads(), torch.backends.cpu.get_cpu_capability(), cpu_has_fast_bf16(),
                   gpu, torch.__version__, resolve_precision("auto", device), tf32, scratch_recurrence(dims, device))  # fmt: skip


def scratch_recurrence(dims: Dims, device: torch.device) -> str:
    """How the scratch core of `dims`'s cell runs its recurrence: the compiled recurrence's status
    where the cell has a kernel; else the path it takes instead, and why (the GRU's d2l form runs
    its loop, whether or not the compiled recurrence builds here)."""
    cell = cells.get(dims.cell, dims.form)
    if cell.kernel is not None:
        return native.status()
    choice = recurrence.choose(cell, "auto", device)
    return f"{recurrence.describe(choice)}: {recurrence.why_not(cell, 'compiled', device)}"


# ---- memory ------------------------------------------------------------------------------------


class PeakMemory:
    """The peak memory of a block, in bytes (`peak`, None where it cannot be measured).

    CUDA: the allocator's peak of tensor memory. CPU: the peak resident size of the process
    above its size when the block began, sampled every 5 ms from /proc/self/statm (torch
    allocates outside what Python's tracemalloc sees). MPS: the driver's allocation at the end.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.device.type == "cpu" and _rss_bytes() is not None:
            self._baseline = self._max = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.device.type == "mps":
            self.peak = torch.mps.driver_allocated_memory()
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(0, max(self._max, _rss_bytes() or 0) - self._baseline)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss_bytes() or 0)


def _rss_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return None


# ---- `lstmlm bench`: every measurement, as rows ------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One measurement: `value` in `unit` (GFLOP/s, tokens/s, chars/s), or `skipped` with the reason."""

    measure: str  # "matmul 2048×2048", "train scratch", "generate cudnn", "train cudnn ×2 processes"
    precision: str
    value: float | None
    unit: str
    of_ceiling: float | None = None  # the figure as a fraction of the matching product ceiling
    memory: int | None = None  # peak bytes
    scaling: float | None = None  # all processes' tokens/s over one process's
    skipped: str | None = None
    raw: dict[str, object] | None = None  # the measurement's dataclass, for --json


@dataclass(frozen=True)
class Report:
    device: str
    machine: Machine
    dims: Dims
    flops_per_token: int
    rows: list[Row]
    is_main: bool  # under torchrun only the main process reports


def run(config_file: str | None = None, device: str = "auto", precision: str = "fp32", steps: int = 20, vocab_size: int = 28, tf32: bool = False) -> Report:
    """What `lstmlm bench` measures: the product ceiling, both cores' training and generation,
    for the model and batch shapes of `config_file` (default: the d2l model); `precision` is
    fp32, bf16, auto or "both"; `tf32` decided explicitly, as training does (cuDNN's own default
    would let nn.LSTM use TF32 while the scratch core's products stay fp32). Under torchrun the
    main process measures alone first, then all processes train together and their speed is
    compared with its."""
    if vocab_size >= 2**63:  # torch's sizes are 64-bit
        raise ConfigError(f"--vocab-size is too large: {vocab_size}")
    cfg = load_config(config_file) if config_file else Config()
    dims = Dims.from_config(cfg, vocab_size)
    world = distributed.from_environment()
    dev = distributed.start(world, resolve_device(device), dims.batch_size)
    check_memory(cfg, vocab_size, dev, "lower --vocab-size, or the config's sizes")
    set_tf32(dev, tf32)
    precisions = list(PRECISIONS) if precision == "both" else [resolve_precision(precision, dev)]
    rows: list[Row] = []
    try:
        if world.is_main:
            rows = measure_one_process(dims, dev, precisions, steps)
        distributed.barrier(world)  # the others wait: one process measures alone first
        if world.active:
            rows += measure_scaling(dims, dev, precisions, steps, world, rows)
    finally:
        distributed.stop(world)
    return Report(describe(dev), machine(dev, dims), dims, training_flops_per_token(dims), rows, world.is_main)


CORES: tuple[str, ...] = get_args(Core)  # each measured: the scratch core and torch's
GENERATION_SAMPLES = (1, 64)  # one greedy continuation; 64 sampled at once


def measure_one_process(dims: Dims, device: torch.device, precisions: list[str], steps: int) -> list[Row]:
    rows: list[Row] = []
    for prec in precisions:
        ceiling = measure_matmul_ceiling(device, prec)
        rows.append(Row(f"matmul {ceiling.size}×{ceiling.size}", prec, ceiling.gflops, "GFLOP/s", 1.0, raw=asdict(ceiling)))
        for core in CORES:
            if why := why_not_core(core, dims):
                rows.append(Row(f"train {core}", prec, None, "tokens/s", skipped=why))
                continue
            try:
                speed = measure_training(core, dims, device, prec, steps=steps, ceiling=ceiling)
            except DeviceError as e:
                rows.append(Row(f"train {core}", prec, None, "tokens/s", skipped=str(e)))
                continue
            rows.append(Row(f"train {core}", prec, speed.tokens_per_s, "tokens/s", speed.utilisation, speed.peak_memory_bytes, raw=asdict(speed)))
        for core in CORES:
            for samples in GENERATION_SAMPLES:
                what = f"generate {core}" + (f" ×{samples}" if samples > 1 else "")
                if why := why_not_generate(core, dims):
                    rows.append(Row(what, prec, None, "chars/s", skipped=why))
                    continue
                gen = measure_generation(core, dims, device, prec, samples=samples)
                rows.append(Row(what, prec, gen.chars_per_s, "chars/s", memory=gen.peak_memory_bytes, raw=asdict(gen)))
    return rows


def measure_scaling(dims: Dims, device: torch.device, precisions: list[str], steps: int, world: World, single: list[Row]) -> list[Row]:
    """Training tokens/s of all processes together, and its ratio to one process's (on the main process)."""
    rows = []
    for prec in precisions:
        for core in CORES:
            if why_not_core(core, dims):  # skipped alone, with the reason: skipped together too
                continue
            speed = measure_training(core, dims, device, prec, steps=steps, world=world)  # every process takes part
            alone = next((r.value for r in single if r.measure == f"train {core}" and r.precision == prec and r.value), None)
            if alone is None:  # on the other processes, which report nothing
                continue
            scaling = speed.tokens_per_s / alone
            raw = {**asdict(speed), "processes": world.size, "scaling": scaling}
            rows.append(Row(f"train {core} ×{world.size} processes", prec, speed.tokens_per_s, "tokens/s",
                            memory=speed.peak_memory_bytes, scaling=scaling, raw=raw))  # fmt: skip
    return rows
