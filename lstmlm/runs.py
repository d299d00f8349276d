"""The run store: `runs/NAME/` with the config, the vocab, checkpoints and `metrics.jsonl`.

    runs/NAME/config.json     the effective config (also inside every checkpoint)
    runs/NAME/vocab.json      the vocabulary (also inside every checkpoint)
    runs/NAME/latest.pt       weights + trainer state, rewritten every few epochs (checkpoint.py)
    runs/NAME/best.pt         the checkpoint with the best validation perplexity so far
    runs/NAME/metrics.jsonl   one JSON line per epoch
    runs/NAME/.lock           held (flock) by the one training that writes here

Every file is written through `atomic.write_atomic`. This module imports no torch, so reading
a run's metrics (`lstmlm plot`) starts at once; the checkpoints themselves are `checkpoint.py`'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .atomic import write_text_atomic
from .config import Config
from .errors import CheckpointError, ConfigError, VocabError

if TYPE_CHECKING:
    from .vocab import Vocab

LATEST, BEST = "latest", "best"
DEFAULT_RUNS_DIR = Path("runs")


def check_run_name(name: str) -> str:
    """A run is named, not pathed: its files (latest.pt, config.json, ...) stay under the runs directory."""
    if name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
        raise ConfigError(f"--run must be a plain name, not {name!r} (choose the directory with --runs-dir)")
    return name


class RunStore:
    """One run directory. Create it with `create`, reopen it with `open` or `find`."""

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
        write_text_atomic(root / "config.json", cfg.to_json(), "run's config")
        write_text_atomic(root / "vocab.json", vocab.to_json(), "run's vocabulary")
        return store

    @classmethod
    def open(cls, root: Path) -> RunStore:
        root = Path(root)
        if not (root / "config.json").is_file():
            raise CheckpointError(f"no run at {root} (train one with: lstmlm train --run {root.name})")
        return cls(root)

    @classmethod
    def find(cls, runs_dir: Path, name: str | None) -> RunStore:
        """The run `name` under `runs_dir`, or without a name the most recently trained one."""
        if name is None:
            return latest_run(runs_dir)
        return cls.open(Path(runs_dir) / check_run_name(name))

    @property
    def config(self) -> Config:
        try:
            return config_mod.from_json((self.root / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable config: {e}") from None

    @property
    def vocab(self) -> Vocab:
        from .vocab import Vocab  # torch: only when a vocabulary is wanted

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

    # ---- checkpoint files (written and read by checkpoint.py) ----

    def path(self, which: str = LATEST) -> Path:
        return self.root / f"{which}.pt"

    def has_checkpoint(self, which: str = LATEST) -> bool:
        return self.path(which).is_file()

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
        write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept), "run's metrics")


def latest_run(runs_dir: Path) -> RunStore:
    """The run whose latest checkpoint was written most recently."""
    candidates = [p for p in Path(runs_dir).glob("*/latest.pt") if p.is_file()] if Path(runs_dir).is_dir() else []
    if not candidates:
        raise CheckpointError(f"no trained run in {runs_dir} (train one with: lstmlm train)")
    return RunStore(max(candidates, key=lambda p: p.stat().st_mtime).parent)
