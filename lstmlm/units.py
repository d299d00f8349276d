"""Inside a trained model: every gate over a text, units that track a feature, saturation, colours.

After Karpathy, Johnson and Fei-Fei, "Visualizing and Understanding Recurrent Networks" (2015):
single cells that switch on inside quotes, count line length or track brackets.

`activations` reruns the cell's equations (its `step`) one character at a time on the model's
own parameters — converted to the scratch layout, whichever core trained them — and keeps what
a forward pass throws away: every gate the cell has (`Cell.gates`: for the LSTM the input,
forget and output gates, the candidate, the memory cell and H; for the GRU the reset and update
gates, the candidate and H), each with its range. Row t of every tensor is the state after
reading character t of the text. `inspect_text` is what `lstmlm inspect` asks for;
`units_page` draws the same analysis as an HTML page.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .cells.base import Cell, Gate, project
from .data.text import normalize
from .errors import InspectError
from .model import CharLM, convert, scratch_layer
from .vocab import Vocab

# The paper's thresholds: a gate below 0.1 is left-saturated (closed), above 0.9 right-saturated (open).
LEFT, RIGHT = 0.1, 0.9


@dataclass(frozen=True)
class LayerActivations:
    """One layer over the text: every quantity of the cell's step, each (steps, hiddens), by symbol."""

    cell: Cell
    values: dict[str, torch.Tensor]

    def gate(self, name: str) -> torch.Tensor:
        return self.values[gate_of(self.cell, name).symbol]

    @property
    def H(self) -> torch.Tensor:
        return self.values["H"]

    @property
    def num_hiddens(self) -> int:
        return self.H.shape[1]

    def after(self, start: int) -> LayerActivations:
        """The steps from `start` on."""
        return LayerActivations(self.cell, {k: v[start:] for k, v in self.values.items()})

    def at(self, steps: torch.Tensor) -> LayerActivations:
        """Only the given steps, in that order."""
        return LayerActivations(self.cell, {k: v[steps] for k, v in self.values.items()})


def gate_of(cell: Cell, name: str) -> Gate:
    """The cell's gate called `name`; an InspectError naming the ones it has otherwise."""
    for gate in cell.gates:
        if gate.name == name:
            return gate
    raise InspectError(f"the {cell.title} has no gate '{name}' (choose from {', '.join(g.name for g in cell.gates)})")


# ---- activations ------------------------------------------------------------------------------


@torch.no_grad()
def activations(model: CharLM, vocab: Vocab, text: str, context: str = "") -> list[LayerActivations]:
    """Every layer's gates over `text`, starting from the zero state as generation does, or
    from the state after reading `context` (generation's prime; its rows are left out).

    Characters outside the vocabulary read as `<unk>` (a vocabulary without one refuses them).
    """
    if not text:
        raise InspectError("the text to inspect is empty")
    ids = vocab.encode(context + text).long()  # (steps,): one id per character
    # Read the parameters through the scratch layout: one code path for both cores, and the
    # forward's fused kernels never need to expose their intermediate gates.
    cell = model.cell
    params = {k: v.detach().float().cpu() for k, v in convert(model.state_dict(), "scratch", cell).items()}
    X = params["embedding.weight"][ids] if "embedding.weight" in params else ids  # ids read as one-hot
    layers = []
    for k in range(model.num_layers):
        layer = run_layer(cell, X, scratch_layer(params, k, cell))
        layers.append(layer)
        X = layer.H  # the next layer reads this one's H; no dropout at inference
    if context:
        layers = [layer.after(len(context)) for layer in layers]  # the text's steps only
    return layers


def run_layer(cell: Cell, X: torch.Tensor, p: dict[str, torch.Tensor]) -> LayerActivations:
    """The cell's equations for one layer, one step at a time, keeping every gate.

    X: (steps,) ids, read as one-hot, or (steps, inputs) floats.
    """
    num_hiddens = p["W_h" + cell.blocks[0]].shape[0]
    XW = {g: project(X, p[f"W_x{g}"]) for g in cell.blocks}  # X_t W_x for all steps at once: (steps, hiddens)
    state = tuple(torch.zeros(num_hiddens) for _ in cell.state)
    steps = []
    for t in range(len(X)):
        step = cell.step({g: XW[g][t] for g in cell.blocks}, state, p)  # every gate, (hiddens,) each
        state = cell.next_state(step)
        steps.append(step)
    fields = steps[0]._fields
    return LayerActivations(cell, {name: torch.stack([getattr(s, name) for s in steps]) for name in fields})  # each (steps, hiddens)


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


def strongest_units(layer: LayerActivations, gate: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """At every step, the k units furthest from the gate's neutral level (`level`): their
    indices and values, each (steps, k), strongest first."""
    k = min(k, layer.num_hiddens)
    values = layer.gate(gate)
    units = level(gate_of(layer.cell, gate), values).abs().topk(k, dim=1).indices  # (steps, k)
    return units, values.gather(1, units)


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


def find_units(layers: list[LayerActivations], text: str, regex: str, gate: str | None = None, layer: int | None = None) -> list[UnitScore]:
    """Every unit of `gate` (the cell's default: the LSTM's memory cell; in every layer, or only
    `layer`) ranked by |r| with "inside a match of regex"."""
    gate = gate_of(layers[0].cell, layers[0].cell.default_gate if gate is None else gate).name
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
        for gate in (g for g in layer.cell.gates if g.saturates):
            values = layer.values[gate.symbol]  # (steps, hiddens)
            stats.append(Saturation(k, gate.name, (values < LEFT).double().mean(0), (values > RIGHT).double().mean(0)))
    return stats


def saturation_rows(stats: list[Saturation]) -> list[tuple[str, ...]]:
    """The saturation table as the terminal and the page both show it, under SATURATION_HEADER."""
    return [
        (str(s.layer), s.gate, f"{float(s.left.mean()):.1%}", f"{float(s.right.mean()):.1%}",
         str(int((s.left > 0.5).sum())), str(int((s.right > 0.5).sum())))
        for s in stats
    ]  # fmt: skip


def nothing_saturates(cell: Cell) -> str | None:
    """What the terminal and the page say in place of the saturation table for a cell with no
    sigmoid gate (the RNN), whose table would be its header alone; None for the others."""
    return None if any(g.saturates for g in cell.gates) else f"the {cell.title} has no sigmoid gate: none to saturate"


SATURATION_HEADER = ("layer", "gate", "time < 0.1", "time > 0.9", "units mostly < 0.1", "units mostly > 0.9")


# ---- the colour scale -------------------------------------------------------------------------

BLUE, RED = (33, 102, 172), (178, 24, 43)  # below and above the neutral level (white)


def level(gate: Gate, values: torch.Tensor) -> torch.Tensor:
    """Values on one scale in [-1, 1] for colouring: a sigmoid gate's 0.5 is neutral, and an
    unbounded one (the LSTM's memory cell) goes through tanh, as H sees it (and as the paper
    shows it)."""
    if gate.saturates:
        return 2 * values - 1
    if gate.low is None:
        return torch.tanh(values)
    return values


def colour(level: float) -> tuple[int, int, int]:
    """The one colour scale, terminal and page alike: blue below 0, red above, white at 0, for
    levels in [-1, 1]."""
    r, g, b = BLUE if level < 0 else RED
    a = min(abs(level), 1.0)
    return round(255 + (r - 255) * a), round(255 + (g - 255) * a), round(255 + (b - 255) * a)


# ---- what `lstmlm inspect` shows ----------------------------------------------------------------


def last_bytes(text: str) -> torch.Tensor:
    """The step at which a bytes model, reading `text`'s UTF-8 bytes, has read each character
    whole: its last byte's. (steps,), one per character."""
    sizes = torch.tensor([len(c.encode("utf-8", "surrogateescape")) for c in text], dtype=torch.int64)
    return sizes.cumsum(0) - 1


@dataclass(frozen=True)
class Inspection:
    text: str  # one character a step: d2l-normalized for a d2l model; for a bytes model the text given, each character at its last byte's step
    normalized: bool  # whether that changed the text given
    unknown: list[str]  # characters outside the vocabulary, read as <unk>
    layers: list[LayerActivations]
    gate: Gate
    find: str | None
    ranking: list[UnitScore]  # every unit by |r| with --find's feature; empty without one
    chosen: list[tuple[int, int]]  # (layer, unit) to colour the text by


def inspect_text(
    model: CharLM,
    vocab: Vocab,
    mode: str,
    text: str,
    gate: str | None = None,
    layer: int | None = None,
    units: list[int] | None = None,
    find: str | None = None,
    top: int = 3,
    context: str = "",
) -> Inspection:
    """Read `text` through the model (after `context`, if any) and choose what to show of `gate`
    (the cell's default unless given): the given `units` of `layer` (default: the last), else
    the `top` units that track `find` best, else the `top` that vary most."""
    if top < 1:
        raise InspectError(f"top must be at least 1, not {top}")
    shown_gate = gate_of(model.cell, model.cell.default_gate if gate is None else gate)
    gate = shown_gate.name
    symbols = normalize(text, mode)
    layers, seen = activations(model, vocab, symbols, context), symbols
    if mode == "bytes":  # shown as characters, not as bytes read as Latin-1: one step a character, its last byte's
        layers, seen = [layer.at(last_bytes(text)) for layer in layers], text
    shown_layer = layer if layer is not None else len(layers) - 1
    acts = check_layer(layers, shown_layer)
    ranking = find_units(layers, seen, find, gate, layer) if find else []
    if units:
        chosen = [(shown_layer, check_unit(acts, u)) for u in units]
    elif ranking:
        chosen = [(s.layer, s.unit) for s in ranking[:top]]
    else:
        chosen = [(shown_layer, u) for u in most_variable_units(acts, gate, top)]
    return Inspection(seen, seen != text, vocab.unknown_chars(symbols), layers, shown_gate, find, ranking, chosen)
