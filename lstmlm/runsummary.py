"""One run summed up from its own files (`summarize`), for `lstmlm runs`.

Each run is read from its config.json, vocab.json, run.json and metrics.jsonl and the sizes and
times of its files: no checkpoint is opened and torch is never imported, so hundreds of runs
list at once. Whatever is wrong with a run — a file missing, not JSON, a symbolic link,
unreadable — is said in its row (`problems`), never raised: one bad run does not hide the others.

A run is in one of four states:

    training      its lock is held: a live training writes it (the OS drops a dead one's lock)
    done          its last training ended (completed, stopped early, out of time) and nothing
                  was written since; a run made before lstmlm recorded the end: all its epochs logged
    interrupted   its last training was stopped (Ctrl-C, SIGTERM), or ended without saying so
                  (killed, crashed): no end recorded, or a later training's writes after the one
                  recorded (a checkpoint, or metrics.jsonl, which a resume rewrites as it starts)
    unreadable    something in it cannot be read: `problems` says what
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePath
from typing import Any

from . import cells, config_file
from .config import Config
from .data.download import KNOWN
from .data.text import token_unit
from .errors import CheckpointError, ConfigError
from .figures import FIGURES, LARGEST, at_least, count, number, perplexity
from .runs import BEST, CHECKPOINT_SUFFIX, LATEST, RunStore, read_regular, strict
from .sizes import num_parameters

TRAINING, DONE, INTERRUPTED, UNREADABLE = "training", "done", "interrupted", "unreadable"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Run:
    """One run as `lstmlm runs` shows it; None where its files do not say."""

    name: str
    path: Path
    state: str  # TRAINING, DONE, INTERRUPTED or UNREADABLE
    why: str  # how it ended (done, interrupted), the pid (training), what is wrong (unreadable)
    problems: tuple[str, ...] = ()  # what could not be read, each in a few words
    pid: int | None = None  # the training's, while it trains (0: not written yet)
    cell: str | None = None
    form: str | None = None  # the GRU's form (cudnn or d2l: two models under one cell's name); None for the others
    model: str | None = None  # the core: scratch or cudnn
    layers: int | None = None
    hidden: int | None = None
    embedding: int | None = None
    vocab_size: int | None = None
    parameters: int | None = None
    corpus: str | None = None  # a known corpus's name, or the file's (directory's, glob's) alone
    normalize: str | None = None
    tokens: int | None = None  # trained on, all sessions together
    epochs: int | None = None  # completed
    planned_epochs: int | None = None
    best_val_perplexity: float | None = None
    best_epoch: float | None = None  # where the best validation was made: an epoch's end, or within one (1.5: halfway into the second)
    last_val_perplexity: float | None = None
    train_perplexity: float | None = None  # the last logged epoch's
    seconds: float | None = None  # of training, all sessions together
    checkpoint: bool = False  # whether latest.pt is there to continue from
    size: int = 0  # bytes on disk, the run's files together
    changed: float = 0.0  # the last change to any of them, seconds since the epoch
    config: Config | None = field(default=None, compare=False, repr=False)

    @property
    def bits_per(self) -> str:
        """What a bit is counted per: a byte for a bytes model, else a character."""
        return token_unit(self.normalize)

    @property
    def best_val_bits(self) -> float | None:
        """Bits per character (or byte) of the best validation: log2 of its perplexity."""
        return math.log2(self.best_val_perplexity) if self.best_val_perplexity else None

    @property
    def changed_at(self) -> datetime | None:
        """The last change as a local date and time; None for a file time no date holds (a year
        past 9999: a tmpfs keeps whatever time it is given)."""
        try:
            return datetime.fromtimestamp(self.changed).astimezone()
        except (ValueError, OverflowError, OSError):
            return None

    @property
    def cell_title(self) -> str | None:
        """The cell as a listing names it: 'gru (d2l)' for the book's GRU, else the cell alone."""
        return cells.title(self.cell, self.form) if self.cell is not None else None

    def to_json(self) -> dict[str, Any]:
        """The run as one strict-JSON object (`lstmlm runs --json`)."""
        record = {
            "name": self.name, "path": str(self.path), "state": self.state, "why": self.why, "problems": list(self.problems),
            "pid": self.pid, "cell": self.cell, "form": self.form, "model": self.model, "layers": self.layers, "hidden": self.hidden,
            "embedding": self.embedding, "vocab_size": self.vocab_size, "parameters": self.parameters,
            "corpus": self.corpus, "normalize": self.normalize, "tokens": self.tokens, "epochs": self.epochs,
            "planned_epochs": self.planned_epochs, "best_val_perplexity": self.best_val_perplexity,
            "best_val_bits": self.best_val_bits, "bits_per": self.bits_per, "best_epoch": self.best_epoch,
            "last_val_perplexity": self.last_val_perplexity, "train_perplexity": self.train_perplexity,
            "seconds": self.seconds, "checkpoint": self.checkpoint, "size_bytes": self.size,
            "changed": self.changed_at.isoformat(timespec="seconds") if self.changed_at else None,
        }  # fmt: skip
        return dict(strict(record))


def summarize(root: Path) -> Run:
    """The run at `root`, from its files; every problem in it recorded, none raised."""
    try:
        here = os.lstat(root)
    except OSError as e:  # removed since it was listed, or its directory cannot be searched
        return Run(root.name, root, UNREADABLE, e.strerror or str(e), (e.strerror or str(e),))
    if stat.S_ISLNK(here.st_mode):
        problem = f"a symbolic link to {_link_target(root)}: a run is a directory of its own"
        return Run(root.name, root, UNREADABLE, problem, (problem,), size=_blocks(here), changed=here.st_mtime)
    size, changed, unlisted = _disk_usage(root, here)
    facts = _Reader(root)
    if unlisted:
        facts.problems.append(unlisted)
    return facts.run(size, changed)


class _Reader:
    """Reads one run's files, collecting what is wrong with them instead of raising it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []

    def run(self, size: int, changed: float) -> Run:
        cfg, cell = self._config()
        vocab_size = self._vocab_size()
        ended = self._ended()
        logged = _Logged.of(self._metrics())
        latest = self._mtime(LATEST + CHECKPOINT_SUFFIX)
        written = [t for t in (latest, self._mtime(BEST + CHECKPOINT_SUFFIX), self._mtime(METRICS)) if t is not None]
        current = ended if ended is not None and max(written, default=-math.inf) <= number(ended.get("at"), math.inf) else None
        pid = self._holder()
        state, why = self._state(pid, cfg, logged, ended, current, latest is not None)
        return Run(
            self.root.name, self.root, state, why, tuple(self.problems), pid, checkpoint=latest is not None, size=size, changed=changed,
            **_described(cfg, cell, vocab_size), **_history(logged, ended, current),
        )  # fmt: skip

    def _state(
        self, pid: int | None, cfg: Config | None, logged: _Logged, ended: dict[str, Any] | None, current: dict[str, Any] | None, checkpoint: bool
    ) -> tuple[str, str]:
        """The run's state and why it is in it. `ended`: the last training's end as recorded;
        `current`: the same, if no checkpoint was written after it."""
        if pid is not None:
            return TRAINING, f"pid {pid}" if pid else "starting"
        if self.problems:
            return UNREADABLE, "; ".join(self.problems)
        if current is not None:
            reason = str(current.get("reason", "completed"))
            if reason == "interrupted":
                return INTERRUPTED, "stopped, checkpoint saved" if checkpoint else "stopped before its first checkpoint"
            return DONE, reason.replace("_", " ")
        if not checkpoint:
            return INTERRUPTED, "stopped before its first checkpoint"
        if ended is None and cfg is not None and logged.epochs >= cfg.train.epochs:
            return DONE, "completed"  # made before lstmlm recorded how a training ended
        return INTERRUPTED, "ended without saying so (killed?)"

    # ---- the files ----

    def _text(self, name: str, optional: bool = False) -> str | None:
        path = self.root / name
        try:
            return read_regular(path)
        except FileNotFoundError:
            if not optional:
                self.problems.append(f"{name} is missing")
        except CheckpointError:  # open_regular's refusal
            self.problems.append(f"{name} is a symbolic link" if path.is_symlink() else f"{name} is not a regular file")
        except UnicodeDecodeError:
            self.problems.append(f"{name} is not UTF-8 text")
        except OSError as e:
            self.problems.append(f"{name}: {e.strerror or e}")
        return None

    def _json(self, name: str, optional: bool = False) -> Any:
        text = self._text(name, optional)
        if text is None:
            return None
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            self.problems.append(f"{name} is not valid JSON")
            return None

    def _ended(self) -> dict[str, Any] | None:
        """How the last training ended, as run.json records it (None: not recorded)."""
        record = self._json("run.json", optional=True)
        if record is not None and not isinstance(record, dict):
            self.problems.append("run.json is not a JSON object")
        ended = record.get("done") if isinstance(record, dict) else None
        return ended if isinstance(ended, dict) else None

    def _config(self) -> tuple[Config | None, str | None]:
        """The stored config, and its cell (lstm for a run made before lstmlm had other cells:
        the config reads it so)."""
        text = self._text("config.json")
        if text is None:
            return None, None
        try:
            cfg = config_file.from_json(text)
            return cfg, cfg.model.cell
        except (ValueError, RecursionError):
            self.problems.append("config.json is not valid JSON")
        except ConfigError as e:
            self.problems.append(f"config.json: {e}")
        return None, None

    def _vocab_size(self) -> int | None:
        vocab = self._json("vocab.json")
        tokens = vocab.get("tokens") if isinstance(vocab, dict) else None
        if vocab is not None and not (isinstance(tokens, list) and tokens):
            self.problems.append("vocab.json lists no tokens")
            return None
        return len(tokens) if isinstance(tokens, list) else None

    def _metrics(self) -> list[dict[str, Any]]:
        """The logged epochs. A last line without its newline was cut by a crash mid-write
        (RunStore.read_metrics skips it too): left out, not a problem; any other line that is
        not a JSON record is."""
        text = self._text(METRICS, optional=True) or ""
        whole, _, cut = text.rpartition("\n")
        records = _records(whole)
        if records is None:
            records = self._records_line_by_line(whole)
        with contextlib.suppress(ValueError, RecursionError):  # a cut line that is whole after all: a record
            last = json.loads(cut) if cut.strip() else None
            if isinstance(last, dict) and not self.problems:
                records.append(last)
        return records

    def _records_line_by_line(self, text: str) -> list[dict[str, Any]]:
        """The records up to the first line that is not one (said in `problems`); blank lines skipped."""
        good = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                record = None
            if not isinstance(record, dict):
                self.problems.append(f"metrics.jsonl line {n} is not a JSON record")
                break
            good.append(record)
        return good

    def _mtime(self, name: str) -> float | None:
        """When the regular file `name` was last written; None where there is none."""
        with contextlib.suppress(OSError):
            st = os.lstat(self.root / name)
            return st.st_mtime if stat.S_ISREG(st.st_mode) else None
        return None

    def _holder(self) -> int | None:
        try:
            return RunStore(self.root).holder()
        except CheckpointError:  # the lock is a symbolic link: no training can hold that
            self.problems.append(".lock is a symbolic link")
        except OSError as e:
            self.problems.append(f".lock: {e.strerror or e}")
        return None


def _described(cfg: Config | None, cell: str | None, vocab_size: int | None) -> dict[str, Any]:
    """The model and the data, as `Run`'s fields."""
    if cfg is None:
        return {"cell": cell, "vocab_size": vocab_size}
    m = cfg.model
    return {
        "cell": cell, "form": m.gru_form if cell == "gru" else None, "model": m.model, "layers": m.layers, "hidden": m.hidden,
        "embedding": m.embedding, "vocab_size": vocab_size, "parameters": num_parameters(m, vocab_size) if vocab_size is not None else None,
        "corpus": corpus_name(cfg.data.corpus), "normalize": cfg.data.normalize, "planned_epochs": cfg.train.epochs, "config": cfg,
    }  # fmt: skip


def _history(logged: _Logged, ended: dict[str, Any] | None, current: dict[str, Any] | None) -> dict[str, Any]:
    """The training so far, as `Run`'s fields: from the recorded end where nothing was written
    after it (it counts a last, unfinished epoch too), else from the epochs logged."""
    recorded = [perplexity(ended.get(key)) for key in ("best_val_perplexity", "val_perplexity")] if ended else []
    seen = [v for v in (logged.best, *recorded) if v is not None]  # best.pt's figure, recorded: validations between epochs count
    history: dict[str, Any] = {
        "tokens": logged.tokens, "epochs": logged.epochs, "seconds": logged.seconds, "last_val_perplexity": logged.last_val,
        "best_val_perplexity": min(seen) if seen else None, "best_epoch": logged.best_epoch, "train_perplexity": logged.train,
    }  # fmt: skip
    if current is not None:
        history.update(tokens=count(current.get("tokens")), epochs=count(current.get("epochs")), seconds=number(current.get("seconds")))
        history["last_val_perplexity"] = perplexity(current.get("val_perplexity")) or logged.last_val
    return history


@dataclass(frozen=True)
class _Logged:
    """What metrics.jsonl says: the epochs logged, their tokens and time, the validations."""

    epochs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    best: float | None = None
    best_epoch: float | None = None
    last_val: float | None = None
    train: float | None = None

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> _Logged:
        # hundreds of runs of hundreds of epochs each: comprehensions, no call per value
        epochs = [r for r in records if type(r.get("epoch")) is int]
        # every validation, those with a line of their own within an epoch too (an epoch's record
        # repeats the latest: the min keeps the first, where it was made)
        validated = [(v, e) for r in records if at_least(v := r.get("val_perplexity"), 1) and at_least(e := r.get("epoch"), 0)]
        if not epochs and not validated:
            return cls()
        rates = [(r.get("tokens_per_s", 0.0), r.get("seconds", 0.0)) for r in epochs]
        figures = [(rate, s) for rate, s in rates if type(rate) in FIGURES and type(s) in FIGURES]
        timed = [(rate, s) for rate, s in figures if 0 <= rate <= LARGEST and 0 <= s <= LARGEST and rate * s <= LARGEST]
        best = min(validated) if validated else (None, None)
        return cls(
            epochs=max((r["epoch"] for r in epochs), default=0),
            tokens=sum(round(rate * s) for rate, s in timed),  # an epoch's tokens were logged as its rate and its time
            seconds=float(sum(s for _, s in timed)),
            best=best[0],
            best_epoch=best[1],
            last_val=validated[-1][0] if validated else None,
            train=perplexity(epochs[-1].get("train_perplexity")) if epochs else None,
        )


def _records(lines: str) -> list[dict[str, Any]] | None:
    """Newline-separated JSON records in one parse, as one JSON array (what makes hundreds of
    runs of hundreds of epochs list at once); None unless every line is one record."""
    if not lines:
        return []
    try:
        records = json.loads("[" + lines.replace("\n", ",") + "]")
    except (ValueError, RecursionError):
        return None
    whole = isinstance(records, list) and len(records) == lines.count("\n") + 1 and all(isinstance(r, dict) for r in records)
    return records if whole else None


def corpus_name(corpus: str) -> str:
    """A known corpus by its name; a file or directory by its name alone; a glob from the
    folder it starts in ('~/src/linux/**/*.[ch]' → 'linux/**/*.[ch]')."""
    if corpus in KNOWN:
        return corpus
    parts = PurePath(corpus).parts
    if not glob.has_magic(corpus):
        return parts[-1] if parts else corpus
    first = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return str(PurePath(*parts[max(0, first - 1) :]))


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _blocks(st: os.stat_result) -> int:
    """The bytes a file takes on disk (its blocks: what deleting it gives back)."""
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


def _disk_usage(root: Path, here: os.stat_result) -> tuple[int, float, str]:
    """(bytes on disk, last change, what could not be read) of the directory `root`: every file
    under it, links counted as themselves and never followed."""
    size, changed = _blocks(here), here.st_mtime
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    size += _blocks(st)
                    changed = max(changed, st.st_mtime)
                    if stat.S_ISDIR(st.st_mode):
                        pending.append(Path(entry.path))
        except OSError as e:
            where = "the run's directory" if directory == root else str(directory.relative_to(root))
            return size, changed, f"cannot read {where}: {e.strerror or e}"
    return size, changed, ""
