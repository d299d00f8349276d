"""What a server offers: the runs under its runs directory, their figures, and their models,
each loaded once and reused until training writes a newer checkpoint.

Nothing here knows HTTP: the app (`app.py`) turns these into responses.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import baselines
from ..errors import CheckpointError, LstmlmError
from ..runs import BEST, LATEST, RunStore, check_run_name

if TYPE_CHECKING:
    from ..session import Trained


class NoCheckpoint(CheckpointError):
    """A run whose training has not saved a checkpoint yet."""


def open_run(runs_dir: Path, name: str) -> RunStore:
    """The run `name` (a plain name: nothing outside the runs directory); CheckpointError if absent."""
    return RunStore.open(Path(runs_dir) / check_run_name(name))


def finite(value: Any) -> Any:
    """The value with every non-finite float (a diverged epoch's perplexity) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def best_epoch(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the lowest validation perplexity (None without validation)."""
    validated = [r for r in records if isinstance(r.get("val_perplexity"), (int, float)) and math.isfinite(r["val_perplexity"])]
    if not validated:
        return None
    best = min(validated, key=lambda r: r["val_perplexity"])
    return {"epoch": best.get("epoch"), "val_perplexity": best["val_perplexity"], "val_bpc": best.get("val_bpc")}


def run_baselines(store: RunStore) -> dict[str, Any] | None:
    """The run's baselines (baselines.py) for the chart's horizontal lines; None where it keeps none."""
    found = baselines.read(store.root)
    return finite(dataclasses.asdict(found)) if found is not None else None


def run_summary(store: RunStore) -> dict[str, Any]:
    """A run as `GET /api/runs` lists it: its config, vocabulary size, best validation figure,
    last epoch's metrics, and whether a checkpoint exists yet (a training's first epoch may
    still be running)."""
    summary: dict[str, Any]
    try:
        records = store.read_metrics()
        checkpoint = store.path(LATEST)
        summary = {
            "name": store.name,
            "config": store.config.to_dict(),
            "vocab_size": len(store.vocab),
            "trained": checkpoint.is_file(),
            "epochs": len(records),
            "best": best_epoch(records),
            "last": records[-1] if records else None,
        }
    except (LstmlmError, OSError, ValueError) as e:
        summary = {"name": store.name, "error": str(e)}
    return {k: finite(v) for k, v in summary.items()}


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run under `runs_dir`, the most recently changed first (as the CLI's default run)."""
    root = Path(runs_dir)
    stores = [RunStore(p) for p in root.iterdir() if (p / "config.json").is_file()] if root.is_dir() else []
    stores.sort(key=changed, reverse=True)
    return [run_summary(store) for store in stores]


def changed(store: RunStore) -> float:
    """When training last wrote to the run."""
    return max((p.stat().st_mtime for p in (store.metrics_path, store.path(LATEST), store.root / "config.json") if p.is_file()), default=0.0)


@dataclass(frozen=True)
class Loaded:
    trained: Trained
    precision: str
    stamp: tuple[int, int]  # the checkpoint's (mtime_ns, size) when it was read


class Models:
    """One loaded model per (run, checkpoint), shared by every request; reloaded when training
    has written a newer checkpoint since. Loading happens under a lock, so concurrent first
    requests load a run once."""

    def __init__(self, runs_dir: Path, device: str = "cpu", precision: str = "fp32") -> None:
        self.runs_dir, self.device, self.precision = Path(runs_dir), device, precision
        self._loaded: dict[tuple[str, bool], Loaded] = {}
        self._lock = threading.Lock()

    def get(self, name: str, best: bool = False) -> Loaded:
        store = open_run(self.runs_dir, name)
        path = store.path(BEST if best else LATEST)
        try:
            stat = path.stat()
        except FileNotFoundError:
            which = "best-validation checkpoint" if best else "checkpoint"
            raise NoCheckpoint(f"run {name} has no {which} yet (its training has not saved one)") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            loaded = self._loaded.get((name, best))
            if loaded is None or loaded.stamp != stamp:
                from ..session import load_for_generation

                trained, precision = load_for_generation(self.runs_dir, name, None, best, self.device, self.precision)
                loaded = self._loaded[(name, best)] = Loaded(trained, precision, stamp)
            return loaded
