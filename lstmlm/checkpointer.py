"""A training's checkpoints: what it saves, how it resumes, and which model is best.

Everything that decides what happens next is in `Progress` and saved in every checkpoint —
the data generator's state at the epoch's start, the batch index within the epoch, the
recurrent state carried mid-epoch (the cell's: (H, C) for the LSTM), torch's RNG — so a run
resumed from any checkpoint continues exactly as it would have. `Checkpointer` writes them
(`checkpoint.save`, atomic) and reads them back (`checkpoint.load`, which brings any older
format up to date with `checkpoint.migrate`).
"""

from __future__ import annotations

from typing import Any

import torch

from . import checkpoint
from .cells.base import State
from .config import Config
from .distributed import World
from .errors import CheckpointError, ConfigError
from .model import CharLM, convert
from .progress import Progress
from .runs import BEST, LATEST, RunStore
from .vocab import Vocab

IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # how this process updates, not the run's state


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with each learning rate a float: a graphed step keeps it as a
    device tensor (`graphs.learning_rate_on_device`), which a checkpoint must not carry to a CPU."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state into `optimizer`, which keeps its own implementation flags
    (fused, capturable, …): a run trained on a GPU resumes on a CPU, and the other way round.
    Adam's step count goes where this optimizer keeps it: on the parameters' device when fused
    or capturable (a CPU run's count is a CPU tensor), else as it was saved."""
    own = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, own):
        group.update(flags)
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


class Checkpointer:
    """Saves and resumes one run's training: its model, optimizer and schedule, with `Progress`.

    Only the main process writes (the others' state is the same, or derived from it)."""

    def __init__(
        self,
        store: RunStore,
        vocab: Vocab,
        prime: str,
        model: CharLM,
        optimizer: torch.optim.Optimizer,
        schedule: torch.optim.lr_scheduler.LRScheduler,
        device: torch.device,
        world: World = World(),
    ) -> None:
        self.store, self.vocab, self.prime = store, vocab, prime
        self.model, self.optimizer, self.schedule = model, optimizer, schedule
        self.device, self.world = device, world
        self.saved_at = -1  # the global step of the last latest.pt

    def save(self, which: str, cfg: Config, progress: Progress, carry: State | None) -> str:
        """Write `which` (latest or best), with the recurrent state `carry` where the epoch is
        under way; the path written ("" on the other processes)."""
        if which == LATEST:
            self.saved_at = progress.global_step
        if not self.world.is_main:
            return ""
        progress.torch_rng = torch.get_rng_state()
        progress.carry = [S.detach().cpu() for S in carry] if carry is not None and progress.batch > 0 else None
        schedule = self.schedule.state_dict()
        schedule["_last_lr"] = [float(lr) for lr in schedule.get("_last_lr", [])]  # device tensors under a graph
        trainer: dict[str, Any] = {"optimizer": optimizer_state(self.optimizer), "schedule": schedule, "state": progress.to_dict()}
        if self.device.type == "cuda":
            trainer["cuda_rng"] = torch.cuda.get_rng_state()
        return str(checkpoint.save(self.store, cfg, self.vocab, self.model.state_dict(), trainer, which, self.prime))

    def resume(self, cfg: Config) -> Progress:
        """The run's latest checkpoint into the model, optimizer and schedule, torch's RNGs set
        as they were; its progress, whose best figure is best.pt's own (`best_on_disk`)."""
        path = self.store.path(LATEST)
        payload = checkpoint.load(self.store, LATEST)
        checkpoint.check_compatible(payload, cfg, self.vocab, path)
        checkpoint.load_weights(self.model, convert(payload["model"], cfg.model.model, self.model.cell), path)
        trainer = payload["trainer"]
        try:
            load_optimizer_state(self.optimizer, trainer["optimizer"])
            self.schedule.load_state_dict(trainer["schedule"])
            progress = Progress.from_dict(trainer["state"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path} is damaged: its trainer state does not load ({type(e).__name__}: {e})") from None
        check_epochs_left(progress.epoch, cfg.train.epochs, self.store.name)
        progress.best_saved = self.best_on_disk()
        if progress.torch_rng is not None:
            torch.set_rng_state(progress.torch_rng)
        if self.device.type == "cuda" and "cuda_rng" in trainer:
            torch.cuda.set_rng_state(trainer["cuda_rng"])
        self.saved_at = progress.global_step
        return progress

    def best_on_disk(self) -> float | None:
        """The validation loss of the model in best.pt, as best.pt itself records it: latest.pt
        can be older (checkpoints every few epochs, validations every few steps, a kill in
        between), and a figure taken from it would let a worse model replace the best."""
        if not self.store.has_checkpoint(BEST):
            return None
        state = checkpoint.load(self.store, BEST)["trainer"].get("state")
        figure = state.get("best_saved") if isinstance(state, dict) else None
        if not isinstance(figure, (int, float)) or isinstance(figure, bool):
            raise CheckpointError(f"{self.store.path(BEST)} does not record its validation loss: move it aside to resume")
        return float(figure)


def non_finite(model: torch.nn.Module) -> list[str]:
    """The model's floating-point tensors holding a NaN or Inf, by name."""
    return [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]


def check_epochs_left(done: int, epochs: int, run: str) -> None:
    """Refuse a resume with no epoch left to train, before it changes anything in the run: it
    would otherwise save the --epochs given, train nothing and report the run again as if it had
    (shown as 'epoch 3/2')."""
    if done < epochs:
        return
    if done == epochs:
        raise ConfigError(f"run {run} has trained all its {epochs} epochs: resume it with --epochs above {done} to train on")
    raise ConfigError(f"run {run} has trained {done} epochs already, so --epochs {epochs} leaves nothing to train: give --epochs above {done}")
