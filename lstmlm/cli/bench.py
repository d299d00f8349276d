"""`lstmlm bench`: what this machine does, as a table or JSON lines."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import options
from .console import out, print_json

if TYPE_CHECKING:
    from ..bench import Report, Row


def bench(
    config_file: Annotated[Path | None, typer.Option("--config", help="Model and batch shapes to measure (default: the d2l model).")] = None,
    device: options.Device = "auto",
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16, auto, or both.")] = "fp32",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps per core.")] = 20,
    vocab_size: Annotated[int, typer.Option("--vocab-size", min=2, help="Vocabulary size (28: The Time Machine in d2l mode).")] = 28,
    tf32: Annotated[bool, typer.Option("--tf32", help="On a CUDA GPU, let fp32 products use TF32, as `train --tf32` does.")] = False,
    as_json: options.Json = False,
) -> None:
    """Measure this machine: matrix-product ceiling, training tokens/s of both cores, generation chars/s."""
    from .. import bench as b

    report = b.run(str(config_file) if config_file else None, device, precision, steps, vocab_size, tf32)
    if not report.is_main:
        return
    if as_json:
        print_json({"event": "machine", **dataclasses.asdict(report.machine)})
        for row in report.rows:
            print_json({"event": "bench", "what": row.measure, "precision": row.precision, **(row.raw or {"skipped": row.skipped})})
        return
    m = report.machine
    gpu = f", {m.gpu}, TF32 {'on' if m.tf32 else 'off'}" if m.gpu else ""
    out.print(f"machine: {m.cpu}, {m.cores} cores, {m.torch_threads} torch threads, {m.cpu_capability}, "
              f"native bf16 {'yes' if m.native_bf16 else 'no'}{gpu}, torch {m.torch}; "
              f"--precision auto picks {m.auto_precision}; the scratch core's recurrence: {escape(m.recurrence)}", soft_wrap=True)  # fmt: skip
    out.print(table(report))


def table(report: Report) -> Table:
    d = report.dims
    cell = d.cell if d.form == "cudnn" else f"{d.cell} ({d.form} form)"
    title = (f"{report.device}: {cell}, hidden {d.hidden}, {d.layers} layer(s), batch {d.batch_size}, {d.num_steps} steps, "
             f"vocab {d.vocab_size} — {report.flops_per_token:,} FLOPs per trained token")  # fmt: skip
    t = Table(title=escape(title))
    for column in ("measure", "precision", "figure", "of ceiling", "peak memory"):
        t.add_column(column, justify="left" if column in ("measure", "precision") else "right")
    for row in report.rows:
        share = f"{row.of_ceiling:.0%}" if row.of_ceiling is not None else ""
        memory = f"{row.memory / 2**20:,.0f} MiB" if row.memory else ""
        t.add_row(escape(row.measure), escape(row.precision), escape(figure(row)), share, memory)
    return t


def figure(row: Row) -> str:
    if row.value is None:
        return f"skipped: {row.skipped}"
    number = f"{row.value:,.1f}" if row.unit == "GFLOP/s" else f"{row.value:,.0f}"
    scaling = f" ({row.scaling:.2f}× one)" if row.scaling is not None else ""
    return f"{number} {row.unit}{scaling}"
