"""`lstmlm runs`: what has been trained under a runs directory — each run summed up from its
own files (runsummary.py), listed and sorted, one found by name, or removed while no training
holds it."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import CheckpointError, ConfigError
from .runs import DEFAULT_RUNS_DIR, RunStore, check_run_name, hold, open_regular, resume_command
from .runsummary import Run, summarize

SORTS = ("best", "time", "name")


# ---- listing ------------------------------------------------------------------------------------


def list_runs(runs_dir: Path, sort: str = "time") -> list[Run]:
    """Every run under `runs_dir`, sorted: `best` (lowest validation bits first, runs without
    one last), `time` (the last changed first) or `name`. Each directory there is a run (one
    that is not is an unreadable row), and so is a symbolic link in a run's place; files (a
    tune study's database) and hidden entries (a corpus's scratch store) are not runs."""
    if sort not in SORTS:
        raise ConfigError(f"--sort must be one of {', '.join(SORTS)}, not {sort!r}")
    root = Path(runs_dir)
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".") and (e.is_symlink() or e.is_dir(follow_symlinks=False))]
    except FileNotFoundError:
        raise CheckpointError(f"no runs directory {root} (train a run with: lstmlm train)") from None
    except NotADirectoryError:
        raise CheckpointError(f"--runs-dir {root} is a file, not a directory of runs") from None
    except OSError as e:
        raise CheckpointError(f"cannot read the runs directory {root}: {e.strerror or e}") from None
    return sort_runs([summarize(Path(e.path)) for e in entries], sort)


def sort_runs(runs: list[Run], by: str) -> list[Run]:
    if by == "best":
        return sorted(runs, key=lambda r: (r.best_val_bits is None, r.best_val_bits or 0.0, r.name))
    if by == "time":
        return sorted(runs, key=lambda r: (-r.changed, r.name))
    return sorted(runs, key=lambda r: r.name)


def find_run(runs_dir: Path, name: str) -> Path:
    """The entry `name` under `runs_dir` (a directory, or a symbolic link in its place)."""
    path = Path(runs_dir) / check_run_name(name)
    if not os.path.lexists(path):
        raise CheckpointError(f"no run {name} in {runs_dir} (lstmlm runs --runs-dir {runs_dir} lists them)")
    if not (path.is_symlink() or path.is_dir()):
        raise CheckpointError(f"{path} is a file, not a run")
    return path


def show_run(runs_dir: Path, name: str) -> Run:
    """The run `name`, its config kept (`Run.config`) for `lstmlm runs show`."""
    return summarize(find_run(runs_dir, name))


def continue_command(runs_dir: Path, run: Run) -> str | None:
    """The command that continues `run`; None if it cannot be: no checkpoint to continue from, or
    a config that cannot be read."""
    return resume_command(run.name, runs_dir) if run.checkpoint and run.config is not None else None


def remove_command(runs_dir: Path, run: Run) -> str:
    """The command that deletes `run`, as a shell reads it: in its runs directory (not the
    default's run of that name), its name quoted (a space, a `$(...)`), after `--` where it
    starts with a dash (which would read as an option)."""
    words = ["lstmlm", "runs", "rm"] + (["--runs-dir", str(runs_dir)] if runs_dir != DEFAULT_RUNS_DIR else [])
    return shlex.join([*words, *(["--"] if run.name.startswith("-") else []), run.name])


# ---- removing -------------------------------------------------------------------------------------


def check_removable(path: Path) -> None:
    """Refuse to remove a run a training holds (CheckpointError naming its pid)."""
    if path.is_symlink():  # a link in a run's place: removing it removes the link alone
        return
    try:
        pid = RunStore(path).holder()
    except CheckpointError:  # a lock that is a symbolic link: no training can hold it
        return
    if pid is not None:
        raise CheckpointError(f"run {path.name} is training now (pid {pid or '?'}): stop it first, then remove it")


def remove_run(path: Path) -> None:
    """Delete the run at `path` (found with `find_run`), holding its lock while it goes, so a
    training cannot start in it meanwhile. Nothing outside it is touched: a symbolic link in a
    run's place is removed, not followed, and so is every link inside it (shutil.rmtree)."""
    if path.is_symlink():
        path.unlink()
        return
    with _held(path):
        shutil.rmtree(path)


@contextlib.contextmanager
def _held(root: Path) -> Iterator[None]:
    """The run's lock for its removal; CheckpointError if a training holds it."""
    try:
        fd = open_regular(root / ".lock", os.O_RDONLY)
    except (FileNotFoundError, CheckpointError):  # none, or one no training can open: nothing to wait for
        yield
        return
    try:
        if not hold(fd):
            raise CheckpointError(f"run {root.name} is training now: stop it first, then remove it")
        yield
    finally:
        os.close(fd)
