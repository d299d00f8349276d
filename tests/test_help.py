"""Every command's --help, as a user's terminal shows it.

Typer reads help texts as Rich markup, so a bracket in one is a style tag unless escaped:
`pip install 'lstmlm[plot]'` printed as `pip install 'lstmlm'` and the glob `'src/**/*.[ch]'` as
`'src/**/*.'`. Each help is read in a real process, on a terminal wide enough that nothing wraps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import typer
from rich.errors import StyleSyntaxError
from rich.style import Style

from lstmlm.cli.app import app

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
EXTRAS = set(tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["optional-dependencies"])

# What a command cannot run without, and so names in its help
NEEDS = {"plot": "plot", "export": "export", "serve": "serve", "tune": "tune", "train": "tensorboard"}


def commands() -> list[tuple[tuple[str, ...], typer.core.TyperCommand]]:
    """Every command and group, as (its words after `lstmlm`, the click command)."""
    found = []

    def walk(command: typer.core.TyperCommand, words: tuple[str, ...]) -> None:
        found.append((words, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*words, name))

    walk(typer.main.get_command(app), ())
    return found


COMMANDS = commands()


@cache
def shown_help(words: tuple[str, ...]) -> str:
    env = {**os.environ, "TERMINAL_WIDTH": "1000", "COLUMNS": "1000", "NO_COLOR": "1"}
    done = subprocess.run([sys.executable, "-m", "lstmlm", *words, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def written_brackets(command: typer.core.TyperCommand) -> list[str]:
    """The bracketed words in a command's help texts as written (`\\[` being Rich's escape),
    leaving out the ones that are Rich's own tags ([bold], [/])."""
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    return [word for text in texts for word in re.findall(r"\\?\[([^\]]*)\]", text) if not is_style(word)]


def is_style(word: str) -> bool:
    if word.startswith("/"):
        return True
    try:
        Style.parse(word)
    except StyleSyntaxError:
        return False
    return True


@pytest.mark.parametrize(("words", "command"), COMMANDS, ids=[" ".join(words) or "lstmlm" for words, _ in COMMANDS])
def test_help_keeps_every_bracket_it_was_written_with(words: tuple[str, ...], command: typer.core.TyperCommand) -> None:
    shown = shown_help(words)
    for word in written_brackets(command):
        assert f"[{word}]" in shown, f"lstmlm {' '.join(words)} --help lost the brackets of [{word}]"
    for extra in re.findall(r"pip install '([^']*)'", shown):
        assert re.fullmatch(r"lstmlm\[(\w+)\]", extra) and extra[7:-1] in EXTRAS, f"lstmlm {' '.join(words)} --help: pip install '{extra}'"


@pytest.mark.parametrize("name", sorted(NEEDS))
def test_a_command_that_needs_an_extra_names_it_in_its_help(name: str) -> None:
    extra = NEEDS[name]
    assert extra in EXTRAS
    assert f"pip install 'lstmlm[{extra}]'" in shown_help((name,))


def test_the_glob_example_keeps_its_character_class() -> None:
    assert "'src/**/*.[ch]'" in shown_help(("train",))


def test_inspects_gate_help_names_every_cells_gates() -> None:
    """--gate's help listed the LSTM's and the GRU's gates, not the RNN's, whose one gate is all
    `inspect` on an RNN takes (the gates as the cells give them, each cell by its title)."""
    from lstmlm import cells

    shown = " ".join(re.sub(r"[│\s]+", " ", shown_help(("inspect",))).split())
    for cell in cells.every():
        names = ", ".join(gate.name for gate in cell.gates)
        assert f"the {cell.title}'s {names}" in shown, f"inspect --help: the {cell.title}'s gates"
