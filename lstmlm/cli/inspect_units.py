"""`lstmlm inspect`: a text coloured by single units of a model's cell in the terminal, units ranked by a
feature, gate saturation; the whole analysis as an HTML page with --html.

(Not named inspect.py: a module of that name beside `options.py`, which imports the standard
library's `inspect`, would read as if it shadowed it.)"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import err, out, visible

if TYPE_CHECKING:
    from ..units import Inspection, Saturation

TERMINAL_CHARS = 2000  # the terminal shows this much of a long text; the HTML page shows all


def inspect_(
    run: options.Run = None,
    text: Annotated[str | None, typer.Option("--text", help="The text to read through the model.")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="Read the text from a UTF-8 file instead.")] = None,
    layer: Annotated[int | None, typer.Option("--layer", min=0, help="Layer to show (default: the last; --find searches all).")] = None,
    units: Annotated[list[int] | None, typer.Option("--unit", min=0, help="A unit to colour the text by; repeat for several.")] = None,
    gate: Annotated[
        str | None,
        typer.Option(
            "--gate",
            # written out, as the cells give them (importing the cells is importing torch); tests/test_help.py holds them equal
            help="The gate to colour by, of the model's cell: the LSTM's input, forget, output, candidate, hidden, cell; "
            "the GRU's reset, update, candidate, hidden; the RNN's hidden (default: the LSTM's cell, else hidden).",
        ),
    ] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML page with every unit browsable.")] = None,
    find: Annotated[str | None, typer.Option("--find", help="Rank units by |correlation| with being inside a match of this regex.")] = None,
    top: Annotated[int, typer.Option("--top", min=1, help="Units to list with --find and to colour without --unit.")] = 3,
    best: options.Best = False,
    force: options.Force = False,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
) -> None:
    """Colour a text by single units of the model's cell (the paper's quote cell), rank units by a feature, show gate saturation.

    Without --unit the text is coloured by the best units for --find, or else by the units that vary most.
    """
    from ..inference import inspect_run
    from ..units import nothing_saturates, saturation

    result = inspect_run(runs_dir, run, text, file, gate, layer, units, find, top, best, html_out, force)
    seen = result.inspection
    if seen.normalized:
        err.print("[dim]text normalized as the model was trained (d2l)[/]")
    if seen.unknown:
        from ..vocab import describe_chars

        err.print(f"[yellow]read as <unk>, outside the vocabulary:[/] {escape(visible(describe_chars(seen.unknown)))}")
    if seen.ranking:
        out.print(f"[bold]{escape(seen.gate.name)} units tracking[/] {escape(visible(find or ''))}", soft_wrap=True)  # a long regex stays whole
        out.print(ranking_table(seen, top))
    show_units(seen)
    out.print()
    none = nothing_saturates(seen.layers[0].cell)
    out.print(f"[dim]{escape(none)}[/]" if none else saturation_table(saturation(seen.layers)))
    if html_out is not None:
        out.print(f"wrote {escape(visible(str(html_out)))}", soft_wrap=True)


def show_units(seen: Inspection) -> None:
    """The text (its first TERMINAL_CHARS characters) once per chosen unit, coloured by it."""
    from ..units import level, span_feature

    shown = seen.text[:TERMINAL_CHARS]
    inside = span_feature(seen.text, seen.find)[: len(shown)].bool().tolist() if seen.find else [False] * len(shown)
    scores = {(s.layer, s.unit): s.correlation for s in seen.ranking}
    for k, u in seen.chosen:
        values = seen.layers[k].gate(seen.gate.name)[: len(shown), u]
        r = f"  r = {scores[(k, u)]:+.3f}" if (k, u) in scores else ""
        out.print(f"\n[bold]layer {k} unit {u}[/] {seen.gate.name}{r}  [dim]{float(values.min()):+.2f} … {float(values.max()):+.2f}[/]")
        out.print(coloured(shown, level(seen.gate, values).tolist(), inside))
    if len(seen.text) > len(shown):
        out.print(f"[dim](the first {len(shown):,} of {len(seen.text):,} characters; --html shows them all)[/]")


def coloured(text: str, levels: list[float], inside: list[bool]) -> Text:
    """Each character on its level's colour (units.colour), light text on the dark ends; matches underlined."""
    from ..units import colour

    line = Text()
    for c, lvl, m in zip(text, levels, inside):
        r, g, b = colour(round(lvl, 2))
        ink = "white" if abs(lvl) > 0.6 else "black"
        line.append(visible(c), f"{ink} on rgb({r},{g},{b}){' underline' if m else ''}")
    return line


def ranking_table(seen: Inspection, top: int) -> Table:
    table = Table()
    for name in ("rank", "layer", "unit", "r"):
        table.add_column(name, justify="right")
    for rank, s in enumerate(seen.ranking[:top], 1):
        table.add_row(str(rank), str(s.layer), str(s.unit), f"{s.correlation:+.3f}")
    return table


def saturation_table(stats: list[Saturation]) -> Table:
    from ..units import SATURATION_HEADER, saturation_rows

    table = Table(title="gate saturation: fraction of time < 0.1 (closed) and > 0.9 (open)", title_justify="left")
    for name in SATURATION_HEADER:
        table.add_column(name, justify="right")
    for row in saturation_rows(stats):
        table.add_row(*row)
    return table
