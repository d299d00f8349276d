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
