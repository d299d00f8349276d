"""`lstmlm generate`: a prefix continued by a trained model, streamed as it is made."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from . import options
from .console import err, out, visible


def generate(
    run: options.Run = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Text to continue.")] = "time traveller",
    length: Annotated[int, typer.Option("--length", min=0, help="Characters to generate.")] = 50,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 = greedy (the seed); > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0, help="Sample among the k most likely characters (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Sample within this probability mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, max=2**64 - 1, help="Seed for sampling (same seed, same text).")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Independent continuations.")] = 1,
    model: Annotated[str | None, typer.Option("--model", help="Run the weights on scratch or cudnn (default: as trained).")] = None,
    device: options.Device = "cpu",
    precision: options.Precision = "fp32",
    best: options.Best = False,
    prime: Annotated[bool, typer.Option("--prime/--no-prime", help="Read the end of the training text before the prefix (raw-mode runs).")] = True,
    runs_dir: options.RunsDir = DEFAULT_RUNS_DIR,
    raw_output: Annotated[
        bool,
        typer.Option("--raw-output", help="Write control characters as they are, even to a terminal (they always are into a pipe or a file)."),
    ] = False,
) -> None:
    """Continue a prefix with a trained model, streaming the characters.

    On a terminal, control characters other than newline and tab are shown as ␛, ␍, ... (a model
    can make escape sequences); piped or redirected, the text is written as it is."""
    from ..generate import Sampling
    from ..session import start_generation

    sampling = Sampling(length, temperature, top_k, top_p, num_samples, seed)
    generation = start_generation(runs_dir, run, prefix, sampling, model, best, device, precision, prime)
    if generation.normalized:
        err.print(f"[dim]prefix normalized as the model was trained (d2l): {escape(repr(generation.prefix))}[/]")
    show = (lambda text: text) if raw_output or not sys.stdout.isatty() else visible
    if num_samples == 1:
        sys.stdout.write(show(generation.prefix))
        for chars in generation.steps:
            sys.stdout.write(show(chars[0]))
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    samples = [generation.prefix] * num_samples
    for chars in generation.steps:
        samples = [s + c for s, c in zip(samples, chars)]
    for i, sample in enumerate(samples, 1):
        out.print(f"[dim]--- sample {i}[/]")
        out.print(escape(show(sample)), soft_wrap=True)
