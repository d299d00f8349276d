"""`lstmlm evaluate`: perplexity and bits per character of a text under a trained model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import out, print_json, visible


def evaluate(
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file to score.")],
    run: options.Run = None,
    best: options.Best = False,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON line.")] = False,
) -> None:
    """Perplexity and bits per character of a text under a trained model."""
    from ..session import evaluate_file

    score = evaluate_file(runs_dir, run, file, best, device, precision)
    if as_json:
        print_json({"file": str(file), **dataclasses.asdict(score)})
        return
    out.print(f"{escape(visible(str(file)))}: perplexity {score.perplexity:.3f}, {score.bits_per_char:.3f} bits per character "
              f"({score.predicted:,} characters predicted, {score.unknown_characters:,} outside the vocabulary)", soft_wrap=True)  # fmt: skip
