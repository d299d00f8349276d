"""Options that several commands share, declared once: the same flag means the same everywhere."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_origin, get_type_hints

import typer
from rich.markup import escape

from .. import config
from ..cadences import Cadence
from ..fields import flag_of

Run = Annotated[
    str | None,
    typer.Option(
        "--run", "--name",
        help="A run's name under --runs-dir; default: the most recently trained (for train: a new run, corpus-model). "
        "Under torchrun, say --name.",
    ),
]  # fmt: skip


def directory(value: str) -> Path:
    """A directory given on the command line: '' (say, "$RUNS" unset) is refused, where as a
    Path it is '.' and runs would be made and looked for among this directory's folders."""
    if not value:
        raise typer.BadParameter("is empty: give a directory ('.' for this one)")
    return Path(value)


RunsDir = Annotated[Path, typer.Option("--runs-dir", help="Where runs are kept.", envvar="LSTMLM_RUNS", parser=directory)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or mps.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32, bf16 or auto (bf16 where the hardware multiplies it natively).")]
Best = Annotated[bool, typer.Option("--best", help="Use the best-validation checkpoint instead of the latest.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON lines on stdout, nothing else.")]
ConfigFile = Annotated[Path | None, typer.Option("--config", help="A TOML config (see configs/); options override it.")]
Force = Annotated[bool, typer.Option("--force", help="Replace the output file if it exists (never a file in a run's directory).")]


def with_config_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Give `command` one option per config field (`--batch-size` for batch_size, the field's
    help text, default: unset), passed on in `**overrides`: the config is the one list of them.
    A field of choices takes any string here; the config refuses a wrong one by name."""
    return config_options()(command)


def config_options(*exclude: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`with_config_options` without the fields in `exclude` (a command that sets them itself)."""
    return lambda command: _add_config_options(command, exclude)


def _add_config_options(command: Callable[..., Any], exclude: tuple[str, ...]) -> Callable[..., Any]:
    hints = get_type_hints(command, include_extras=True)
    own = [  # resolved here: a signature set by hand is not evaluated again
        p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    generated = []
    for f in config.all_fields():
        if f.name in exclude:
            continue
        kind = str if get_origin(f.type) is Literal or f.type is Cadence else f.type  # the config parses them
        # Typer reads a help text as Rich markup; a config's help is plain text, where '*.[ch]' and
        # 'lstmlm[tensorboard]' would lose their brackets
        flag = typer.Option(f"--{f.name.replace('_', '-')}", help=escape(f.help))
        annotation = Annotated[kind | None, flag]  # type: ignore[valid-type]
        generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        hints[f.name] = annotation
    command.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]
    command.__annotations__ = hints
    return command


STOP_ESCAPES = r"; \n, \t, \\ are escapes)."


def with_field_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of the dataclass `cls`, declared with `fields.option`
    (its flag, help, default and bounds), passed on in its `**kwargs`: the dataclass is the one
    list of them — `Sampling` for generate and the HTTP API, `Limits` for serve. A tuple field
    is a repeatable option (`--stop`)."""

    def add(command: Callable[..., Any]) -> Callable[..., Any]:
        hints = get_type_hints(command, include_extras=True)
        own = [p.replace(annotation=hints[p.name]) for p in inspect.signature(command).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        kinds = get_type_hints(cls)
        generated = []
        for f in dataclasses.fields(cls):
            annotation, default = _field_option(f, kinds[f.name])
            generated.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
            hints[f.name] = annotation
        command.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]
        command.__annotations__ = hints
        return command

    return add


def _field_option(f: dataclasses.Field[Any], kind: Any) -> tuple[Any, Any]:
    """The annotation and default of the option for field `f`."""
    flag, help = flag_of(f), f.metadata["help"]
    if get_origin(kind) is tuple:
        return Annotated[list[str] | None, typer.Option(flag, help=help.removesuffix(").") + STOP_ESCAPES)], None
    shown = f.metadata["shown_default"] or True
    return Annotated[kind, typer.Option(flag, help=help, min=f.metadata["low"], max=f.metadata["high"], show_default=shown)], f.default
