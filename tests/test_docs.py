"""The docs against the tool they document: serve.md's routes and its examples' answers (the
fields the API answers with; the values are a real session's), train.md's precision cache."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")

from fastapi.testclient import TestClient

from lstmlm.serve.app import create_app

COMMANDS = Path(__file__).resolve().parent.parent / "docs" / "commands"
SERVE_MD = (COMMANDS / "serve.md").read_text(encoding="utf-8")


def example_answer(*fragments: str) -> dict[str, Any]:
    """The JSON the examples show the curl command holding every fragment answering with (the
    line after the command, its continued lines joined)."""
    lines = SERVE_MD.split("## Examples")[1].splitlines()
    for i, line in enumerate(lines):
        if line.startswith("$ curl"):
            end = i
            while lines[end].endswith("\\"):
                end += 1
            command = " ".join(lines[i : end + 1])
            if all(f in command for f in fragments) and lines[end + 1].startswith("{"):
                return dict(json.loads(lines[end + 1]))
    raise AssertionError(f"no example holding {fragments}")


def test_the_api_table_names_every_route() -> None:
    documented = set(re.findall(r"^\| `(?:GET|POST) ([^`]+)` \|", SERVE_MD, re.M))
    routes = {getattr(r, "path", "") for r in create_app(Path("runs")).routes} - {"/static", "/docs/oauth2-redirect"}
    assert documented == routes


def test_the_examples_answers_have_the_fields_the_api_answers_with(tiny_runs: Path) -> None:
    with TestClient(create_app(tiny_runs)) as api:
        inspected = api.post("/api/inspect", json={"run": "raw", "text": "the", "gate": "forget", "units": [7], "top": 2}).json()
        shown = example_answer("/api/inspect")
        assert list(shown) == list(inspected)
        assert shown["gates"] == inspected["gates"]  # an LSTM's gates, whatever the run
        generated = api.post("/api/generate", json={"run": "raw", "prefix": "the", "stream": False}).json()
        assert list(example_answer("/api/generate", '"stream": false}\'')) == list(generated)


def test_train_md_names_the_file_a_timed_precision_is_remembered_in() -> None:
    from lstmlm.precision import REMEMBERED

    train = " ".join((COMMANDS / "train.md").read_text(encoding="utf-8").split())
    assert f"A timed choice is remembered for the machine and the model's shape and batches (in `{REMEMBERED}` in the cache" in train
    assert "or on one machine whose load changes" not in train  # the same command trains in what the first run chose


# ---- every command and option on a page of docs/commands/ ---------------------------------------

PAGES = {
    "download": "download.md",
    "train": "train.md",
    "tune": "tune.md",
    "generate": "generate.md",
    "evaluate": "evaluate.md",
    "bench": "bench.md",
    "plot": "plot-inspect.md",
    "inspect": "plot-inspect.md",
    "serve": "serve.md",
    "export": "export.md",
    "runs": "runs.md",
    "runs show": "runs.md",
    "runs rm": "runs.md",
}


def commands() -> dict[str, Any]:
    """Every command of `lstmlm --help`, a group's subcommands as "runs show", with its click command."""
    import click
    import typer

    from lstmlm.cli.app import app

    root = typer.main.get_command(app)
    ctx = click.Context(root)
    found: dict[str, Any] = {}

    def walk(group: Any, prefix: str) -> None:
        for name in group.list_commands(ctx):
            command = group.get_command(ctx, name)
            found[f"{prefix}{name}"] = command
            if hasattr(command, "list_commands"):
                walk(command, f"{prefix}{name} ")

    walk(root, "")
    return found


def long_options(command: Any) -> list[list[str]]:
    """A command's options but --help, each as its long names (`--run`, `--name`)."""
    options = [[o for o in p.opts + p.secondary_opts if o.startswith("--")] for p in command.params if p.param_type_name == "option"]
    return [names for names in options if names != ["--help"]]


def test_every_command_has_its_page() -> None:
    assert set(commands()) == set(PAGES)
    assert all((COMMANDS / page).is_file() for page in PAGES.values())


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_option_of_a_command_is_named_on_its_page(name: str) -> None:
    """tune's options that are config fields are train's, which tune.md fixes "any lstmlm
    train option" of."""
    from lstmlm.config import field_names

    page = (COMMANDS / PAGES[name]).read_text(encoding="utf-8")
    config_options = {"--" + f.replace("_", "-") for f in field_names()} if name == "tune" else set()
    missing = [
        names
        for names in long_options(commands()[name])
        if not set(names) & config_options and not any(re.search(re.escape(n) + r"(?![\w-])", page) for n in names)
    ]
    assert not missing, f"{PAGES[name]} never names {missing}"


# ---- what the docs cite of the tests ------------------------------------------------------------

ROOT = COMMANDS.parent.parent


def test_every_test_the_docs_name_exists() -> None:
    """guarantees.md and the pages cite tests by name and file as the proof of a claim: a test
    renamed or a file moved leaves a claim pointing at nothing."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    text = "\n".join(p.read_text(encoding="utf-8") for p in pages)
    defined = {m for f in (ROOT / "tests").rglob("*.py") for m in re.findall(r"^\s*def (test_\w+)", f.read_text(encoding="utf-8"), re.M)}
    named = set(re.findall(r"`(test_\w+)`", text))
    assert named, "the docs cite tests by name"
    assert named <= defined, f"no such test: {sorted(named - defined)}"
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", text)) | {f"tests/{f}" for f in re.findall(r"`(test_\w+\.py)`", text)}
    assert not [f for f in files if not (ROOT / f).is_file()], "a test file the docs name is missing"
