"""`lstmlm inspect --html`: the analysis of `units.py` as one self-contained page (no network).

The page (`templates/inspect.html`) colours the text by any unit of any gate and layer. Values
travel quantized to a byte each; with each (layer, gate) goes the colour of each of its 256
levels, computed here by `units.colour`, so the page and the terminal share one colour scale
and the page's script only looks colours up.
"""

from __future__ import annotations

import base64
import html
import json
import re
from importlib import resources
from typing import Any

import torch

from .cells.base import Gate
from .units import (
    SATURATION_HEADER,
    LayerActivations,
    UnitScore,
    check_text,
    colour,
    gate_of,
    level,
    nothing_saturates,
    saturation,
    saturation_rows,
    span_feature,
)

QUANTA = 255  # values travel as one byte each: a page of 256 units × 6 gates × 2,000 characters stays ~4 MB


def value_range(gate: Gate, values: torch.Tensor) -> tuple[float, float]:
    """The interval a gate's values are quantized over: its bounds, or ±max|values| for an
    unbounded one (the LSTM's memory cell)."""
    if gate.low is not None and gate.high is not None:
        return gate.low, gate.high
    bound = float(values.abs().max()) or 1.0
    return -bound, bound


def quantize(values: torch.Tensor, lo: float, hi: float) -> str:
    """(steps, hiddens) → base64 of uint8, unit-major: unit k's steps are bytes k·steps … (k+1)·steps − 1.
    Decoded as lo + q/255·(hi − lo), every value is within (hi − lo)/510 of the original."""
    q = ((values.double() - lo) / (hi - lo) * QUANTA).round().clamp(0, QUANTA).to(torch.uint8)
    return base64.b64encode(q.T.contiguous().numpy().tobytes()).decode("ascii")


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def palette(gate: Gate, lo: float, hi: float) -> list[str]:
    """The colour of each quantized level q = 0 … 255 of a gate quantized over [lo, hi]."""
    values = torch.linspace(lo, hi, QUANTA + 1, dtype=torch.float64)
    return [hex_colour(colour(float(v))) for v in level(gate, values)]


def page_data(layers: list[LayerActivations], ranking: list[UnitScore] | None = None, feature: str | None = None, gate: str | None = None) -> dict[str, Any]:
    """Everything the page's script needs, as JSON-ready data."""
    cell = layers[0].cell
    values = []
    for layer in layers:
        per_gate = {}
        for g in cell.gates:
            lo, hi = value_range(g, layer.gate(g.name))
            per_gate[g.name] = {"lo": lo, "hi": hi, "q": quantize(layer.gate(g.name), lo, hi), "palette": palette(g, lo, hi), "unbounded": g.low is None}
        values.append(per_gate)
    return {
        "steps": len(layers[0].H),
        "hiddens": layers[0].num_hiddens,
        "gates": [g.name for g in cell.gates],
        "values": values,
        "feature": feature,
        "gate": gate_of(cell, cell.default_gate if gate is None else gate).name,
        "ranking": [{"layer": s.layer, "unit": s.unit, "r": round(s.correlation, 4)} for s in ranking or []],
    }


def char_html(c: str) -> str:
    """One character, escaped; a carriage return as a reference, since parsers fold a raw one."""
    return "&#13;" if c == "\r" else html.escape(c)


def text_html(text: str, regex: str | None) -> str:
    """One <span> per character (the script colours span t by step t); matched spans marked."""
    inside = span_feature(text, regex).bool().tolist() if regex else [False] * len(text)
    return "".join(f'<span class="m">{char_html(c)}</span>' if m else f"<span>{char_html(c)}</span>" for c, m in zip(text, inside))


def script_json(data: dict[str, Any]) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can close or confuse the element."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def table_html(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = lambda tag, row: "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in row)  # noqa: E731
    return "<table><tr>" + cells("th", header) + "</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) + "</table>"


def saturation_html(layers: list[LayerActivations]) -> str:
    if none := nothing_saturates(layers[0].cell):
        return f"<p>{html.escape(none)}</p>"
    return table_html(SATURATION_HEADER, saturation_rows(saturation(layers)))


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def html_page(
    layers: list[LayerActivations],
    text: str,
    title: str = "lstmlm inspect",
    regex: str | None = None,
    gate: str | None = None,
    ranking: list[UnitScore] | None = None,
) -> str:
    """A self-contained page (no network): the text, coloured by any unit of any gate and layer."""
    gate = gate_of(layers[0].cell, layers[0].cell.default_gate if gate is None else gate).name
    check_text(layers, text)
    # a byte of a command line that was not UTF-8 reaches here as a lone surrogate, which a
    # UTF-8 page cannot hold: it is shown as U+FFFD, a character for a character
    text, title = LONE_SURROGATE.sub("\ufffd", text), LONE_SURROGATE.sub("\ufffd", title)
    regex = LONE_SURROGATE.sub("\ufffd", regex) if regex else regex
    parts = {
        "title": html.escape(title),
        "feature": f"Orange bar: inside a match of <code>{html.escape(regex)}</code>." if regex else "",
        "saturation": saturation_html(layers),
        "legend": ",".join(hex_colour(colour(v)) for v in (-1.0, 0.0, 1.0)),
        "data": script_json(page_data(layers, ranking, regex, gate)),
        "text": text_html(text, regex),
    }
    template = resources.files("lstmlm").joinpath("templates/inspect.html").read_text(encoding="utf-8")
    # one pass, so a "{{...}}" inside the text or the title is never itself replaced
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)
