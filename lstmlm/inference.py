"""A trained model, loaded one way, then used: generate, evaluate, inspect, export.

The CLI reads options, calls one function here, and renders what it returns:

    load                          every command below: a run's checkpoint, on a device, in a precision
    start_generation, Conversation  lstmlm generate (--interactive: one model, a turn per prefix)
    evaluate                      lstmlm evaluate FILE, lstmlm evaluate --part val|test
    inspect_run                   lstmlm inspect
    export_run                    lstmlm export

Runs are named, never pathed: `--run NAME` is `RUNS_DIR/NAME` in every command.
"""

from __future__ import annotations

import codecs
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, get_args

import torch

from . import baselines, checkpoint, config
from .atomic import check_output, write_text_output
from .config import Config
from .data.download import StageProgress
from .data.pipeline import encode_file, prepare_data
from .data.text import as_text, normalize, read_text
from .device import resolve_device, resolve_precision
from .errors import ConfigError, VocabError
from .evaluation import Score, score_ids
from .generate import Continuation, Step, generate, one_by_one, prepare_prefix, read
from .model import CharLM, convert
from .runs import BEST, LATEST, RunStore
from .sampling import Sampling
from .units import Inspection, inspect_text
from .vocab import Vocab, describe_chars

if TYPE_CHECKING:
    from .export import Exported


@dataclass(frozen=True)
class Trained:
    """A model from a run's checkpoint, in eval mode on its device, with what it was trained on."""

    model: CharLM
    config: Config
    vocab: Vocab
    prime: str  # the text generation reads before a prefix ("" if none)
    store: RunStore
    precision: str = "fp32"  # what it computes in on its device: fp32, or bf16 where asked for and run natively

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def load(runs_dir: Path, run: str | None = None, core: str | None = None, best: bool = False, device: str = "cpu", precision: str = "fp32") -> Trained:
    """The one way to load a trained model: run `run` (default: the most recently trained) from
    its latest or best checkpoint, converted to `core` if asked, on `device` in `precision`."""
    store = RunStore.find(runs_dir, run)
    which = BEST if best else LATEST
    payload = checkpoint.load(store, which)
    cfg, vocab = checkpoint.checkpoint_config(payload), checkpoint.checkpoint_vocab(payload)
    core = core or cfg.model.model
    if core not in get_args(config.Core):
        raise ConfigError(f"--model must be {' or '.join(get_args(config.Core))}, not {core!r}")
    try:
        model_cfg = config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "model": core}}).model
    except ConfigError as e:
        raise ConfigError(f"run {store.name} cannot run as --model {core}: {e}") from None
    net = CharLM.from_config(model_cfg, len(vocab))
    checkpoint.load_weights(net, convert(payload["model"], core, net.cell), store.path(which))
    dev = resolve_device(device)
    net.to(dev)
    return Trained(net.eval(), cfg, vocab, checkpoint.checkpoint_prime(payload, vocab), store, resolve_precision(precision, dev))


@dataclass(frozen=True)
class Generation:
    prefix: str  # as the model reads it: d2l-normalized for a d2l model
    normalized: bool  # whether that changed the prefix given
    steps: Continuation  # per step, the text each sample adds (see generate.Continuation; a bytes model's, decoded)


def continue_prefix(trained: Trained, prefix: str, sampling: Sampling, precision: str | None = None, context: str | list[str] = "") -> Generation:
    """Continue `prefix` with a loaded model (on its device, in `precision`: by default the one
    `load` was given), having read `context` first (a text, or tokens: see generate.generate).
    A bytes model reads the prefix's UTF-8 bytes and its steps come decoded (`Decoded`)."""
    text = read_prefix(trained, prefix)
    steps = generate(trained.model, trained.vocab, text, read_stops(trained, sampling), context, precision or trained.precision)
    return as_generation(trained, prefix, text, steps)


def read_prefix(trained: Trained, prefix: str) -> str:
    """The prefix as the model reads it: d2l-normalized, a bytes model's UTF-8 bytes; checked."""
    mode = trained.config.data.normalize
    return prepare_prefix(normalize(prefix, mode) if mode == "bytes" else prefix, trained.vocab, mode)


def read_stops(trained: Trained, sampling: Sampling) -> Sampling:
    """`sampling` with its stop strings in the symbols the model writes: a d2l model's
    lowercased (it writes no capitals), a bytes model's as their UTF-8 bytes, which its steps are
    matched against before they are decoded (`Decoded`). A stop string holding a symbol the
    model never writes could never end a sample: it is refused, as such a prefix is."""
    mode = trained.config.data.normalize
    stops = tuple(stop.lower() if mode == "d2l" else normalize(stop, mode) for stop in sampling.stop)
    for given, stop in zip(sampling.stop, stops):
        unknown = trained.vocab.unknown_chars(stop)
        if unknown:
            never = " ".join(f"0x{ord(b):02x}" for b in sorted(set(unknown))) if mode == "bytes" else describe_chars(unknown)
            raise VocabError(f"the stop string {given!r} can never appear: the model never writes {never}")
    return dataclasses.replace(sampling, stop=stops) if stops != sampling.stop else sampling


def as_generation(trained: Trained, prefix: str, text: str, steps: Continuation) -> Generation:
    """The continuation of `prefix` (read as `text`) whose steps the model makes in `steps`."""
    if trained.config.data.normalize == "bytes":
        return Generation(as_text(text, "bytes"), False, Decoded(steps, len(steps.ended)))
    return Generation(text, text != prefix, steps)


def start_generation(
    runs_dir: Path,
    run: str | None,
    prefix: str,
    sampling: Sampling,
    core: str | None = None,
    best: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    prime: bool = True,
) -> Generation:
    """Continue `prefix` with a trained model; the characters come as `steps` is iterated."""
    trained = load(runs_dir, run, core, best, device, precision)
    return continue_prefix(trained, prefix, sampling, trained.precision, trained.prime if prime else "")


class Conversation:
    """`lstmlm generate --interactive`: the model loaded once, each `turn` a prefix continued.

    Without `carry` every turn starts afresh (after the prime), exactly as `lstmlm generate`
    with the same options. With `carry` a turn reads on from where the last one ended: its
    context is the prime and every token read and written so far — each prefix, and what the
    model wrote after it, held-back text and stop strings included, as far as it got — which
    puts the LSTM in the state that reading them gives; an empty prefix simply continues. A
    seed then moves on by one a turn (turn k samples with seed + k): the session repeats, but
    its turns do not draw the same random numbers over again.

    The state is carried, not the history re-read: the state after the first `read` tokens of
    the context is kept, and a turn reads only what came after them (the last turn's text and
    its prefix), so a turn costs the same after 400 turns as after one.
    """

    def __init__(self, trained: Trained, sampling: Sampling, precision: str = "fp32", prime: bool = True, carry: bool = False) -> None:
        if carry and sampling.num_samples > 1:
            raise ConfigError("--carry keeps one state between turns: it needs --num-samples 1")
        read_stops(trained, sampling)  # checked once, not at every turn
        self.trained, self.sampling, self.carry = trained, sampling, carry
        self.precision = resolve_precision(precision, trained.device)  # once: every turn reads and writes in it
        self.context: list[str] = list(trained.prime if prime else "")  # the tokens every turn reads first
        self.turns = 0
        self._last: tuple[str, Generation] | None = None  # the last turn: its prefix as read, its generation
        self.read, self._state = 0, trained.model.begin_state(1)  # the state after reading context[:read]

    def turn(self, prefix: str) -> Generation:
        if not self.carry:
            self.turns += 1
            return continue_prefix(self.trained, prefix, self.sampling, self.precision, self.context)
        if self._last is not None:  # the last turn, as far as the model got
            text, last = self._last
            self.context += [*text, *last.steps.tokens[0]]
            self._last = None
        sampling = self.sampling
        if sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + self.turns)
        text = "" if self.turns and prefix == "" else read_prefix(self.trained, prefix)
        model, vocab = self.trained.model, self.trained.vocab
        whole = [*self.context, *text]  # the last of it is the first step's input
        self._state = read(model, vocab, whole[self.read : -1], self._state, self.precision)
        self.read = len(whole) - 1
        steps = generate(model, vocab, "", read_stops(self.trained, sampling), whole[-1:], self.precision, self._state)
        generation = as_generation(self.trained, prefix, text, steps)
        self.turns += 1
        self._last = (text, generation)
        return generation


class Decoded(Continuation):
    """A bytes model's steps as text: each sample's bytes decoded as UTF-8 as they come (a
    character made of several bytes appears with its last; an invalid sequence as U+FFFD), a
    last step adding what is left. What the model wrote (`tokens`, `ended`) stays the bytes
    model's own: reading them back (--carry) puts it where the sample left it."""

    def __init__(self, steps: Continuation, samples: int) -> None:  # wraps: keeps no chunks of its own
        self.steps = steps
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(samples)]
        self._flushed = False

    @property
    def ended(self) -> list[str | None]:  # type: ignore[override]
        return self.steps.ended

    @property
    def tokens(self) -> list[list[str]]:
        return self.steps.tokens

    @property
    def ahead(self) -> int:  # type: ignore[override]
        return self.steps.ahead

    @property
    def text(self) -> list[str]:
        return [as_text("".join(t), "bytes") for t in self.steps.text]

    def __next__(self) -> list[str]:
        try:
            symbols = next(self.steps)
        except StopIteration:
            if self._flushed:
                raise
            self._flushed = True
            return [d.decode(b"", final=True) for d in self.decoders]
        return [d.decode(c.encode("latin-1")) for d, c in zip(self.decoders, symbols)]

    def several(self, n: int) -> list[Step]:
        return one_by_one(self, n)

    def end_here(self) -> Step:
        """`Continuation.end_here` decoded: what a stop string held back, then what the decoders
        hold (a character cut short by the end shows U+FFFD, as at the length)."""
        held = self.steps.end_here()
        self._flushed = True
        return [d.decode(h.encode("latin-1"), final=True) for d, h in zip(self.decoders, held)]

    def close(self) -> None:
        self.steps.close()


PARTS = ("train", "val", "test")


def evaluate(
    runs_dir: Path,
    run: str | None,
    file: Path | None = None,
    part: str | None = None,
    best: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    progress: StageProgress | None = None,
) -> Score:
    """Perplexity and bits per character (per byte) under a trained model, as validation
    measures them, of a text `file` (or a directory, or a glob: all of it, streamed like a
    corpus) or of a `part` of the run's own corpus (the whole of it, split as the run was;
    training validated on a sample, `val_tokens`); beside it, the run's baselines on the same
    characters (where the run keeps its counts)."""
    if (file is None) == (part is None):
        raise ConfigError("give a FILE to score, or --part val|test for the run's own text (not both)")
    if part is not None and part not in PARTS:
        raise ConfigError(f"--part must be one of {', '.join(PARTS)}, not {part!r}")
    trained = load(runs_dir, run, best=best, device=device, precision=precision)
    d = trained.config.data
    if file is not None:
        encoded = encode_file(file, trained.vocab, d.normalize, progress, scratch=runs_dir)
        ids, unknown = encoded.ids, encoded.unknown
    else:
        data = prepare_data(trained.config, vocab=trained.vocab, progress=progress, scratch=runs_dir)
        ids = {"train": data.train, "val": data.val, "test": data.test}[str(part)]
        if len(ids) < 2:
            how = f"--split {d.split}" if d.split else f"--val-fraction {d.val_fraction}"
            raise ConfigError(f"run {trained.store.name} has no {part} text (it was trained with {how})")
        unknown = trained.vocab.count_unknown(ids)
    score = score_ids(trained.model, ids, unknown, d.normalize, d.batch_size, d.num_steps, trained.device, trained.precision)
    return dataclasses.replace(score, baselines=baselines.for_text(trained.store.root, ids, d.batch_size, d.num_steps))


@dataclass(frozen=True)
class InspectedRun:
    run: str
    inspection: Inspection


def inspect_run(
    runs_dir: Path,
    run: str | None,
    text: str | None = None,
    file: Path | None = None,
    gate: str | None = None,
    layer: int | None = None,
    units: list[int] | None = None,
    find: str | None = None,
    top: int = 3,
    best: bool = False,
    html: Path | None = None,
    force: bool = False,
) -> InspectedRun:
    """A text (given, or read from `file`) read through a trained model, the units to show
    chosen; with `html`, the whole analysis also written as a page there (atomic.write_output's
    rule: an existing file only with `force`)."""
    if (text is None) == (file is None):
        raise ConfigError("give the text with exactly one of --text or --file")
    if html is not None:
        check_output(html, force)  # refused before the work, not after
    trained = load(runs_dir, run, best=best)
    given = text if text is not None else read_text(file)  # type: ignore[arg-type]
    inspection = inspect_text(trained.model, trained.vocab, trained.config.data.normalize, given, gate, layer, units, find, top)
    if html is not None:
        from .units_page import html_page

        ranking = inspection.ranking[: max(top, 10)]
        page = html_page(inspection.layers, inspection.text, f"lstmlm inspect · {trained.store.name}", find, inspection.gate.name, ranking)
        write_text_output(html, page, "page", force)
    return InspectedRun(trained.store.name, inspection)


def export_run(runs_dir: Path, run: str | None, format: str | None, output: Path | None = None, best: bool = False, force: bool = False) -> Exported:
    """A trained run's one-step model written to `output` (default: RUN.onnx or RUN.pt here) in
    `format` (default: the one the output's suffix names, else ONNX), checked against lstmlm
    first (atomic.write_output's rule: an existing file only with `force`)."""
    from .export import SUFFIXES, choose_format, export_model

    output = Path(output) if output is not None else None  # a library caller's str too
    format = choose_format(format, output)
    trained = load(runs_dir, run, best=best)
    path = output if output is not None else Path(trained.store.name + SUFFIXES[format])
    check_output(path, force)  # refused before the export, not after
    return export_model(trained.model, trained.vocab, trained.config.data.normalize, trained.prime, trained.store.name, path, format, force)
