"""CharLM: characters → recurrent core (any cell; scratch or torch's) → output layer; weight conversion.

Dropout, when set, acts on every non-recurrent connection, as Zaremba, Sutskever and Vinyals
(2014) regularize LSTM language models: the embedding's output, between layers (inside the
core, as nn.LSTM applies it) and the top layer's output; never on the recurrence H_{t-1} → H_t.

    logits_t = H_t W_hq + b_q                      (batch, vocab) per step

AWD-LSTM's regularization (Merity, Keskar and Socher 2017), each off unless asked for
(`Dropouts`), all in training only:
- a rate of its own at each of the three places, and locked (variational) masks: one per
  sequence, shared by every step (Gal and Ghahramani 2016);
- DropConnect on the recurrence's weights W_h (Wan et al. 2013), inside the cores (`cells/cores.py`);
- embedding dropout: whole rows of the embedding matrix, whole characters, dropped for a
  batch, the rest scaled by 1 / (1 - p) (Gal and Ghahramani 2016);
- AR and TAR on the top layer's outputs (`activation_penalty`, Merity, McCann and Socher 2017,
  "Revisiting Activation Regularization for Language RNNs"), added to the training loss.

Both cores have the same parameters up to layout, so a state dict converts exactly from one
core to the other (the cell's `to_torch` and `from_torch`, layer by layer).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal, NamedTuple, get_args, overload

import torch
import torch.nn.functional as F
from torch import nn

from . import cells
from .cells.base import TORCH_PARAMETERS, Cell, State
from .cells.cores import ScratchCore, TorchCore, drop, zero_state
from .config import Config, ModelConfig, RecurrencePath
from .device import available_memory, checks_ids, describe
from .errors import CheckpointError, ConfigError, DeviceError, ShapeError
from .recurrence import compute_dtype
from .sizes import num_parameters as num_parameters  # counted without torch, where `lstmlm runs` counts them too


@dataclass(frozen=True)
class Dropouts:
    """Every rate CharLM drops at in training, each in [0, 1) (0: off)."""

    input: float = 0.0  # the embedding's output
    hidden: float = 0.0  # between layers, inside the core
    output: float = 0.0  # the top layer's output, before the output layer
    locked: bool = False  # those three: one mask per sequence, shared by every step; else per element
    weight: float = 0.0  # DropConnect on each layer's W_h, one mask per batch
    embedding: float = 0.0  # whole rows of the embedding matrix, one draw per character per batch

    def __post_init__(self) -> None:
        for name in ("input", "hidden", "output", "weight", "embedding"):
            if not 0.0 <= getattr(self, name) < 1.0:  # torch says so only at the first step in training
                raise ConfigError(f"the {name} dropout rate must lie in [0, 1), not {getattr(self, name)}")

    @property
    def draws(self) -> bool:
        """Whether training draws random numbers for any of them."""
        return any(r > 0 for r in (self.input, self.hidden, self.output, self.weight, self.embedding))

    @classmethod
    def of(cls, cfg: ModelConfig) -> Dropouts:
        """The config's rates; -1 at a place means `dropout`'s rate there."""

        def rate(r: float) -> float:
            return cfg.dropout if r == -1.0 else r

        return cls(rate(cfg.dropout_input), rate(cfg.dropout_hidden), rate(cfg.dropout_output), cfg.locked_dropout, cfg.weight_drop, cfg.embedding_dropout)


class TopLayer(NamedTuple):
    """The top layer's outputs for a batch, which AR and TAR penalize."""

    H: torch.Tensor  # (steps, batch, hiddens): as the core gave them
    H_dropped: torch.Tensor  # (steps, batch, hiddens): after output dropout, as the output layer reads them


DEFAULT = Config()  # CharLM's defaults are the config's


class CharLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_hiddens: int = DEFAULT.model.hidden,
        num_layers: int = DEFAULT.model.layers,
        dropout: float | Dropouts = DEFAULT.model.dropout,
        core: str = DEFAULT.model.model,
        embedding: int = DEFAULT.model.embedding,
        cell: str | Cell = DEFAULT.model.cell,
        path: str = DEFAULT.train.path,
        device: torch.device | str = "cpu",
        build: bool = True,
    ) -> None:
        """`dropout`: one rate for the embedding's output, between layers and the top layer's
        output (Zaremba et al.), or `Dropouts` for each on its own and the rest of AWD-LSTM's.
        `cell`: a registered cell's name or a Cell (the GRU's d2l form: `cells.get("gru", "d2l")`).
        `path`: how the scratch core runs its recurrence (`recurrence.py`), chosen for `device`
        (without `build`, a compiled path is built later: `ScratchCore.settle`)."""
        super().__init__()
        if min(vocab_size, num_hiddens, num_layers) < 1 or embedding < 0:  # a model of nothing, which torch builds
            raise ConfigError(f"a model needs a vocabulary, hidden units and layers: vocab {vocab_size}, hidden {num_hiddens}, layers {num_layers}")
        if path not in get_args(RecurrencePath):  # else run on another path, the name only in the path's `why`
            raise ConfigError(f"unknown recurrence path '{path}' (expected {', '.join(get_args(RecurrencePath)[:-1])} or {get_args(RecurrencePath)[-1]})")
        self.vocab_size, self.num_hiddens, self.num_layers = vocab_size, num_hiddens, num_layers
        self.core_name = core
        self.cell = cells.get(cell) if isinstance(cell, str) else cell
        self.dropouts = d = dropout if isinstance(dropout, Dropouts) else Dropouts(dropout, dropout, dropout)
        self.embedding = nn.Embedding(vocab_size, embedding) if embedding > 0 else None
        num_inputs = embedding or vocab_size  # one-hot input has one column per character
        if core == "scratch":
            self.core: nn.Module = ScratchCore(self.cell, num_inputs, num_hiddens, num_layers, d.hidden, d.locked, d.weight, path, device, build)
        elif core == "cudnn":
            self.core = TorchCore(self.cell, num_inputs, num_hiddens, num_layers, d.hidden, d.locked, d.weight)
        else:
            raise ConfigError(f"unknown core '{core}' (expected scratch or cudnn)")
        self.W_hq = nn.Parameter(torch.empty(num_hiddens, vocab_size))
        self.b_q = nn.Parameter(torch.empty(vocab_size))
        self.reset_output_layer()

    @classmethod
    def from_config(cls, cfg: ModelConfig, vocab_size: int, path: str = "auto", device: torch.device | str = "cpu", build: bool = True) -> CharLM:
        """The model `cfg` describes, its scratch core's path chosen for `device` (where the
        caller then moves it)."""
        cell = cells.get(cfg.cell, cfg.gru_form)
        return cls(vocab_size, cfg.hidden, cfg.layers, Dropouts.of(cfg), cfg.model, cfg.embedding, cell, path, device, build)

    def reset_output_layer(self) -> None:
        """The seed's init for the scratch model (N(0, 0.01²), zero bias); nn.Linear's for nn.LSTM."""
        with torch.no_grad():
            if self.core_name == "scratch":
                self.W_hq.normal_(0.0, 0.01)
                self.b_q.zero_()
            else:
                bound = 1.0 / math.sqrt(self.num_hiddens)
                self.W_hq.uniform_(-bound, bound)
                self.b_q.uniform_(-bound, bound)

    @property
    def scratch_core(self) -> ScratchCore | None:
        """The core as the cell's own equations, or None for torch's."""
        return self.core if isinstance(self.core, ScratchCore) else None

    @property
    def path(self) -> str:
        """How the recurrence runs: the scratch core's path, or "cudnn" (torch's fused layer)."""
        scratch = self.scratch_core
        return scratch.path if scratch is not None else "cudnn"

    def begin_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        if batch_size < 0:
            raise ShapeError(f"a state's batch must not be negative, not {batch_size}")
        return zero_state(self.cell, self.num_layers, batch_size, self.num_hiddens, self.W_hq.to(device) if device else self.W_hq)

    @overload
    def forward(self, X: torch.Tensor, state: State | None = None, *, top: Literal[False] = False) -> tuple[torch.Tensor, State]: ...
    @overload
    def forward(self, X: torch.Tensor, state: State | None = None, *, top: Literal[True]) -> tuple[torch.Tensor, State, TopLayer]: ...

    def forward(self, X: torch.Tensor, state: State | None = None, *, top: bool = False) -> tuple[torch.Tensor, State] | tuple[torch.Tensor, State, TopLayer]:
        """X: (batch, steps) ids → logits (batch, steps, vocab) and the final state; with `top`,
        the top layer's outputs too (for AR and TAR)."""
        if X.is_floating_point() or X.dtype == torch.bool or X.dim() != 2:
            raise ShapeError(f"X must be (batch, steps) integer ids, got {tuple(X.shape)} {X.dtype}")
        if X.numel() == 0:  # the compiled core divides by the batch (SIGFPE), the others fail on no steps
            raise ShapeError(f"X must have at least one row and one step, got {tuple(X.shape)}")
        if checks_ids(X):  # one reduction (on a CPU only): generation calls this per character
            low, high = (int(v) for v in torch.aminmax(X))
            if low < 0 or high >= self.vocab_size:
                raise ShapeError(f"ids must lie in [0, {self.vocab_size}), got [{low}, {high}]")
        inputs = X.T  # (steps, batch): the cores run time-major, like the seed
        d = self.dropouts if self.training else Dropouts()
        if self.embedding is not None:
            inputs = self.embed(inputs, d.embedding)  # (steps, batch, embedding)
            inputs = drop(inputs, d.input, d.locked)
        outputs, state = self.core(inputs, state)  # (steps, batch, hiddens)
        dropped = drop(outputs, d.output, d.locked)
        logits = self.output(dropped).transpose(0, 1)  # (batch, steps, vocab)
        return (logits, state, TopLayer(outputs, dropped)) if top else (logits, state)

    def output(self, H: torch.Tensor) -> torch.Tensor:
        """H W_hq + b_q: the logits (steps, batch, vocab) of H (steps, batch, hiddens).

        The compiled core keeps H as (steps, hiddens, batch) in memory, and hands it on as a
        transposed view. There the product is taken a step at a time, W_hqᵀ H_tᵀ, in one
        batched call that reads H where it lies and gives H's gradient back in the same layout,
        which the core's backward reads as it is: torch's product would copy H into
        (steps·batch, hiddens) first, and its gradient out of it after (0.26 ms each way at d2l's
        size, AMD EPYC, AVX2), where the logits' own copy is vocab / hiddens of that."""
        if H.dim() != 3 or H.is_contiguous() or not H.transpose(1, 2).is_contiguous():
            return H @ self.W_hq + self.b_q
        HT = H.transpose(1, 2)  # (steps, hiddens, batch)
        W = self.W_hq.T.to(compute_dtype(self.W_hq)).expand(HT.shape[0], -1, -1)  # (steps, vocab, hiddens): a view, cast before it is expanded
        return (torch.bmm(W, HT) + self.b_q[:, None]).transpose(1, 2)  # (steps, batch, vocab), a view of (steps, vocab, batch)

    def embed(self, ids: torch.Tensor, p: float) -> torch.Tensor:
        """E[ids] (steps, batch, embedding); for p > 0, from E with whole rows dropped — a
        character's every occurrence in the batch — and the kept rows scaled by 1 / (1 - p)."""
        assert self.embedding is not None  # called only with an embedding
        E = self.embedding.weight  # (vocab, embedding)
        if p > 0:
            keep = E.new_empty((E.shape[0], 1)).bernoulli_(1 - p).div_(1 - p)  # (vocab, 1): one draw per character
            E = E * keep
        return F.embedding(ids, E)


def training_bytes(cfg: Config, vocab_size: int) -> int:
    """At least what training takes in memory: the fp32 weights and their gradients, the
    optimizer's state (Adam's two moments; plain SGD keeps none), and per trained character
    the activations kept for the backward pass (each layer's gates, cell and hidden state; the
    logits and their gradient). Not counted: the framework, the data, temporaries."""
    P = num_parameters(cfg.model, vocab_size)
    copies = 2 + (2 if cfg.train.optimizer in ("adam", "adamw") else 0)
    characters = cfg.data.batch_size * cfg.data.num_steps
    per_character = (cells.get(cfg.model.cell, cfg.model.gru_form).width + 2) * cfg.model.layers * cfg.model.hidden + 2 * vocab_size
    return 4 * (copies * P + characters * per_character)


SIZES = "lower --hidden, --layers, --embedding, --batch-size or --num-steps"  # train's options for them


def check_memory(cfg: Config, vocab_size: int, device: torch.device, hint: str = SIZES) -> None:
    """Refuse a model that cannot fit before anything is made: past the memory there is, a
    training (or a bench) would be ended by the OOM killer with no message."""
    need, have = training_bytes(cfg, vocab_size), available_memory(device)
    if have is not None and need > have:
        m, d = cfg.model, cfg.data
        raise DeviceError(
            f"training {m.layers}×{m.hidden} {m.model} with batches of {d.batch_size}×{d.num_steps} needs at least "
            f"{need / 2**30:,.1f} GiB of memory and {describe(device)} has {have / 2**30:,.1f} GiB available: {hint}"
        )


def loss_fn(logits: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every (batch, step) position, in fp32 whatever the matmul precision."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y.reshape(-1))


def activation_penalty(top: TopLayer, ar: float, tar: float) -> torch.Tensor:
    """AR + TAR (Merity, McCann and Socher 2017), in fp32, for the training loss only:

        AR  = α · mean(H̃_t²)                  H̃: the top layer's outputs after dropout; keeps them small
        TAR = β · mean((H_t − H_{t−1})²)      H: before dropout, within the batch; keeps them slow

    A batch of one step has no pair of steps: TAR is 0 there."""
    H, H_dropped = top.H.float(), top.H_dropped.float()  # (steps, batch, hiddens)
    penalty = H_dropped.pow(2).mean() * ar if ar > 0 else H.new_zeros(())
    if tar > 0 and H.shape[0] > 1:
        penalty = penalty + (H[1:] - H[:-1]).pow(2).mean() * tar
    return penalty


# ---- weight conversion between the cores ---------------------------------------------------
#
# The scratch core stores each layer packed — W_x (inputs, blocks·H), W_h (H, blocks·H), b (and
# b_hh where the cell has one) — with the blocks in torch's order, so torch's weight_ih is W_xᵀ,
# weight_hh is W_hᵀ, and its two biases add up to b (`Cell.to_torch`, `Cell.from_torch`).
# Checkpoints of the first release hold the LSTM's twelve tensors per layer (W_xi, W_hi, b_i, …):
# `checkpoint.migrate` packs them.


def scratch_key(layer: int, name: str) -> str:
    """The state-dict key of scratch layer `layer`'s packed parameter `name` (W_x, W_h, b, b_hh)."""
    return f"core.layers.{layer}.{name}"


def torch_key(cell: Cell, layer: int, name: str) -> str:
    """The state-dict key of torch's parameter `name` (weight_ih, …) of layer `layer`."""
    return f"core.{cell.name}.{name}_l{layer}"


def scratch_layer(state_dict: dict[str, torch.Tensor], layer: int, cell: Cell) -> dict[str, torch.Tensor]:
    """Scratch layer `layer`'s parameters by the article's names (views of the packed ones),
    from a scratch state dict."""
    return cell.views(packed_layer(state_dict, layer, cell))


def packed_layer(state_dict: dict[str, torch.Tensor], layer: int, cell: Cell) -> dict[str, torch.Tensor]:
    return {name: state_dict[scratch_key(layer, name)] for name in cell.packed_names()}


def core_of(state_dict: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(tuple(f"core.{name}." for name in cells.NAMES)) for k in state_dict):
        return "cudnn"
    if any(k.startswith("core.layers.") for k in state_dict):
        return "scratch"
    raise CheckpointError("the weights hold neither a scratch nor a torch core")


def _shared(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state_dict.items() if not k.startswith("core.")}


def _num_layers(state_dict: dict[str, torch.Tensor], pattern: str) -> int:
    return len({int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))})


def scratch_to_torch(state_dict: dict[str, torch.Tensor], cell: Cell) -> dict[str, torch.Tensor]:
    if not cell.torch_equivalent:
        raise CheckpointError(f"the {cell.title}'s {cell.form} form has no torch module to convert its weights to")
    out = _shared(state_dict)
    for k in range(_num_layers(state_dict, r"core\.layers\.(\d+)\.")):
        out.update({torch_key(cell, k, name): p for name, p in cell.to_torch(packed_layer(state_dict, k, cell)).items()})
    return out


def torch_to_scratch(state_dict: dict[str, torch.Tensor], cell: Cell) -> dict[str, torch.Tensor]:
    out = _shared(state_dict)
    for k in range(_num_layers(state_dict, rf"core\.{cell.name}\.weight_ih_l(\d+)$")):
        weights = {name: state_dict[torch_key(cell, k, name)] for name in TORCH_PARAMETERS}
        out.update({scratch_key(k, name): p for name, p in cell.from_torch(weights).items()})
    return out


def convert(state_dict: dict[str, torch.Tensor], core: str, cell: Cell) -> dict[str, torch.Tensor]:
    """The state dict for a CharLM with `core` and `cell`, whichever core it was saved from
    (a checkpoint of the first release's layout is packed by `checkpoint.migrate`)."""
    source = core_of(state_dict)
    if source == core:
        return dict(state_dict)
    return scratch_to_torch(state_dict, cell) if core == "cudnn" else torch_to_scratch(state_dict, cell)
