"""The README is the front page: its links lead somewhere, and its test block is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_every_link_of_the_readme_leads_to_a_file() -> None:
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", README) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets), "the command table links into docs/"
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README links to nothing: {missing}"


def commands(text: str) -> list[str]:
    """A shell text's commands, one a line, `&&` chains split (not inside `$(...)`), comments and
    `--quiet` left out."""
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in text.splitlines()]
    found = [part.strip() for line in lines if line and not line.startswith("#") for part in chain(line)]
    return [re.sub(r" --quiet\b", "", c) for c in found]


def chain(line: str) -> list[str]:
    parts: list[str] = []
    depth = start = 0
    for i, c in enumerate(line):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0 and line.startswith(" && ", i):
            parts.append(line[start:i])
            start = i + 4
    return [*parts, line[start:]]


def test_the_readme_test_block_is_what_ci_runs() -> None:
    block = README.split("<!-- what .ci/run runs")[1].split("```\n")[1]
    readme, ci = commands(block), commands(CI)
    ran = [c for c in readme if not c.startswith("export ")]
    assert [c for c in ci if c in ran] == ran, "each README step, in order, is a step of .ci/run"
    for step in ("ruff check", "mypy", "mkdocs build --strict", "python -m pytest"):
        assert any(c.startswith(step) for c in ran), step
    exported = {v for c in readme if c.startswith("export ") for v in re.findall(r"(\w+)=", c)}
    assert exported == {"LSTMLM_TEST_DATA", "LSTMLM_HOME"}
    assert all(re.search(rf"^export {v}=", CI, re.MULTILINE) for v in exported)
