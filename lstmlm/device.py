"""Device and precision, decided once at the top of a command.

bf16 means: matrix products in bfloat16 under `torch.autocast`, with the parameters, the cell
state, the loss and the optimizer kept in fp32. `auto` picks bf16 only where the hardware does
bf16 products natively (a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from .errors import DeviceError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # a resolved precision's dtype of the products
PRECISIONS = tuple(DTYPES)


def resolve_device(name: str) -> torch.device:
    """`auto`: cuda, then mps, then cpu. Asking for an absent device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA GPU is available here (use --device cpu or auto)")
    if name == "mps" and not _mps_available():
        raise DeviceError("--device mps: no Apple GPU is available here (use --device cpu or auto)")
    if name not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device '{name}' (expected auto, cpu, cuda or mps)")
    return torch.device(name)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC"), from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 products run natively, about 2-3× fp32."""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """`fp32` or `bf16` for this device; `auto` picks bf16 where it is fast."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if name == "bf16" and device.type == "mps":
        raise DeviceError("--precision bf16 is not supported on mps (use fp32)")
    if name not in PRECISIONS:
        raise DeviceError(f"unknown precision '{name}' (expected fp32, bf16 or auto)")
    return name


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`, or None where that cannot be told.

    CUDA: the driver's free memory. CPU (Linux): MemAvailable, or less where a cgroup (a
    container's limit, which its OOM killer enforces) leaves less; elsewhere the free pages."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    known = [n for n in (_meminfo_available(), _cgroup_headroom()) if n is not None]
    if not known:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return None
    return min(known)


def _meminfo_available() -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _cgroup_headroom() -> int | None:
    """A cgroup's memory limit less what it uses (v2, then v1); None without a limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # v1 writes "no limit" as a huge number
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
    return None


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[None]:
    """The context the forward pass and loss run in: bf16 products, or nothing changed."""
    if precision == "bf16":
        # no cast is made twice in a step, so autocast's cache of them saves nothing; and a
        # CUDA graph must not record casts that the cache would keep (torch's CUDA-graph notes)
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def set_tf32(device: torch.device, allowed: bool) -> bool:
    """Decide, explicitly, whether fp32 products may run in TF32 on a CUDA GPU — cuBLAS and cuDNN
    both — so the scratch core (cuBLAS) and nn.LSTM (cuDNN) do the same fp32 arithmetic. Off by
    default: then "scratch ≡ nn.LSTM" holds on a GPU to fp32's tolerance. Returns what is in force
    (always False off CUDA, where TF32 does not exist)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    return allowed


def synchronize(device: torch.device) -> None:
    """Wait until `device` has done the work queued on it: a GPU runs behind the host, so a
    clock read without this counts the work launched, not the work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def checks_ids(X: torch.Tensor) -> bool:
    """Whether to check, before using them, that ids lie in the vocabulary: on a CPU, where the
    check is one cheap reduction; not on a GPU, where reading its result on the host would wait
    for the device (a sync per batch, per generated character), and the kernels' own device-side
    asserts catch an id out of range."""
    return X.device.type == "cpu" and X.numel() > 0


def describe(device: torch.device) -> str:
    """The name d2l prints: cuda:0, cpu."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes: blocks up to it come from the reused heap


@lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation rather than hand it back to
    the kernel. A training step on a CPU makes and frees the same few megabytes of buffers every
    batch; by default blocks over 128 KiB-32 MiB are mapped fresh for each allocation and
    unmapped at each free, so every batch touches fresh zeroed pages: some 2,000 page faults a
    d2l batch, up to a third of its time on this project's machine. The process's peak memory is
    unchanged (what is kept is what the previous batch used). Linux with glibc only; True where set."""
    if not sys.platform.startswith("linux"):
        return False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return False


def threads_within_limit(threads: int) -> int:
    """`threads`, but no more than OpenMP's OMP_THREAD_LIMIT grants. torch asks OpenMP for its
    own count whatever the limit says, and its oneDNN kernels split their work for the threads
    asked and leave undone what the threads never granted do: `nn.LSTM`'s gradients came out
    NaN (torch 2.13 on 2 cores, OMP_THREAD_LIMIT=1)."""
    limit = os.environ.get("OMP_THREAD_LIMIT", "").strip()
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


def within_thread_limit() -> None:
    """torch's threads cut to OMP_THREAD_LIMIT where it is lower (`threads_within_limit`)."""
    threads = torch.get_num_threads()
    if threads_within_limit(threads) < threads:
        torch.set_num_threads(threads_within_limit(threads))
