"""`lstmlm runs`: the runs under --runs-dir as a table (or JSON lines); `runs show NAME`, one run
in full and the command that continues it; `runs rm NAME...`, asked first. No torch is loaded."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import runlist, runsummary
from ..data.text import bits_abbreviation
from ..runs import DEFAULT_RUNS_DIR
from ..runsummary import Run
from . import options
from .console import err, out, print_json, visible
from .errors import fail, friendly
from .shared import clock, short_count, two_columns

Sort = Annotated[str, typer.Option("--sort", help="time (the last changed first), best (the lowest validation bits first) or name.")]
Names = Annotated[list[str], typer.Argument(help="Run names under --runs-dir.", show_default=False)]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")]

STATE_STYLE = {runsummary.TRAINING: "bold green", runsummary.DONE: "", runsummary.INTERRUPTED: "yellow", runsummary.UNREADABLE: "red"}

T = TypeVar("T")

WIDE = 10_000  # columns: room enough for any row

app = typer.Typer(rich_markup_mode="rich", add_completion=False)


@app.callback(invoke_without_command=True)
@friendly
def runs(
    ctx: typer.Context,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per run on stdout, nothing else.")] = False,
    sort: Sort = "time",
) -> None:
    """What you have trained: one row per run (model, corpus, tokens, best validation, size, state).

    [bold]lstmlm runs show NAME[/]: one run in full and the command that continues it;
    [bold]lstmlm runs rm NAME...[/]: delete runs."""
    if ctx.invoked_subcommand is not None:
        return
    listed = runlist.list_runs(runs_dir, sort)
    if as_json:
        for run in listed:
            print_json(run.to_json())
        return
    if not listed:
        out.print(f"no runs in {escape(visible(str(runs_dir)))} (train one with: lstmlm train)", soft_wrap=True)
        return
    whole(runs_table(listed))
    out.print(f"[dim]{len(listed)} run(s), {size(sum(r.size for r in listed))} on disk in {escape(visible(str(runs_dir)))}[/]", soft_wrap=True)


@app.command("show")
@friendly
def show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="A run's name under --runs-dir.", show_default=False)],
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run, its config and the command that continues it as one JSON object.")] = False,
) -> None:
    """One run: its config, its history (epochs, best and last validation, tokens, time) and the command that continues it."""
    runs_dir, as_json = given_before(ctx, "runs_dir", runs_dir), given_before(ctx, "as_json", as_json)
    run = runlist.show_run(runs_dir, name)
    command = runlist.continue_command(runs_dir, run)
    if as_json:
        print_json({**run.to_json(), "config": run.config.to_dict() if run.config else None, "continue": command})
        return
    out.print(f"run [bold]{escape(visible(run.name))}[/]  {state_text(run)}  [dim]{escape(visible(str(run.path)))}[/]", soft_wrap=True)
    if run.config is not None:
        whole(config_table(run))
    for line in history(run):
        out.print(line, soft_wrap=True, markup=False)
    if run.problems:
        err.print(f"[red]unreadable:[/] {escape(visible('; '.join(run.problems)))}", soft_wrap=True)
    out.print(continuing(run, command, runlist.remove_command(runs_dir, run)), soft_wrap=True, markup=False)


@app.command("rm")
@friendly
def rm(ctx: typer.Context, names: Names, runs_dir: options.RunsDir = DEFAULT_RUNS_DIR, yes: Yes = False) -> None:
    """Delete runs (asked first, unless --yes); a run that is training is refused."""
    runs_dir = given_before(ctx, "runs_dir", runs_dir)
    paths = list(dict.fromkeys(runlist.find_run(runs_dir, name) for name in names))
    for path in paths:
        runlist.check_removable(path)
    if not yes:
        listed = ", ".join(f"{visible(p.name)} ({size(runsummary.summarize(p).size)})" for p in paths)
        try:
            agreed = typer.confirm(f"delete {listed}?", default=False, err=True)
        except typer.Abort:  # no answer to read (stdin closed): nothing is deleted without one
            err.print()  # end the question's line
            raise fail("nothing deleted: no answer to the question (give --yes to delete without asking)") from None
        if not agreed:
            err.print("nothing deleted", markup=False)
            return
    for path in paths:
        runlist.remove_run(path)
        out.print(f"deleted {escape(visible(path.name))}", soft_wrap=True)


def given_before(ctx: typer.Context, name: str, value: T) -> T:
    """The option `name` as given before the subcommand (`lstmlm runs --runs-dir D rm NAME`) where
    it is not given after it: Click keeps a group's options to the group, and a run shown or
    removed from another directory than the one named is the wrong run."""
    parent = ctx.parent
    if parent is None or on_command_line(ctx, name) or not on_command_line(parent, name):
        return value
    return parent.params[name]  # type: ignore[no-any-return]


def on_command_line(ctx: Any, name: str) -> bool:
    """Whether `name` was given on the command line to `ctx`: Typer's Context or its own copy of
    Click's (a group's), whose ParameterSource Typer does not export, so it is asked by name."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


# ---- rendering ------------------------------------------------------------------------------------


def whole(table: Table) -> None:
    """Print `table` as wide as the terminal lets it be; in a file or a pipe, whole rows at their
    natural width rather than squeezed into 80 columns."""
    if out.is_terminal:
        out.print(table)
    else:  # a table takes its natural width where there is room (Console.print's width is at most the console's)
        Console(highlight=False, emoji=False, width=WIDE).print(table)


def runs_table(listed: list[Run]) -> Table:
    table = Table(box=None, padding=(0, 1), header_style="bold")
    for heading in ("run", "model", "L×H", "params", "corpus", "tokens", "epochs", "val ppl", "bits", "disk", "changed", "state"):
        wraps = heading in ("run", "corpus", "state")  # the others are figures: whole, or not at all
        table.add_column(heading, justify="left" if wraps or heading in ("model", "changed") else "right", no_wrap=not wraps)
    for run in listed:
        table.add_row(
            escape(visible(run.name)),
            escape(visible(f"{run.cell_title} {run.model}")) if run.model else "",
            f"{run.layers}×{run.hidden}" if run.layers else "",
            short_count(run.parameters) if run.parameters is not None else "",
            escape(visible(run.corpus or "")),
            short_count(run.tokens) if run.tokens is not None else "",
            epochs(run),
            f"{run.best_val_perplexity:.3f}" if run.best_val_perplexity else "",
            bits(run),
            size(run.size),
            when(run.changed_at),
            state_text(run),
        )
    return table


def when(moment: datetime | None, now: float | None = None) -> str:
    """A time as `ls -l` gives it: 'May 14 10:46' within the last half year, else 'Nov  3  2024';
    '?' for a file time no date holds."""
    if moment is None:
        return "?"
    recent = abs((now if now is not None else time.time()) - moment.timestamp()) < 183 * 86400
    return moment.strftime("%b %e %H:%M" if recent else "%b %e  %Y")


def epochs(run: Run) -> str:
    if run.epochs is None:
        return ""
    return f"{run.epochs}/{run.planned_epochs}" if run.planned_epochs else str(run.epochs)


def bits(run: Run) -> str:
    return f"{run.best_val_bits:.3f} {bits_abbreviation(run.bits_per)}" if run.best_val_bits is not None else ""


def state_text(run: Run) -> str:
    """The state, coloured, with why: 'done (early stop)', 'unreadable: config.json is not valid JSON'."""
    style = STATE_STYLE.get(run.state, "")
    why = escape(visible(run.why))
    text = f"{run.state}: {why}" if run.state == runsummary.UNREADABLE else f"{run.state} ({why})" if why and why != "completed" else run.state
    return f"[{style}]{text}[/]" if style else text


def size(n: int) -> str:
    """Bytes in decimal units: '812 B', '14.2 kB', '1.3 GB'."""
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def config_table(run: Run) -> Table:
    """The stored config, table by table, in two columns of key and value."""
    assert run.config is not None
    return two_columns([(k, escape(visible(str(v)))) for section in run.config.to_dict().values() for k, v in section.items()])


def history(run: Run) -> list[str]:
    """The history summary: epochs, tokens and time; the best and the last validation."""
    unit = bits_abbreviation(run.bits_per)
    parameters = f", {run.parameters:,} parameters" if run.parameters is not None else ""
    lines = [f"{run.layers}×{run.hidden} {run.cell_title} {run.model}{parameters}, on {run.corpus} ({run.normalize})"] if run.model else []
    if run.epochs is not None:
        spent = f", {clock(run.seconds)} of training" if run.seconds else ""
        limit = run.config.train.max_minutes if run.config else 0
        lines.append(f"trained {epochs(run)} epochs, {run.tokens or 0:,} tokens{spent}" + (f" (at most {limit:g} min a session)" if limit else ""))
    if run.best_val_perplexity:
        at = f" at epoch {run.best_epoch}" if run.best_epoch is not None else ""
        lines.append(f"best validation perplexity {run.best_val_perplexity:.3f} ({run.best_val_bits:.3f} {unit}){at}")
    if run.last_val_perplexity:
        lines.append(f"last validation perplexity {run.last_val_perplexity:.3f}")
    if run.train_perplexity:
        lines.append(f"last training perplexity {run.train_perplexity:.3f}")
    return lines


def continuing(run: Run, command: str | None, remove: str) -> str:
    """How to continue the run, as the state has it (`remove`: the command that deletes it)."""
    if run.config is None:
        return "it cannot be continued while its config.json cannot be read"
    if run.state == runsummary.TRAINING:  # not stopped, so whether it can be continued is not known yet
        return f"training now; once stopped, continue with: {visible(command)}" if command else "training now, with no checkpoint yet"
    if command is None:
        return f"nothing to continue: it stopped before its first checkpoint (delete it with: {visible(remove)})"
    if run.state == runsummary.DONE and run.why == "completed":
        return f"continue with more epochs: {visible(command)} --epochs N"
    return f"continue with: {visible(command)}"
