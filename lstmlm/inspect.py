"""Inside a trained LSTM: every gate over a text, units that track a feature, saturation, an HTML page.

After Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015):
single cells that switch on inside quotes, count line length or track brackets.

`activations` reruns the article's equations one character at a time on the model's own
parameters — converted to the scratch layout, whichever core trained them — and keeps what a
forward pass throws away:

    I_t = σ(X_t W_xi + H_{t-1} W_hi + b_i)        input gate        (0, 1)
    F_t = σ(X_t W_xf + H_{t-1} W_hf + b_f)        forget gate       (0, 1)
    O_t = σ(X_t W_xo + H_{t-1} W_ho + b_o)        output gate       (0, 1)
    C̃_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)     candidate         (-1, 1)
    C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t               memory cell       unbounded
    H_t = O_t ⊙ tanh(C_t)                         hidden state      (-1, 1)

Row t of every tensor is the state after reading character t of the text.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass

import torch

from .errors import InspectError
from .model import CharLM, convert
from .vocab import Vocab

# The names people choose on the command line → the equation's symbol (a LayerActivations field).
SYMBOLS = {"input": "I", "forget": "F", "output": "O", "candidate": "C_tilde", "cell": "C", "hidden": "H"}
GATES = tuple(SYMBOLS)
SIGMOID_GATES = ("input", "forget", "output")  # in (0, 1): the ones that saturate
TANH_GATES = ("candidate", "hidden")  # in (-1, 1); the cell alone is unbounded

# The paper's thresholds: a gate below 0.1 is left-saturated (closed), above 0.9 right-saturated (open).
LEFT, RIGHT = 0.1, 0.9


@dataclass(frozen=True)
class LayerActivations:
    """One layer over the text; every tensor is (steps, hiddens)."""

    I: torch.Tensor
    F: torch.Tensor
    O: torch.Tensor
    C_tilde: torch.Tensor
    C: torch.Tensor
    H: torch.Tensor

    def gate(self, name: str) -> torch.Tensor:
        return getattr(self, SYMBOLS[check_gate(name)])

    @property
    def num_hiddens(self) -> int:
        return self.H.shape[1]


def check_gate(name: str) -> str:
    if name not in SYMBOLS:
        raise InspectError(f"unknown gate '{name}' (choose from {', '.join(GATES)})")
    return name


# ---- activations ------------------------------------------------------------------------------

PARAMETERS = [f"{kind}{g}" for g in "ifoc" for kind in ("W_x", "W_h", "b_")]  # one layer's, as ScratchLSTMLayer names them


@torch.no_grad()
def activations(model: CharLM, vocab: Vocab, text: str) -> list[LayerActivations]:
    """Every layer's gates over `text`, starting from the zero state as generation does.

    Characters outside the vocabulary read as `<unk>` (a vocabulary without one refuses them).
    """
    if not text:
        raise InspectError("the text to inspect is empty")
    ids = vocab.encode(text).long()  # (steps,)
    # Read the parameters through the scratch layout: one code path for both cores, and the
    # forward's fused kernels never need to expose their intermediate gates.
    params = {k: v.detach().float().cpu() for k, v in convert(model.state_dict(), "scratch").items()}
    X = params["embedding.weight"][ids] if "embedding.weight" in params else ids  # ids read as one-hot
    layers = []
    for k in range(model.num_layers):
        layer = run_layer(X, {name: params[f"core.layers.{k}.{name}"] for name in PARAMETERS})
        layers.append(layer)
        X = layer.H  # the next layer reads this one's H; no dropout at inference
    return layers


def run_layer(X: torch.Tensor, p: dict[str, torch.Tensor]) -> LayerActivations:
    """The article's equations for one layer, one step at a time, keeping every gate.

    X: (steps,) ids, read as one-hot, or (steps, inputs) floats.
    """
    num_hiddens = p["W_hi"].shape[0]
    # X_t W_x for all steps at once: a row gather for one-hot ids, a product for dense input
    XW = {g: p[f"W_x{g}"][X] if not X.is_floating_point() else X @ p[f"W_x{g}"] for g in "ifoc"}  # (steps, hiddens)
    H = C = torch.zeros(num_hiddens)
    steps = []
    for t in range(len(X)):
        I = torch.sigmoid(XW["i"][t] + H @ p["W_hi"] + p["b_i"])  # (hiddens,)
        F = torch.sigmoid(XW["f"][t] + H @ p["W_hf"] + p["b_f"])
        O = torch.sigmoid(XW["o"][t] + H @ p["W_ho"] + p["b_o"])
        C_tilde = torch.tanh(XW["c"][t] + H @ p["W_hc"] + p["b_c"])
        C = F * C + I * C_tilde
        H = O * torch.tanh(C)
        steps.append((I, F, O, C_tilde, C, H))
    return LayerActivations(*(torch.stack(values) for values in zip(*steps)))  # each (steps, hiddens)


def check_layer(layers: list[LayerActivations], layer: int) -> LayerActivations:
    if not 0 <= layer < len(layers):
        raise InspectError(f"layer {layer} does not exist: the model has layers 0..{len(layers) - 1}")
    return layers[layer]


def check_text(layers: list[LayerActivations], text: str) -> str:
    if len(text) != len(layers[0].H):
        raise InspectError(f"the text has {len(text)} characters but the activations {len(layers[0].H)} steps")
    return text


def check_unit(layer: LayerActivations, unit: int) -> int:
    if not 0 <= unit < layer.num_hiddens:
        raise InspectError(f"unit {unit} does not exist: the layer has units 0..{layer.num_hiddens - 1}")
    return unit


def most_variable_units(layer: LayerActivations, gate: str, k: int) -> list[int]:
    """The k units whose activation changes most over the text: a default worth looking at."""
    spread = layer.gate(gate).std(dim=0) if len(layer.H) > 1 else layer.gate(gate).abs()[0]
    return spread.topk(min(k, layer.num_hiddens)).indices.tolist()


# ---- units that track a feature -------------------------------------------------------------


@dataclass(frozen=True)
class UnitScore:
    layer: int
    unit: int
    correlation: float  # Pearson r between the unit's activation and the feature, in [-1, 1]


def span_feature(text: str, regex: str) -> torch.Tensor:
    """1.0 at every character inside a span that `regex` matches, else 0.0: (steps,)."""
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise InspectError(f"invalid regular expression {regex!r}: {e}") from None
    feature = torch.zeros(len(text), dtype=torch.float64)
    for match in pattern.finditer(text):
        feature[match.start() : match.end()] = 1.0
    if not feature.any():
        raise InspectError(f"{regex!r} matches nothing in the text: no feature to track")
    if feature.all():
        raise InspectError(f"{regex!r} covers the whole text: a constant feature has no correlation")
    return feature


def pearson(A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson r of each column of A (steps, units) with y (steps,); 0 for a constant column."""
    A = A.double() - A.double().mean(dim=0)
    y = y.double() - y.double().mean()
    norms = A.norm(dim=0) * y.norm()  # (units,)
    r = (A * y[:, None]).sum(dim=0) / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.where(norms > 0, r, torch.zeros_like(r))


def find_units(
    layers: list[LayerActivations], text: str, regex: str, gate: str = "cell", layer: int | None = None
) -> list[UnitScore]:
    """Every unit of `gate` (in every layer, or only `layer`) ranked by |r| with "inside a match of regex"."""
    check_gate(gate)
    feature = span_feature(check_text(layers, text), regex)
    chosen = [layer] if layer is not None else range(len(layers))
    scores = []
    for k in chosen:
        r = pearson(check_layer(layers, k).gate(gate), feature)
        scores += [UnitScore(k, unit, float(value)) for unit, value in enumerate(r)]
    return sorted(scores, key=lambda s: -abs(s.correlation))


# ---- saturation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saturation:
    layer: int
    gate: str
    left: torch.Tensor  # (hiddens,) fraction of steps with the gate < LEFT
    right: torch.Tensor  # (hiddens,) fraction of steps with the gate > RIGHT


def saturation(layers: list[LayerActivations]) -> list[Saturation]:
    """Per layer and sigmoid gate, how often each unit is left- or right-saturated (the paper's Fig. 3)."""
    stats = []
    for k, layer in enumerate(layers):
        for gate in SIGMOID_GATES:
            values = layer.gate(gate)  # (steps, hiddens)
            stats.append(Saturation(k, gate, (values < LEFT).double().mean(0), (values > RIGHT).double().mean(0)))
    return stats


# ---- colour levels ----------------------------------------------------------------------------


def level(gate: str, values: torch.Tensor) -> torch.Tensor:
    """Values on one scale in [-1, 1] for colouring: a sigmoid gate's 0.5 is neutral, and the cell
    goes through tanh as H sees it (and as the paper shows it)."""
    if gate in SIGMOID_GATES:
        return 2 * values - 1
    if gate == "cell":
        return torch.tanh(values)
    return values


# ---- the HTML page -------------------------------------------------------------------------------

QUANTA = 255  # values travel as one byte each: a page of 256 units × 6 gates × 2,000 characters stays ~4 MB


def value_range(gate: str, values: torch.Tensor) -> tuple[float, float]:
    """The interval a gate's values are quantized over: its bounds, or ±max|C| for the cell."""
    if gate in SIGMOID_GATES:
        return 0.0, 1.0
    if gate in TANH_GATES:
        return -1.0, 1.0
    bound = float(values.abs().max()) or 1.0
    return -bound, bound


def quantize(values: torch.Tensor, lo: float, hi: float) -> str:
    """(steps, hiddens) → base64 of uint8, unit-major: unit k's steps are bytes k·steps … (k+1)·steps − 1.
    Decoded as lo + q/255·(hi − lo), every value is within (hi − lo)/510 of the original."""
    q = ((values.double() - lo) / (hi - lo) * QUANTA).round().clamp(0, QUANTA).to(torch.uint8)
    return base64.b64encode(q.T.contiguous().numpy().tobytes()).decode("ascii")


def page_data(
    layers: list[LayerActivations], ranking: list[UnitScore] | None = None, feature: str | None = None, gate: str = "cell"
) -> dict:
    """Everything the page's script needs, as JSON-ready data."""
    values = []
    for layer in layers:
        per_gate = {}
        for name in GATES:
            lo, hi = value_range(name, layer.gate(name))
            per_gate[name] = {"lo": lo, "hi": hi, "q": quantize(layer.gate(name), lo, hi)}
        values.append(per_gate)
    return {
        "steps": len(layers[0].H),
        "hiddens": layers[0].num_hiddens,
        "gates": list(GATES),
        "sigmoid": list(SIGMOID_GATES),
        "values": values,
        "feature": feature,
        "gate": gate,
        "ranking": [{"layer": s.layer, "unit": s.unit, "r": round(s.correlation, 4)} for s in ranking or []],
    }


def char_html(c: str) -> str:
    """One character, escaped; a carriage return as a reference, since parsers fold a raw one."""
    return "&#13;" if c == "\r" else html.escape(c)


def text_html(text: str, regex: str | None) -> str:
    """One <span> per character (the script colours span t by step t); matched spans marked."""
    inside = span_feature(text, regex).bool().tolist() if regex else [False] * len(text)
    return "".join(f'<span class="m">{char_html(c)}</span>' if m else f"<span>{char_html(c)}</span>" for c, m in zip(text, inside))


def script_json(data: dict) -> str:
    """JSON safe inside <script>: no '</script>' or '<!--' can close or confuse the element."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def saturation_html(stats: list[Saturation]) -> str:
    rows = "".join(
        f"<tr><td>{s.layer}</td><td>{s.gate}</td><td>{float(s.left.mean()):.1%}</td><td>{float(s.right.mean()):.1%}</td>"
        f"<td>{int((s.left > 0.5).sum())}</td><td>{int((s.right > 0.5).sum())}</td></tr>"
        for s in stats
    )
    return (
        "<table><tr><th>layer</th><th>gate</th><th>time &lt; 0.1</th><th>time &gt; 0.9</th>"
        "<th>units mostly &lt; 0.1</th><th>units mostly &gt; 0.9</th></tr>" + rows + "</table>"
    )


def html_page(
    layers: list[LayerActivations],
    text: str,
    title: str = "lstmlm inspect",
    regex: str | None = None,
    gate: str = "cell",
    ranking: list[UnitScore] | None = None,
) -> str:
    """A self-contained page (no network): the text, coloured by any unit of any gate and layer."""
    check_gate(gate)
    check_text(layers, text)
    parts = {
        "title": html.escape(title),
        "feature": f"Orange bar: inside a match of <code>{html.escape(regex)}</code>." if regex else "",
        "saturation": saturation_html(saturation(layers)),
        "data": script_json(page_data(layers, ranking, regex, gate)),
        "text": text_html(text, regex),
    }
    # one pass, so a "{{...}}" inside the text or the title is never itself replaced
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], PAGE)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .5em}
#controls{display:flex;flex-wrap:wrap;gap:.8em;align-items:center;margin-bottom:.8em}
#text{font:15px/1.7 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-all;
  border:1px solid #ccc;padding:.8em;max-height:65vh;overflow:auto}
#text span.m{box-shadow:inset 0 -3px 0 #f0a000}  /* an orange bar: visible on any shade */
#status{font-family:ui-monospace,monospace;min-height:1.4em;color:#444}
#legend{display:inline-block;width:160px;height:12px;vertical-align:middle;
  background:linear-gradient(to right,rgb(33,102,172),#fff,rgb(178,24,43))}
#best{margin:.5em 0}
#best a{margin-right:.8em;cursor:pointer;color:#1a5fb4}
table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
</style></head><body>
<h1>{{title}}</h1>
<div id="controls">
<label>layer <select id="layer"></select></label>
<label>gate <select id="gate"></select></label>
<label>unit <select id="unit"></select></label>
<button id="prev" title="previous unit (←)">◀</button><button id="next" title="next unit (→)">▶</button>
<span><span id="low"></span> <span id="legend"></span> <span id="high"></span></span>
</div>
<div id="best"></div>
<div id="status"></div>
<div id="text">{{text}}</div>
<p>{{feature}}</p>
<details><summary>gate saturation</summary>{{saturation}}</details>
<script type="application/json" id="lstmlm-data">{{data}}</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("lstmlm-data").textContent);
const chars = document.querySelectorAll("#text > span");
const $ = (id) => document.getElementById(id);
const decoded = {};
function bytes(layer, gate) {  // unit-major uint8, decoded once per (layer, gate)
  const key = layer + "/" + gate;
  if (!decoded[key]) decoded[key] = Uint8Array.from(atob(data.values[layer][gate].q), (c) => c.charCodeAt(0));
  return decoded[key];
}
function value(layer, gate, unit, t) {
  const v = data.values[layer][gate];
  return v.lo + bytes(layer, gate)[unit * data.steps + t] / 255 * (v.hi - v.lo);
}
function level(gate, v) {  // as lstmlm.inspect.level: one scale in [-1, 1]
  if (data.sigmoid.includes(gate)) return 2 * v - 1;
  return gate === "cell" ? Math.tanh(v) : v;
}
function colour(s) {  // blue below, red above, white at 0
  const [r, g, b] = s < 0 ? [33, 102, 172] : [178, 24, 43];
  const a = Math.abs(s), mix = (c) => Math.round(255 + (c - 255) * a);
  return "rgb(" + mix(r) + "," + mix(g) + "," + mix(b) + ")";
}
function options(select, items) {
  select.innerHTML = "";
  for (const [value, label] of items) select.add(new Option(label, value));
}
function show() {
  const layer = +$("layer").value, gate = $("gate").value, unit = +$("unit").value;
  for (let t = 0; t < chars.length; t++) chars[t].style.background = colour(level(gate, value(layer, gate, unit, t)));
  const v = data.values[layer][gate];  // the legend is the colour scale: the cell's is tanh(c)
  $("low").textContent = gate === "cell" ? "tanh(c) = −1" : v.lo.toFixed(0);
  $("high").textContent = gate === "cell" ? "+1" : v.hi.toFixed(0);
  location.hash = layer + "/" + gate + "/" + unit;
}
function go(layer, gate, unit) {
  $("layer").value = layer; $("gate").value = gate; $("unit").value = unit; show();
}
options($("layer"), data.values.map((_, k) => [k, k]));
options($("gate"), data.gates.map((g) => [g, g]));
options($("unit"), Array.from({length: data.hiddens}, (_, k) => [k, k]));
$("gate").value = data.gate;
for (const id of ["layer", "gate", "unit"]) $(id).addEventListener("change", show);
function step(by) {
  const u = $("unit");
  u.value = (+u.value + by + data.hiddens) % data.hiddens; show();
}
$("prev").onclick = () => step(-1);
$("next").onclick = () => step(1);
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "SELECT") return;
  if (e.key === "ArrowLeft") step(-1);
  if (e.key === "ArrowRight") step(1);
});
$("text").addEventListener("mouseover", (e) => {
  const t = Array.prototype.indexOf.call(chars, e.target);
  if (t < 0) return;
  const layer = +$("layer").value, gate = $("gate").value, unit = +$("unit").value;
  $("status").textContent = "step " + t + "  " + JSON.stringify(e.target.textContent) + "  " + gate +
    "[" + layer + "][" + unit + "] = " + value(layer, gate, unit, t).toFixed(3);
});
if (data.ranking.length) {
  $("best").append("best units for the feature: ");
  for (const s of data.ranking) {
    const a = document.createElement("a");
    a.textContent = "layer " + s.layer + " unit " + s.unit + " (r = " + s.r.toFixed(2) + ")";
    a.onclick = () => go(s.layer, data.gate, s.unit);
    $("best").append(a);
  }
}
const [hl, hg, hu] = location.hash.slice(1).split("/");
if (hg && data.gates.includes(hg) && +hl < data.values.length && +hu < data.hiddens) go(+hl, hg, +hu);
else if (data.ranking.length) go(data.ranking[0].layer, data.gate, data.ranking[0].unit);
else show();
</script>
</body></html>
"""
