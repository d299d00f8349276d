"""What a server offers: the runs under its runs directory, their figures, and their models —
a bounded cache, each model loaded once and reused until training writes a newer checkpoint.

A run is a directory of the runs directory itself: a symbolic link there is neither listed nor
served (as a checkpoint through a link is refused). One run's unreadable files make that run
"unreadable", with why, never the listing. What a client reads never shows a path of the
server's file system outside its runs directory (`without_paths`).

Nothing here knows HTTP: the app (`app.py`) turns these into responses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import baselines, cells
from ..errors import CheckpointError, ConfigError, LstmlmError
from ..runs import BEST, LATEST, RunStore, check_run_name
from ..sampling import D2L_PREFIXES

if TYPE_CHECKING:
    from ..inference import Trained

MAX_NAME_BYTES = 255  # NAME_MAX: no run directory has a longer name


class NoCheckpoint(CheckpointError):
    """A run whose training has not saved a checkpoint yet."""


class NotServed(CheckpointError):
    """A name in the runs directory that is no run of its own: a symbolic link."""


def check_name(name: str) -> str:
    """A run's name as a request gives it: a plain name (nothing outside the runs directory)
    that a file can have. ConfigError otherwise."""
    try:
        check_run_name(name)
        size = len(os.fsencode(name))
    except (ConfigError, UnicodeEncodeError):
        raise ConfigError(f"a run is named, not pathed: {shown(name)} is not a plain name under the runs directory") from None
    if size > MAX_NAME_BYTES:
        raise ConfigError(f"a run's name has at most {MAX_NAME_BYTES} bytes, and {shown(name)} has {size:,}")
    return name


def shown(name: str, most: int = 40) -> str:
    """A name as an error message quotes it: cut short, whatever a client sent."""
    return repr(name if len(name) <= most else name[:most] + "…")


def open_run(runs_dir: Path, name: str) -> RunStore:
    """The run `name` (a plain name, a directory of the runs directory itself): ConfigError for
    a bad name, NotServed for a symbolic link, CheckpointError for no run."""
    root = Path(runs_dir) / check_name(name)
    if root.is_symlink():
        raise NotServed(f"{shown(name)} is a symbolic link, and this server serves only the run directories of its runs directory")
    return RunStore.open(root)


def without_paths(message: str, runs_dir: Path) -> str:
    """`message` with every path in it relative to the runs directory ("run NAME", "NAME/latest.pt"),
    and any other absolute path cut to its last part: a client learns nothing of the server's
    file system beyond the runs it is offered."""
    roots = {str(Path(runs_dir)), str(Path(runs_dir).absolute()), str(Path(runs_dir).resolve())} - {"."}  # "." prefixes no path
    for root in sorted(roots, key=len, reverse=True):
        message = message.replace(root.rstrip(os.sep) + os.sep, "")
    # an absolute path: "/" at the start of a word, then its parts; kept: the last part
    return re.sub(r"(?<![\w.~-])/(?:[^\s/'\"]+/)*([^\s/'\"]*)", lambda m: m.group(1) or "/", message)


def finite(value: Any) -> Any:
    """The value with every non-finite float (a diverged epoch's perplexity) as None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def read_records(store: RunStore) -> list[dict[str, Any]]:
    """The run's epochs (metrics.jsonl); CheckpointError if a line there is JSON but no epoch's
    record (a line cut by a crash is left out, as `RunStore.metrics_values` does)."""
    try:
        records = store.metrics_values()
    except RecursionError:
        raise CheckpointError(f"run {store.name}'s metrics.jsonl has a line nested too deeply to read") from None
    except ValueError:  # JSON whose integer has more digits than Python converts (4,300)
        raise CheckpointError(f"run {store.name}'s metrics.jsonl has a number too long to read") from None
    if not all(isinstance(r, dict) for r in records):
        raise CheckpointError(f"run {store.name}'s metrics.jsonl has a line that is not a JSON object")
    return records


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


def run_summary(store: RunStore, runs_dir: Path) -> dict[str, Any]:
    """A run as `GET /api/runs` lists it: its config (the corpus by its name, not its path),
    vocabulary size, best validation figure, last epoch's metrics, and whether a checkpoint
    exists yet (a training's first epoch may still be running); or, for a run whose files
    cannot be read, its name and why."""
    summary: dict[str, Any]
    try:
        records = read_records(store)
        config = store.config.to_dict()
        config["data"]["corpus"] = without_paths(config["data"]["corpus"], runs_dir)
        summary = {
            "name": store.name,
            "config": config,
            "vocab_size": len(store.vocab),
            "cell": cells.title(store.config.model.cell, store.config.model.gru_form),  # 'gru (d2l)', as lstmlm runs names it
            "prefix": D2L_PREFIXES[0] if config["data"]["normalize"] == "d2l" else "",  # what the page offers to continue
            "trained": store.path(LATEST).is_file(),
            "epochs": len(records),
            "best": best_epoch(records),
            "last": records[-1] if records else None,
        }
    except Exception as e:  # whatever is wrong with one run's files, the others are listed
        why = str(e) if isinstance(e, LstmlmError) else f"run {store.name} is unreadable: {type(e).__name__}: {e}"
        summary = {"name": store.name, "error": without_paths(why, runs_dir)}
    return {k: finite(v) for k, v in summary.items()}


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run directory under `runs_dir` (symbolic links left out), the most recently
    changed first (as the CLI's default run)."""
    root = Path(runs_dir)
    try:
        entries = list(os.scandir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise CheckpointError(f"cannot list the runs directory: {e.strerror or e}") from None
    stores = [RunStore(Path(e.path)) for e in entries if is_run(e)]
    stores.sort(key=changed, reverse=True)
    return [run_summary(store, root) for store in stores]


def is_run(entry: os.DirEntry[str]) -> bool:
    """A directory (not a link to one) holding a config.json."""
    try:
        return entry.is_dir(follow_symlinks=False) and os.path.lexists(os.path.join(entry.path, "config.json"))
    except OSError:
        return False


def changed(store: RunStore) -> float:
    """When training last wrote to the run (0 where that cannot be read)."""
    times = [0.0]
    for path in (store.metrics_path, store.path(LATEST), store.root / "config.json"):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    return max(times)


@dataclass(frozen=True, eq=False)  # one per load, known by identity (a key of the server's weak maps)
class Loaded:
    trained: Trained
    precision: str
    stamp: tuple[int, int]  # the checkpoint's (mtime_ns, size) when it was read
    nbytes: int  # its weights and buffers


def weight_bytes(trained: Trained) -> int:
    tensors = [*trained.model.parameters(), *trained.model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Models:
    """The loaded models, one per (run, checkpoint), shared by every request: at most `most` of
    them and `most_bytes` of their weights (the one just asked for always stays), the least
    recently used let go first; reloaded when training has written a newer checkpoint since;
    forgotten once their checkpoint is gone (the run deleted). Loads happen one at a time, so
    concurrent first requests load a run once, and a model already loaded is handed out
    meanwhile. A generation holds its model until it ends, whatever the cache lets go; a model
    let go that a generation still holds is taken back, not loaded again (a second copy, in
    batches of its own)."""

    def __init__(self, runs_dir: Path, device: str = "cpu", precision: str = "fp32", most: int = 4, most_bytes: int = 2**30) -> None:
        self.runs_dir, self.device, self.precision = Path(runs_dir), device, precision
        self.most, self.most_bytes = most, most_bytes
        self._loaded: OrderedDict[tuple[str, bool], Loaded] = OrderedDict()  # least recently used first
        self._handed: weakref.WeakValueDictionary[tuple[str, bool], Loaded] = weakref.WeakValueDictionary()  # the last of each, while anything holds it
        self._lock = threading.Lock()  # held to read or change _loaded, briefly
        self._loading = threading.Lock()  # held through a load

    def __len__(self) -> int:
        return len(self._loaded)

    def held(self) -> list[tuple[str, bool]]:
        """The (run, best) of each model held, the least recently used first."""
        with self._lock:
            return list(self._loaded)

    def get(self, name: str, best: bool = False) -> Loaded:
        stamp = self._stamp(name, best)
        key = (name, best)
        if hit := self.current(name, best, stamp):
            return hit
        with self._loading:
            with self._lock:
                if hit := self._hit(key, stamp):  # another request loaded it meanwhile
                    return hit
                self._loaded.pop(key, None)  # an older checkpoint's model goes before the newer one comes
            from ..inference import load as load_trained

            trained = load_trained(self.runs_dir, name, None, best, self.device, self.precision)
            loaded = Loaded(trained, trained.precision, stamp, weight_bytes(trained))
            with self._lock:
                self._loaded[key] = self._handed[key] = loaded
                self._let_go()
            return loaded

    def current(self, name: str, best: bool = False, stamp: tuple[int, int] | None = None) -> Loaded | None:
        """The model of the run's current checkpoint where it is held, else None (`get` loads
        it): a look at the checkpoint's stamp, no reading, so a request's event loop can take it."""
        stamp = stamp if stamp is not None else self._stamp(name, best)
        with self._lock:
            self._forget_gone()
            return self._hit((name, best), stamp)

    def _stamp(self, name: str, best: bool) -> tuple[int, int]:
        try:
            return checkpoint_stamp(open_run(self.runs_dir, name), best)
        except FileNotFoundError:
            which = "best-validation checkpoint" if best else "checkpoint"
            raise NoCheckpoint(f"run {name} has no {which} yet (its training has not saved one)") from None

    def _hit(self, key: tuple[str, bool], stamp: tuple[int, int]) -> Loaded | None:
        """The model held for `key` if it is of this checkpoint, now the most recently used: one
        the cache let go is taken back where a generation still holds it."""
        loaded = self._loaded.get(key) or self._handed.get(key)
        if loaded is None or loaded.stamp != stamp:
            return None
        self._loaded[key] = loaded
        self._loaded.move_to_end(key)
        self._let_go()
        return loaded

    def forget_gone(self) -> None:
        """Let go of the models whose run or checkpoint is gone."""
        with self._lock:
            self._forget_gone()

    def _forget_gone(self) -> None:
        for name, best in list(self._loaded):
            try:
                if (self.runs_dir / name).is_symlink():
                    raise FileNotFoundError(name)
                checkpoint_stamp(RunStore(self.runs_dir / name), best)
            except OSError:
                del self._loaded[(name, best)]

    def _let_go(self) -> None:
        """The least recently used models, until the rest fit; never the last one asked for."""
        while len(self._loaded) > 1 and (len(self._loaded) > self.most or sum(m.nbytes for m in self._loaded.values()) > self.most_bytes):
            self._loaded.popitem(last=False)


def checkpoint_stamp(store: RunStore, best: bool) -> tuple[int, int]:
    """The checkpoint's (mtime_ns, size): what changes when training writes a newer one."""
    stat = store.path(BEST if best else LATEST).stat()
    return stat.st_mtime_ns, stat.st_size
