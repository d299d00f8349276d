"""Imports point down the layers `lstmlm/layers.py` lists: parsed from the source (ast), every
import counted, those inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lstmlm.layers import LAYERS

PACKAGE = Path(__file__).resolve().parent.parent / "lstmlm"


def module_name(path: Path) -> str:
    """lstmlm/cli/train.py → lstmlm.cli.train; lstmlm/cells/__init__.py → lstmlm.cells."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, everything: bool = False) -> list[tuple[int, str]]:
    """The lstmlm modules (or names in them) a module imports, by line, absolute (with
    `everything`, every other package's too)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names] if node.module is None else [(node.lineno, base)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, target) for line, target in found if everything or target == "lstmlm" or target.startswith("lstmlm.")]


def layer_of(module: str) -> int:
    """The layer of lstmlm.X... (by X, the name under the package; `lstmlm.__version__` is the package's)."""
    parts = module.split(".")
    is_module = len(parts) > 1 and ((PACKAGE / f"{parts[1]}.py").exists() or (PACKAGE / parts[1]).is_dir())
    top = parts[1] if is_module else "lstmlm"
    named = ".".join(parts[1:3])  # a subpackage's module placed on its own (data.home)
    for layer, names in enumerate(LAYERS):
        if named in names:
            return layer
    for layer, names in enumerate(LAYERS):
        if top in names:
            return layer
    raise AssertionError(f"{module} is in no layer of lstmlm/layers.py: place it there")


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "layers.py")


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_points_up_the_layers(path: Path) -> None:
    name = module_name(path)
    mine = layer_of(name)
    up = [f"line {line}: {target} (layer {layer_of(target) + 1})" for line, target in imported(path) if layer_of(target) > mine]
    assert not up, f"{name} (layer {mine + 1}) imports up the layers of lstmlm/layers.py: " + "; ".join(up)


def test_the_check_sees_imports_and_orders_the_layers() -> None:
    """The parser finds relative, absolute and lazy imports alike (a check that sees none passes anything)."""
    found = imported(PACKAGE / "training.py")
    assert (found and all(t.startswith("lstmlm.") for _, t in found)) and any(t == "lstmlm.train" for _, t in found)
    assert layer_of("lstmlm.bench") > layer_of("lstmlm.train") > layer_of("lstmlm.model") > layer_of("lstmlm.cells.lstm")
    assert layer_of("lstmlm.__version__") == 0


@pytest.mark.parametrize("path", [p for p in MODULES if p.relative_to(PACKAGE).parts[0] not in ("cli", "__main__.py")], ids=lambda p: module_name(p))
def test_the_library_never_renders(path: Path) -> None:
    """Only the command line draws on a terminal: the library is used, and tested, without one."""
    drawn = [f"line {line}: {target}" for line, target in imported(path, everything=True) if target.split(".")[0] in ("rich", "typer", "click")]
    assert not drawn, f"{module_name(path)} imports what renders: " + "; ".join(drawn)
