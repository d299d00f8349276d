"""`lstmlm generate`: a prefix continued by a trained model, streamed as it is made; with
--interactive, a prompt loop that continues each line typed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from ..runs import DEFAULT_RUNS_DIR
from ..sampling import D2L_PREFIXES, Sampling
from . import options
from .console import err, out, visible
from .errors import fail, one_line

if TYPE_CHECKING:
    from ..inference import Conversation, Generation

ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


@options.with_field_options(Sampling)
def generate(
    run: options.Run = None,
    prefix: Annotated[str, typer.Option("--prefix", help="Text to continue.")] = D2L_PREFIXES[0],
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="A prompt loop: each line typed is continued (Ctrl-D ends it).")] = False,
    carry: Annotated[bool, typer.Option("--carry", help="With --interactive: each turn reads on from where the last one ended.")] = False,
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
    **options: Any,
) -> None:
    """Continue a prefix with a trained model, streaming the characters.

    On a terminal, control characters other than newline and tab are shown as ␛, ␍, ... (a model
    can make escape sequences); piped or redirected, the text is written as it is."""
    from ..inference import Conversation, load, start_generation

    if carry and not interactive:
        raise typer.BadParameter("--carry keeps the state between the turns of --interactive", param_hint="--carry")
    sampling = Sampling(**{**options, "stop": tuple(unescape(s) for s in options["stop"] or ())})
    raw = raw_output or not sys.stdout.isatty()
    if interactive:
        trained = load(runs_dir, run, model, best, device, precision)
        converse(Conversation(trained, sampling, trained.precision, prime, carry), raw)
        return
    show(start_generation(runs_dir, run, prefix, sampling, model, best, device, precision, prime), raw)


def unescape(text: str) -> str:
    r"""\n, \t, \r and \\ as the characters they name; any other backslash stays as it is."""
    chars, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in ESCAPES:
            chars.append(ESCAPES[text[i + 1]])
            i += 2
        else:
            chars.append(text[i])
            i += 1
    return "".join(chars)


def write(text: str, raw: bool) -> None:
    """Generated text onto stdout as it is made: the one place it is written. Unless `raw` (a
    pipe, a file, --raw-output), control characters are shown, not acted on (console.visible)."""
    sys.stdout.write(text if raw else visible(text))
    sys.stdout.flush()


def show(generation: Generation, raw: bool) -> None:
    """One sample streamed as prefix + continuation on a line; several, each under a header once made."""
    if generation.normalized:
        err.print(f"[dim]prefix normalized as the model was trained (d2l): {escape(visible(repr(generation.prefix)))}[/]")
    steps = generation.steps
    if len(steps.ended) == 1:
        write(generation.prefix, raw)
        for made in steps.as_made():  # a write a chunk, not a character
            write("".join(chars[0] for chars in made), raw)
        write("\n", raw)
        return
    for _ in steps:
        pass
    for i, sample in enumerate(steps.text, 1):
        out.print(f"[dim]--- sample {i}[/]")
        write(generation.prefix + sample + "\n", raw)  # not through Rich, which drops control characters


def converse(conversation: Conversation, raw: bool) -> None:
    """Read a prefix per line and continue it, until end of input (Ctrl-D) or Ctrl-C at the
    prompt. Ctrl-C during a continuation ends that one and prompts again; a prefix the model
    cannot read is one error line, and the loop goes on."""
    from ..errors import LstmlmError

    prompt = "> " if sys.stdin.isatty() and sys.stdout.isatty() else ""
    if prompt:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    while True:
        try:
            line = input(prompt) if prompt else read_line()
        except (EOFError, KeyboardInterrupt):
            if prompt:
                write("\n", raw)  # the shell's prompt on a line of its own
            return
        generation = None
        try:
            generation = conversation.turn(line)
            show(generation, raw)
        except KeyboardInterrupt:
            write("\n", raw)
        except LstmlmError as e:
            fail(one_line(e, "generate"))  # printed; the loop goes on
        finally:
            if generation is not None:
                generation.steps.close()


def read_line() -> str:
    """A line of piped input without its line break; EOFError at the end."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.removesuffix("\n").removesuffix("\r")
