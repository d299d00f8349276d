"""`lstmlm tune`: the study's setting in a line, a row of the table of trials as each ends (a bar
follows the running one's validations), the best trial and its config at the end; or JSON lines
with --json. Needs Optuna: pip install 'lstmlm[tune]'."""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import corpus_progress, err, out, print_json, visible
from .shared import short_count

if TYPE_CHECKING:
    from ..tune import Study, StudyEnded, TrialEnded, TuneEvent


class Pruner(str, Enum):  # a choice Typer checks (a wrong one is a usage error)
    median = "median"
    halving = "halving"


@options.config_options("max_minutes")  # --minutes is each trial's
def tune(
    minutes: Annotated[float, typer.Option("--minutes", min=0.01, help="Each trial's training time; the best trial's config trains this long.")],
    trials: Annotated[int, typer.Option("--trials", min=0, help="Trials this process runs (0: only write the best config so far).")] = 20,
    study: Annotated[str | None, typer.Option("--study", help="The study: processes given one name and storage share it (default: corpus-model-Mm).")] = None,
    storage: Annotated[
        str | None,
        typer.Option("--storage", envvar="LSTMLM_TUNE_STORAGE", help="A SQLAlchemy URL (postgresql://host/db); default: RUNS_DIR/tune-STUDY.db, SQLite."),
    ] = None,
    pruner: Annotated[Pruner, typer.Option("--pruner", help="median or halving (successive halving).")] = Pruner.median,
    startup_trials: Annotated[int, typer.Option("--startup-trials", min=0, help="Trials the median pruner lets finish before it prunes any.")] = 5,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Where the best trial's config goes (default: RUNS_DIR/STUDY-best.toml).")] = None,
    force: options.Force = False,
    config_file: options.ConfigFile = None,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print only JSON lines: one per trial and a last 'done'.")] = False,
    **overrides: Any,
) -> None:
    """Search model and training settings on Optuna: each trial a real training of --minutes, pruned on its validation curve; the options given are fixed.
    Needs: pip install 'lstmlm\\[tune]'."""
    from .. import tune as tuning
    from ..training import StopFlag

    setup = tuning.Setup(minutes, overrides, config_file, runs_dir, study, storage, pruner.value, startup_trials)
    with corpus_progress() as progress:
        opened = tuning.open_study(setup, progress)
    if not as_json:
        out.print(study_line(opened), soft_wrap=True, markup=False)
    stop = StopFlag()
    again = tuning.continue_command(setup, opened.name, trials)
    try:
        with stop.installed():
            ended = render(tuning.run_study(opened, trials, stop, output, force), as_json)
    except KeyboardInterrupt:  # Ctrl-C twice: the trial was told failed on the way out
        err.print(f"stopped: the running trial is marked failed; continue the study with: {visible(again)}", markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    report(ended, as_json)
    if ended.reason == "interrupted":
        err.print(f"stopped: the running trial is marked failed; continue the study with: {visible(again)}", markup=False, soft_wrap=True)
        raise typer.Exit(128 + (stop.signal or signal.SIGINT))


def study_line(study: Study) -> str:
    fixed = ", ".join(f"{k} {v}" for k, v in study.setup.fixed.items()) or "none"
    made = "new" if study.created else f"{study.trials_before} trials so far"
    searched = ", ".join(d.key for d in study.space) or "nothing (every setting is fixed)"
    return f"study {visible(study.name)} in {visible(study.shown)} ({made}): {study.setup.minutes:g} min a trial; searching {searched}; fixed: {visible(fixed)}"


def render(events: Iterator[TuneEvent], as_json: bool) -> StudyEnded:
    """A row per trial as it ends (the header above the first), a transient bar on stderr
    following the running trial's validations, on a terminal only (in a pipe or a log, Rich's
    transient bar leaves a blank line on stderr)."""
    from ..tune import VALIDATIONS, StudyEnded, TrialEnded, TrialEvaluated, TrialStarted

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err, transient=True, disable=as_json or not err.is_terminal)
    rows = 0
    with bar:
        task = None
        for event in events:
            if isinstance(event, TrialStarted):
                task = bar.add_task(f"trial {event.number}", total=VALIDATIONS)
            elif isinstance(event, TrialEvaluated) and task is not None:
                bar.update(task, completed=event.step, description=f"trial {event.number}: {event.val_loss:.3f} nats" + (" (pruned)" if event.prune else ""))
            elif isinstance(event, TrialEnded):
                if task is not None:
                    bar.remove_task(task)
                    task = None
                if as_json:
                    print_json({"event": "trial", **dataclasses.asdict(event), "val_bits": event.val_bits})
                else:
                    out.print(trial_row(event, header=rows == 0))  # on a terminal, above the bar (which redirects stdout)
                rows += 1
            elif isinstance(event, StudyEnded):
                return event
    raise AssertionError("the study ended without a StudyEnded event")


COLUMNS = (("trial", 5), ("state", 8), ("val nats", 8), ("bpc", 6), ("params", 7), ("min", 5))


def trial_row(trial: TrialEnded, header: bool) -> Table:
    """One trial as a row of a table whose columns keep their widths from row to row."""
    table = Table(box=None, show_header=header, padding=(0, 1), header_style="bold", show_edge=False)
    for name, width in COLUMNS:
        table.add_column(name, width=width, justify="right" if name != "state" else "left", no_wrap=True)
    table.add_column("settings", overflow="fold")
    style = {"complete": "green", "pruned": "yellow", "failed": "red"}.get(trial.state, "")
    nats = f"{trial.val_loss:.4f}" if trial.val_loss is not None else "–"
    bits = f"{trial.val_bits:.3f}" if trial.val_bits is not None else "–"
    size = short_count(trial.parameters) if trial.parameters is not None else "–"
    note = f" ({escape(visible(trial.reason))})" if trial.reason else ""
    settings = escape(settings_text(trial.settings)) + f"[dim]{note}[/]"
    table.add_row(str(trial.number), f"[{style}]{trial.state}[/]", nats, bits, size, f"{trial.minutes:.1f}", settings)
    return table


def settings_text(settings: dict[str, Any]) -> str:
    """'2×512 emb 48 · adamw lr 3.2e-03 wd 0.01 cosine warm 120 · 32×100 · dropout 0.1' (the
    fields in SPACE's order; a field not named here as `key value`)."""
    s = dict(settings)
    parts = []
    if "hidden" in s or "layers" in s:
        parts.append(f"{s.pop('layers', 1)}×{s.pop('hidden', '?')}" + (f" emb {s.pop('embedding')}" if "embedding" in s else ""))
    train = [str(s.pop("optimizer"))] if "optimizer" in s else []
    for key, name in (("lr", "lr"), ("weight_decay", "wd"), ("schedule", ""), ("warmup_steps", "warm")):
        if key in s:
            train.append(f"{name} {_number(s.pop(key))}".strip())
    if train:
        parts.append(" ".join(train))
    if "batch_size" in s or "num_steps" in s:
        parts.append(f"{s.pop('batch_size', '?')}×{s.pop('num_steps', '?')}")
    parts += [f"{key} {_number(value)}" for key, value in s.items()]
    return " · ".join(parts)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 1e-2 else f"{value:.3g}"
    return str(value)


def report(ended: StudyEnded, as_json: bool) -> None:
    states = ", ".join(f"{n} {state}" for state, n in ended.states.items() if n)
    if as_json:
        best = dataclasses.asdict(ended.best) if ended.best else None
        print_json({"event": "done", "reason": ended.reason, "states": ended.states, "output": str(ended.output) if ended.output else None, "best": best})
        return
    out.print(f"{sum(ended.states.values())} trials in the study: {states or 'none'}", markup=False)
    if ended.best is None or ended.output is None:
        out.print("no trial has completed yet: no best config", markup=False)
        return
    b = ended.best
    bits = b.val_loss / math.log(2)
    out.print(f"best: trial {b.number}, {b.val_loss:.4f} nats ({bits:.3f} bits) per token, run {visible(b.run)}", markup=False, soft_wrap=True)
    out.print(f"wrote {visible(str(ended.output))}; train it with: lstmlm train --config {visible(str(ended.output))}", markup=False, soft_wrap=True)
