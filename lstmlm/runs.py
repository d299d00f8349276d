"""The run store: `runs/NAME/` with the config, the vocab, checkpoints and `metrics.jsonl`.

    runs/NAME/config.json     the effective config (also inside every checkpoint); a resume saves
                              the options it may change (config.RESUMABLE) here
    runs/NAME/vocab.json      the vocabulary (also inside every checkpoint)
    runs/NAME/run.json        what the run was made from (the corpus's content hash) and how
                              its last training ended ("done": why, when, epochs, tokens, time)
    runs/NAME/latest.pt       weights + trainer state, rewritten every few epochs (checkpoint.py)
    runs/NAME/best.pt         the checkpoint with the best validation perplexity so far
    runs/NAME/metrics.jsonl   one JSON line per epoch, and per validation within one
    runs/NAME/.lock           held (flock) by the one training that writes here

A run is claimed by linking its config.json into place, which fails if one is there: of two
trainings that chose the same name at the same instant, one gets it and the other hears so.
Every file is written through `atomic.write_atomic` and opened with `open_regular`, which
never follows a symbolic link planted under a run's file name. This module imports no torch,
so reading a run's metrics (`lstmlm plot`, `lstmlm runs`) starts at once; the checkpoints are
`checkpoint.py`'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shlex
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from . import config_file
from .atomic import write_text_atomic
from .config import Config
from .errors import CheckpointError, ConfigError, VocabError, WriteError

if TYPE_CHECKING:
    from .vocab import Vocab

LATEST, BEST = "latest", "best"
CHECKPOINT_SUFFIX = ".pt"  # latest.pt, best.pt
DEFAULT_RUNS_DIR = Path("runs")


class RunExists(CheckpointError):
    """The run's name is taken: another run (or another training, a moment ago) has it."""


def open_regular(path: Path, flags: int, mode: int = 0o644) -> int:
    """A descriptor for the regular file at `path`, never through a symbolic link planted under
    its name (that would let a run's writes land anywhere the user may write) and never on a
    FIFO or a device (which would block or read forever): either is a CheckpointError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise CheckpointError(f"refusing to open {path}: it is a symbolic link, and a run's files are its own") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"refusing to open {path}: it is not a regular file")
    return fd


def read_regular(path: Path) -> str:
    """A run's UTF-8 text file, read through `open_regular`."""
    with os.fdopen(open_regular(path, os.O_RDONLY), encoding="utf-8") as f:
        return f.read()


def strict(value: Any) -> Any:
    """`value` with each NaN or infinity (JSON has no word for either) as None, however deep."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """`record` as one line of strict JSON: a NaN or an infinity is null."""
    return json.dumps(strict(record), allow_nan=False)


def resume_command(run: str, runs_dir: Path, overrides: dict[str, Any] | None = None, launcher: tuple[str, ...] = ("lstmlm",)) -> str:
    """The command that continues `run`, repeating the options given that a resume may change
    (they are saved in the run too, so the bare command continues the same way). `launcher`:
    what starts lstmlm (`distributed.launcher`: torchrun's words, where `--run` is `--name`)."""
    overrides = overrides or {}
    words = [*launcher, "train", "--resume", "--run" if launcher == ("lstmlm",) else "--name", run]
    if runs_dir != DEFAULT_RUNS_DIR:
        words += ["--runs-dir", str(runs_dir)]
    for key in sorted(k for k, v in overrides.items() if v is not None and k in config_mod.RESUMABLE):
        words += [f"--{key.replace('_', '-')}", str(overrides[key])]
    return shlex.join(words)


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
    def create(cls, root: Path, cfg: Config, vocab: Vocab, corpus_sha1: str | None = None) -> RunStore:
        """A new run, claimed before anything else is written; RunExists if `root` holds one
        (resume it or choose another name). `corpus_sha1`: the corpus's content hash, which a
        resume checks."""
        root = _own_directory(root)
        if (root / "config.json").exists():
            raise RunExists(f"run {root} already exists: continue it with --resume or choose another --run")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"cannot create run directory {root}: {e.strerror or e}") from None
        try:
            write_text_atomic(root / "config.json", cfg.to_json(), "run's config", replace=False)
        except FileExistsError:  # another training claimed it since the check above
            raise RunExists(f"run {root} already exists: continue it with --resume or choose another --run") from None
        store = cls(root)
        write_text_atomic(root / "vocab.json", vocab.to_json(), "run's vocabulary")
        write_text_atomic(root / "run.json", json.dumps({"corpus_sha1": corpus_sha1}, indent=2), "run's record")
        return store

    @classmethod
    def open(cls, root: Path) -> RunStore:
        root = _own_directory(root)
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
            return config_file.from_json(read_regular(self.root / "config.json"))
        except (OSError, UnicodeDecodeError, ConfigError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable config: {e}") from None

    def save_config(self, cfg: Config) -> None:
        """Replace the stored config (a resume's changes to the options it may change)."""
        write_text_atomic(self.root / "config.json", cfg.to_json(), "run's config")

    @property
    def vocab(self) -> Vocab:
        from .vocab import Vocab  # torch: only when a vocabulary is wanted

        try:
            return Vocab.from_json(read_regular(self.root / "vocab.json"))
        except (OSError, UnicodeDecodeError, VocabError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable vocabulary: {e}") from None

    @property
    def corpus_sha1(self) -> str | None:
        """The content hash of the corpus the run was created from; None for a run made before
        lstmlm kept one."""
        value = self.record.get("corpus_sha1")
        return value if isinstance(value, str) else None

    @property
    def record(self) -> dict[str, Any]:
        """run.json as a table ({} where a run made before lstmlm kept one has none)."""
        path = self.root / "run.json"
        if not path.exists() and not path.is_symlink():
            return {}
        try:
            value = json.loads(read_regular(path))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"run {self.root} has an unreadable run.json: {e}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"run {self.root} has an unreadable run.json: not a JSON object")
        return value

    def record_done(self, done: dict[str, Any]) -> None:
        """Say in run.json how this training ended (why, epochs, tokens, ...), and when: a
        latest.pt written after that "at" is a later training's, which has not ended (lstmlm runs)."""
        record = {**self.record, "done": {**strict(done), "at": time.time()}}
        write_text_atomic(self.root / "run.json", json.dumps(record, indent=2, allow_nan=False), "run's record")

    # ---- the lock ----

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunStore]:
        """Hold the run for one training; a second one is refused. The OS drops it if we die."""
        path = self.root / ".lock"
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise CheckpointError(f"cannot open the run's lock {path}: {e.strerror or e}") from None
        if not hold(fd):
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CheckpointError(f"run {self.root} is in use by another training (pid {holder})")
        with contextlib.suppress(OSError):  # the pid only names the holder: a full disk is the checkpoint's to report
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        for stale in self.root.glob(".*.tmp"):  # a killed writer's half-written temporaries: ours to clear now
            stale.unlink(missing_ok=True)
        try:
            yield self
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def holder(self) -> int | None:
        """The pid of the training that holds the run now (0 if it has not written it yet), or
        None: the lock itself is asked, with a shared hold taken and dropped at once, so a
        training killed with -9, whose pid the file still holds, is not taken for a live one.
        CheckpointError for a lock that is a symbolic link; OSError if it cannot be read."""
        try:
            fd = open_regular(self.root / ".lock", os.O_RDONLY)
        except FileNotFoundError:  # never trained here: nothing to hold
            return None
        try:
            if not hold(fd, shared=True):
                pid = os.read(fd, 32).decode(errors="replace").strip()
                return int(pid) if pid.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    # ---- checkpoint files (written and read by checkpoint.py) ----

    def path(self, which: str = LATEST) -> Path:
        return self.root / f"{which}{CHECKPOINT_SUFFIX}"

    def has_checkpoint(self, which: str = LATEST) -> bool:
        return self.path(which).is_file()

    # ---- metrics ----

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def append_metrics(self, record: dict[str, Any]) -> None:
        try:
            with os.fdopen(open_regular(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
                f.write(json_line(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise WriteError(f"cannot write the run's metrics {self.metrics_path}: {e.strerror or e}") from None

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl, each a JSON object; a line that is none (cut by a crash
        mid-write, or damaged) is left out, so what reads them (plot, a resume) meets records only."""
        records = []
        for line in self._metrics_lines():
            with contextlib.suppress(ValueError, RecursionError):  # not JSON, an integer of > 4300 digits, deep nesting
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def metrics_values(self) -> list[Any]:
        """Every line of metrics.jsonl that parses, whatever it holds, for a reader that reports a
        damaged run rather than leaving its lines out (the server's list); a line cut by a crash
        mid-write is left out. RecursionError for a line nested too deeply to parse."""
        values = []
        for line in self._metrics_lines():
            with contextlib.suppress(json.JSONDecodeError):
                values.append(json.loads(line))
        return values

    def _metrics_lines(self) -> list[str]:
        if not self.metrics_path.exists() and not self.metrics_path.is_symlink():
            return []
        try:
            return read_regular(self.metrics_path).splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read {self.metrics_path}: {e}") from None

    def truncate_metrics(self, last_epoch: int, last_step: int | None = None) -> None:
        """Drop the records after the checkpoint's step `last_step` (where a record has its step;
        else after `last_epoch`): a crash may have logged epochs and validations no checkpoint holds."""

        def held(r: dict[str, Any]) -> bool:
            step = r.get("global_step")
            return step <= last_step if last_step is not None and type(step) is int else r.get("epoch", 0) <= last_epoch

        kept = [r for r in self.read_metrics() if held(r)]
        write_text_atomic(self.metrics_path, "".join(json_line(r) + "\n" for r in kept), "run's metrics")


HOLD_TRIES, HOLD_WAIT_S = 4, 0.05  # a refused exclusive hold is tried again for 0.15 s


def hold(fd: int, shared: bool = False) -> bool:
    """Take the run's lock on `fd` without waiting for a training: False if one holds it. A
    refused exclusive hold is tried again for a moment, since `holder` (lstmlm runs) takes a
    shared one for an instant to ask; a shared hold is only asked once."""
    for attempt in range(1 if shared else HOLD_TRIES):
        if attempt:
            time.sleep(HOLD_WAIT_S)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def _own_directory(root: Path) -> Path:
    """`root`, unless it is a symbolic link: a run is a directory of its own (`lstmlm runs` and
    serve take no link for a run), and a link would have a training write outside the runs
    directory, wherever it points."""
    root = Path(root)
    if root.is_symlink():
        raise CheckpointError(f"refusing to open the run {root}: it is a symbolic link, and a run is a directory of its own")
    return root


def latest_run(runs_dir: Path) -> RunStore:
    """The run whose latest checkpoint was written most recently."""
    found = Path(runs_dir).glob(f"*/{LATEST}{CHECKPOINT_SUFFIX}") if Path(runs_dir).is_dir() else []
    candidates = [p for p in found if p.is_file() and not p.is_symlink() and not p.parent.is_symlink()]
    if not candidates:
        raise CheckpointError(f"no trained run in {runs_dir} (train one with: lstmlm train)")
    return RunStore(max(candidates, key=lambda p: p.stat().st_mtime).parent)
