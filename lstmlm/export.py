"""`lstmlm export`: a trained model as one step of its cell, for a runtime without lstmlm.

    logits, H, C = step(ids, H, C)     the LSTM: ids (batch,) int64 · H, C (layers, batch, hiddens) float32
    logits, H = step(ids, H)           the GRU and the RNN, whose state is H alone
                                       logits (batch, vocab): the next character's, before softmax

ONNX (run by onnxruntime, or any ONNX runtime; needs `pip install 'lstmlm[export]'`) or
TorchScript (torch.jit.load, libtorch in C++). The step is `OneStep`: the cell's equations (its
`step`, the code every core is checked against) on the model's parameters in the scratch
layout, whichever core trained them, with the batch left open. The file carries what a loop
needs besides the weights as metadata under "lstmlm" (JSON): the vocabulary (id → token), the
text normalization, the prime (the training text generation reads before a prefix; see
generate.prime_text), the cell, and the state's names and shape.

Every export is checked before it is kept: the exported file, loaded in its runtime, steps
through CHECK_STEPS characters beside lstmlm's own forward and must give the same logits.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from . import __version__
from .atomic import write_output
from .cells.base import Cell, State, project
from .errors import ExportError, WriteError
from .model import CharLM, convert, scratch_layer
from .vocab import Vocab

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
NAMED_BY = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript", ".torchscript": "torchscript"}
EXTRA_HINT = "exporting to ONNX needs onnx, onnxscript and onnxruntime: pip install 'lstmlm[export]'"
CHECK_STEPS = 64  # characters the exported file steps through beside lstmlm before it is kept
TOLERANCE = 1e-4  # the largest difference in a logit allowed between the two (float32 rounding)
OPSET = 18


def choose_format(format: str | None, output: Path | None) -> str:
    """The format asked for, else the one the output's suffix names, else ONNX; a suffix that
    names the other format is refused (`-o model.pt` writing ONNX, unsaid, was a file that
    torch.jit.load cannot read)."""
    if format is not None and format not in FORMATS:
        raise ExportError(f"--format must be onnx or torchscript, not {format!r}")
    named = NAMED_BY.get(output.suffix.lower()) if output is not None else None
    if output is not None and format is not None and named is not None and named != format:
        raise ExportError(f"-o {output}: its suffix {output.suffix} is {named}'s, not {format}'s: name it {SUFFIXES[format]}, or leave --format out")
    return format or named or "onnx"


class OneStep(nn.Module):
    """One character through the model: ids and the state → logits and the next state; no
    dropout, float32. `StepHC` and `StepH` give it the signature of a two- or one-tensor state."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.cell: Cell = model.cell
        weights = {k: v.detach().float().cpu().clone() for k, v in convert(model.state_dict(), "scratch", model.cell).items()}
        self.num_layers = model.num_layers
        self.embedding = nn.Parameter(weights["embedding.weight"], requires_grad=False) if model.embedding is not None else None
        self.layers = nn.ModuleList(
            nn.ParameterDict({name: nn.Parameter(p.clone(), requires_grad=False) for name, p in scratch_layer(weights, k, model.cell).items()})
            for k in range(model.num_layers)
        )
        self.W_hq = nn.Parameter(weights["W_hq"], requires_grad=False)  # (hiddens, vocab)
        self.b_q = nn.Parameter(weights["b_q"], requires_grad=False)

    def run(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        X = self.embedding[ids] if self.embedding is not None else ids  # (batch, embedding) or ids, read as one-hot
        finals = []
        for k in range(self.num_layers):
            p = cast(Mapping[str, torch.Tensor], self.layers[k])  # the layer's parameters, by the article's names
            step = self.cell.step({g: project(X, p[f"W_x{g}"]) for g in self.cell.blocks}, tuple(S[k] for S in state), p)
            final = self.cell.next_state(step)
            finals.append(final)
            X = final[0]  # the next layer reads this one's H
        logits = X @ self.W_hq + self.b_q  # (batch, vocab)
        return logits, tuple(torch.stack([f[i] for f in finals]) for i in range(len(state)))


class StepHC(OneStep):
    def forward(self, ids: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, (H, C) = self.run(ids, (H, C))
        return logits, H, C


class StepH(OneStep):
    def forward(self, ids: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, (H,) = self.run(ids, (H,))
        return logits, H


def one_step(model: CharLM) -> OneStep:
    return StepHC(model) if len(model.cell.state) == 2 else StepH(model)


def metadata(model: CharLM, vocab: Vocab, normalize: str, prime: str, run: str) -> dict[str, Any]:
    """What a generation loop needs besides the weights."""
    return {
        "lstmlm": __version__,
        "run": run,
        "tokens": vocab.tokens,  # id → token; a token is one character, or "<unk>"
        "normalize": normalize,  # "d2l": lowercase letters and spaces (lstmlm's data.text.normalize); "raw": as is
        "prime": prime,
        "cell": model.cell.name,
        "form": model.cell.form,
        "layers": model.num_layers,
        "hiddens": model.num_hiddens,
        "inputs": input_names(model.cell),
        "outputs": output_names(model.cell),
    }


def input_names(cell: Cell) -> list[str]:
    return ["ids", *cell.state]


def output_names(cell: Cell) -> list[str]:
    """The step's outputs as the ONNX graph names them: the next state apart from the state fed
    in (an ONNX graph's names are unique), so `session.run(meta["outputs"], …)` finds them."""
    return ["logits", *(f"{name}_next" for name in cell.state)]


@dataclass(frozen=True)
class Exported:
    path: Path
    format: str
    bytes: int
    checked_steps: int
    max_difference: float  # the largest |logit difference| with lstmlm over the checked steps


def export_model(model: CharLM, vocab: Vocab, normalize: str, prime: str, run: str, path: Path, format: str, force: bool = False) -> Exported:
    """Write `model`'s one step to `path` in `format`, checked against lstmlm before it is kept
    (atomic.write_output: an export that fails leaves nothing, or the file that was there; an
    existing file is replaced only with `force`)."""
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r} (choose onnx or torchscript)")
    step = one_step(model).eval()
    meta = metadata(model, vocab, normalize, prime, run)
    with tempfile.TemporaryDirectory(prefix="lstmlm-export-") as tmp:
        staged = Path(tmp) / f"model{SUFFIXES[format]}"
        if format == "onnx":
            write_onnx(step, meta, staged)
        else:
            write_torchscript(step, meta, staged)
        difference = check(staged, format, model, len(vocab))
        if not difference <= TOLERANCE:
            raise ExportError(f"the exported model's logits differ from lstmlm's by {difference:.3g} (over {TOLERANCE:g}); nothing was written")
        data = staged.read_bytes()
    write_output(Path(path), lambda f: f.write(data), "exported model", force)
    return Exported(Path(path), format, len(data), CHECK_STEPS, difference)


def example_inputs(step: OneStep, hiddens: int, batch: int = 2) -> tuple[torch.Tensor, ...]:
    shape = (step.num_layers, batch, hiddens)
    return (torch.zeros(batch, dtype=torch.long), *(torch.zeros(shape) for _ in step.cell.state))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters' progress lines, deprecation notes and logging are not the CLI's output."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def write_onnx(step: OneStep, meta: dict[str, Any], path: Path) -> None:
    """torch's exporter (torch.export → ONNX), the batch dimension left open, metadata added."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError:
        raise ExportError(EXTRA_HINT) from None
    batch = torch.export.Dim("batch", min=1)
    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            step,
            example_inputs(step, step.W_hq.shape[0]),
            input_names=input_names(step.cell),
            output_names=output_names(step.cell),
            dynamic_shapes=({0: batch}, *({1: batch} for _ in step.cell.state)),
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
        assert program is not None
    try:
        with quiet():
            program.save(str(path))
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = "lstmlm", json.dumps(meta)
        onnx.save(proto, str(path))
    except OSError as e:  # a full $TMPDIR: the exporter's bare "No space left on device" named no write
        raise WriteError(f"cannot write the exported model {path}: {e.strerror or e}") from None


def write_torchscript(step: OneStep, meta: dict[str, Any], path: Path) -> None:
    """A traced module (the step has no data-dependent control flow), metadata as an extra file.

    Saved into memory, then written by Python: torch's own file writer, when a write fails
    mid-file (a full $TMPDIR), throws from its destructor and aborts the process (exit 134),
    so nothing — the staging directory included — is cleaned up and no error line is printed.
    A model is a few MB; holding it once in memory costs nothing by comparison."""
    with quiet(), torch.no_grad():
        traced = torch.jit.trace(step, example_inputs(step, step.W_hq.shape[0]), check_trace=False)
        saved = io.BytesIO()
        torch.jit.save(traced, saved, _extra_files={"lstmlm.json": json.dumps(meta)})
    try:
        with open(path, "wb") as f:
            f.write(saved.getbuffer())
    except OSError as e:
        raise WriteError(f"cannot write the exported model {path}: {e.strerror or e}") from None


# ---- reading an exported file back ------------------------------------------------------------


def load_runtime(path: Path, format: str, state: tuple[str, ...] = ("H", "C")) -> Any:
    """A callable (ids, *state) → (logits, *state) of numpy arrays, running the file in its
    runtime; `state`: the names of the state's tensors, as the metadata's "inputs" give them."""
    import numpy as np

    if format == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError(EXTRA_HINT) from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda ids, *S: tuple(session.run(None, {"ids": ids, **dict(zip(state, S))}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated; TorchScript files still load
        module = torch.jit.load(str(path))

    def run(ids: Any, *S: Any) -> tuple[Any, ...]:
        with torch.no_grad():
            outputs = module(torch.from_numpy(ids), *(torch.from_numpy(s) for s in S))
        return tuple(np.asarray(t) for t in outputs)

    return run


def read_metadata(path: Path, format: str) -> dict[str, Any]:
    """The metadata an export carries (`metadata`)."""
    if format == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return dict(json.loads(props["lstmlm"]))
    extra = {"lstmlm.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.load(str(path), _extra_files=extra)
    return dict(json.loads(extra["lstmlm.json"]))


@torch.no_grad()
def check(path: Path, format: str, model: CharLM, vocab_size: int, steps: int = CHECK_STEPS, batch: int = 2) -> float:
    """The largest |logit difference| between the exported file in its runtime, stepping one
    character at a time from the zero state, and lstmlm's forward (of `model`, in eval mode on
    the CPU) over the same characters."""
    if model.training:
        raise ExportError("the model must be in eval mode to be checked (dropout would differ)")
    ids = torch.randint(vocab_size, (batch, steps), generator=torch.Generator().manual_seed(0))
    expected, _ = model(ids)  # (batch, steps, vocab)
    run = load_runtime(path, format, model.cell.state)
    shape = (model.num_layers, batch, model.num_hiddens)
    state = tuple(torch.zeros(shape).numpy() for _ in model.cell.state)
    worst = 0.0
    for t in range(steps):
        logits, *state = run(ids[:, t].numpy(), *state)
        worst = max(worst, float((torch.from_numpy(logits) - expected[:, t]).abs().max()))
    return worst
