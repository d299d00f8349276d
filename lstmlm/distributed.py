"""Data-parallel training under torchrun: which process this is, and the few collectives we need.

`torchrun --nproc_per_node N -m lstmlm train ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set. Each trains the same model on its own share of every batch's rows (streams);
DistributedDataParallel averages the gradients, so the update equals one process's update on
the whole batch. Only rank 0 writes the run store and prints. Validation is shared too: each
process reads its block of the validation streams and the loss sums are added up.

What the processes agree on after every step — stop now? is a cadence due by the clock? — is a
few flags on the host. On a GPU they go over a second, CPU-only process group (gloo), so that
agreeing waits for the other processes' hosts, never for a GPU: an all-reduce over NCCL would
put them on the device and reading them back would wait for every step queued before.

Overlap: DDP all-reduces a bucket of gradients once all of them are made. The scratch core's
backward is one autograd Function a layer (`recurrence.CompiledSequence`, `fused.FusedLSTM`),
which hands over the layer's W_x, W_h and b together when its backward through time ends; the output layer's come
first, the first layer's (and an embedding's) last. So an all-reduce overlaps the backward of
the layers below it, when the buckets fall between layers (DDP's 25 MB buckets hold a whole
d2l model: there nothing overlaps, with either core). Within a layer nothing can overlap:
no weight gradient is complete before the last time step's is added.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, DeviceError, TrainingError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def rows(self, count: int) -> slice:
        """This process's share of `count` rows (a batch's, the validation streams): a contiguous
        block, disjoint from the others', all of them together; equal when `size` divides `count`."""
        return slice(self.rank * count // self.size, (self.rank + 1) * count // self.size)


def from_environment() -> World:
    """The world torchrun describes, or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def launcher(world: World) -> tuple[str, ...]:
    """The words that start lstmlm as this world was started: `lstmlm` alone, or torchrun with
    as many processes on this one machine (`--standalone`); on several machines, torchrun with
    its rendezvous to be given as before."""
    if not world.active:
        return ("lstmlm",)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world.size))
    where = ("--standalone",) if local == world.size else (f"--nnodes={world.size // max(1, local)}", "--rdzv-backend=c10d", "--rdzv-endpoint=HOST:PORT")
    return ("torchrun", *where, f"--nproc-per-node={local}", "-m", "lstmlm")


_control: dist.ProcessGroup | None = None  # gloo, for the flags agreed each step; None: the default group is gloo


def start(world: World, device: torch.device, batch_size: int) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on CPU, and a gloo one beside nccl for the
    flags); return this process's device."""
    global _control
    if not world.active:
        return device
    if batch_size % world.size:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the {world.size} processes")
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise DeviceError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} visible)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _control = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return device


def stop(world: World, completed: bool = True) -> None:
    """Leave the process group: once every process has `completed` its part (a barrier: the
    main process may still be validating or writing when another would leave), or at once
    after a failure (a barrier would wait for a process that is gone).

    The group's threads outlive this. DistributedDataParallel keeps a reference to a gloo group
    that destroy_process_group does not release (torch 2.13; any DDP module, even deleted), so
    its worker and network-loop threads run until the process ends, and tearing them down in
    the interpreter's shutdown races with the other processes closing their sockets: one in
    some 20 to 40 two-process runs here aborted after its work was done ("terminate called
    without an active exception", SIGABRT), and its torchrun failed. So a process that joined a
    group ends without that teardown once its work is done (as every command does: `cli.app.main`)."""
    global _control
    if world.active and dist.is_initialized():
        if completed:
            dist.barrier()
        dist.destroy_process_group()
    _control = None


def other_process_failed(e: RuntimeError, world: World) -> Exception:
    """A collective that failed because another process of the training is gone (it failed, or
    its machine did), as one TrainingError saying so; any other error as it was."""
    message = str(e).strip()
    if not world.active or not (isinstance(e, dist.DistError) or "gloo" in message or "NCCL" in message):
        return e
    first = (message.splitlines() or [""])[0]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0]  # gloo's: "[…/pair.cc:537] Read error …: Connection reset by peer"
    return TrainingError(f"another process of this training stopped, and this one with it (torchrun's report names the first to fail): {reason}")


def sum_all(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `value` over all processes (itself in a single process)."""
    if world.active:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_gather(value: torch.Tensor, world: World) -> list[torch.Tensor]:
    """`value` from every process, in rank order."""
    parts = [torch.empty_like(value) for _ in range(world.size)]
    dist.all_gather(parts, value)
    return parts


def max_each(values: list[float], world: World) -> list[float]:
    """Each value's largest over the processes (a flag, 1.0, set on one is set on all): one
    collective for them all, on the host (see the module's docstring)."""
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64)  # on the CPU, whatever the device
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return [float(v) for v in t.tolist()]


def broadcast_name(name: str, world: World) -> str:
    """Rank 0's `name` on every process (itself in a single process)."""
    if not world.active:
        return name
    names = [name]
    dist.broadcast_object_list(names, src=0)
    return str(names[0])


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
