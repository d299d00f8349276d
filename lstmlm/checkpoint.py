"""The run store: `runs/NAME/` with the config, the vocab, checkpoints and `metrics.jsonl`.

    runs/NAME/config.json     the effective config (also inside every checkpoint)
    runs/NAME/vocab.json      the vocabulary (also inside every checkpoint)
    runs/NAME/latest.pt       weights + trainer state, rewritten every few epochs
    runs/NAME/best.pt         the checkpoint with the best validation perplexity so far
    runs/NAME/metrics.jsonl   one JSON line per epoch
    runs/NAME/.lock           held (flock) by the one training that writes here

Every file is written to a temporary name in the same directory, fsynced, then renamed, so a
crash or kill -9 at any moment leaves either the old file or the new one, never a mix.
Checkpoints are loaded with `torch.load(weights_only=True)`: tensors, numbers, strings and
containers only, so a crafted file cannot run code.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from . import atomic
from . import config as config_mod
from .config import Config
from .errors import CheckpointError, ConfigError, VocabError
from .vocab import Vocab, describe_chars

FORMAT = "lstmlm-checkpoint"
VERSION = 1
LATEST, BEST = "latest", "best"


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """atomic.write_atomic, with a disk error as a CheckpointError naming the file."""
    try:
        atomic.write_atomic(path, write)
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


class RunStore:
    """One run directory. Create it with `create`, reopen it with `open`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.name = self.root.name
        self._lock_fd: int | None = None

    # ---- creating and opening ----

    @classmethod
    def create(cls, root: Path, cfg: Config, vocab: Vocab) -> RunStore:
        """A new run; refused if `root` already holds one (resume it or choose another name)."""
        root = Path(root)
        if (root / "config.json").exists():
            raise CheckpointError(f"run {root} already exists: continue it with --resume or choose another --run")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory {root}: {e.strerror or e}") from None
        store = cls(root)
        write_text_atomic(root / "config.json", cfg.to_json())
        write_text_atomic(root / "vocab.json", vocab.to_json())
        return store

    @classmethod
    def open(cls, root: Path) -> RunStore:
        root = Path(root)
        if not (root / "config.json").is_file():
            raise CheckpointError(f"no run at {root} (train one with: lstmlm train --run {root.name})")
        return cls(root)

    @property
    def config(self) -> Config:
        try:
            return config_mod.from_json((self.root / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable config: {e}") from None

    @property
    def vocab(self) -> Vocab:
        try:
            return Vocab.from_json((self.root / "vocab.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, VocabError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable vocabulary: {e}") from None

    # ---- the lock ----

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunStore]:
        """Hold the run for one training; a second one is refused. The OS drops it if we die."""
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"run {self.root} is in use by another training (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        for stale in self.root.glob(".*.tmp"):  # a killed writer's half-written temporaries: ours to clear now
            stale.unlink(missing_ok=True)
        try:
            yield self
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    # ---- checkpoints ----

    def path(self, which: str = LATEST) -> Path:
        return self.root / f"{which}.pt"

    def has_checkpoint(self, which: str = LATEST) -> bool:
        return self.path(which).is_file()

    def save(
        self, cfg: Config, vocab: Vocab, model: dict[str, torch.Tensor], trainer: dict[str, Any], which: str = LATEST, prime: str = ""
    ) -> Path:
        """`prime`: text for generation to read before a prefix (train.prime_text); optional."""
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "config": cfg.to_json(),
            "vocab": vocab.to_json(),
            "model": {k: v.detach().cpu() for k, v in model.items()},
            "trainer": trainer,
            "prime": prime,
        }
        write_atomic(self.path(which), lambda f: torch.save(payload, f))
        return self.path(which)

    def load(self, which: str = LATEST) -> dict[str, Any]:
        path = self.path(which)
        if not path.is_file():
            raise CheckpointError(f"run {self.root} has no {which} checkpoint yet")
        return load_checkpoint(path)

    # ---- metrics ----

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise CheckpointError(f"cannot write {self.metrics_path}: {e.strerror or e}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        records = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a crash mid-write
                records.append(json.loads(line))
        return records

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop the epochs after `last_epoch`: a crash may have logged epochs no checkpoint holds."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's contents, refusing anything that is not plain data of our format."""
    try:
        empty, archive = path.stat().st_size == 0, zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if empty or not archive:  # torch.save writes a zip; anything else is cut short or foreign
        raise CheckpointError(f"{path} is corrupt or truncated ({'empty' if empty else 'not a complete checkpoint archive'})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it would call {unsafe.group(1)}" if unsafe else "unsafe content"
        raise CheckpointError(f"refusing to load {path}: it holds more than plain weights ({what})") from None
    except Exception as e:  # any other damage: weights_only loading cannot have run code from it
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an lstmlm checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('version')!r}; this lstmlm reads version {VERSION}"
        )
    for key in ("config", "vocab", "model", "trainer"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks its '{key}' section")
    return payload


def checkpoint_config(payload: dict[str, Any]) -> Config:
    try:
        return config_mod.from_json(payload["config"])
    except ConfigError as e:
        raise CheckpointError(f"checkpoint config is invalid: {e}") from None


def checkpoint_vocab(payload: dict[str, Any]) -> Vocab:
    try:
        return Vocab.from_json(payload["vocab"])
    except VocabError as e:
        raise CheckpointError(f"checkpoint vocabulary is invalid: {e}") from None


def check_compatible(payload: dict[str, Any], cfg: Config, vocab: Vocab, path: Path) -> None:
    """Refuse a checkpoint whose vocabulary or model is not this run's, naming what differs
    (a copied file can fit every tensor shape and still mean other characters)."""
    stored = checkpoint_vocab(payload)
    if stored != vocab:
        theirs, ours = set(stored.tokens) - set(vocab.tokens), set(vocab.tokens) - set(stored.tokens)
        diff = (
            f"only in the checkpoint: {describe_chars(theirs) or 'none'}; only in this run: {describe_chars(ours) or 'none'}"
            if theirs or ours
            else "the same characters in another order"
        )
        raise CheckpointError(
            f"{path} was trained on another vocabulary ({len(stored)} tokens; this run has {len(vocab)}; {diff})"
        )
    trained = checkpoint_config(payload)
    for key in config_mod.MODEL_DEFINING:
        section = config_mod._section_of(key)
        theirs_value, ours_value = getattr(getattr(trained, section), key), getattr(getattr(cfg, section), key)
        if theirs_value != ours_value:
            raise CheckpointError(
                f"{path} holds a model with {key} = {theirs_value!r}; this run has {key} = {ours_value!r}"
            )


def load_weights(net: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """Load a state dict, or say which tensor does not fit (torch's first line names none)."""
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or [str(e)]
        raise CheckpointError(f"the weights in {path} do not fit the model: {details[0][:300]}") from None


def latest_run(runs_dir: Path) -> RunStore:
    """The run whose latest checkpoint was written most recently."""
    candidates = [p for p in Path(runs_dir).glob("*/latest.pt") if p.is_file()] if Path(runs_dir).is_dir() else []
    if not candidates:
        raise CheckpointError(f"no trained run in {runs_dir} (train one with: lstmlm train)")
    return RunStore(max(candidates, key=lambda p: p.stat().st_mtime).parent)
