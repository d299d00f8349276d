"""Starting, resuming and loading runs: what each command does, as library calls.

The CLI reads options, calls one function here, and renders what it returns:

    prepare_training → training      lstmlm train (config → data → run store → lock → Trainer → resume)
    start_generation, Conversation   lstmlm generate (--interactive: one model, a turn per prefix)
    evaluate_file                    lstmlm evaluate
    inspect_run                      lstmlm inspect
    export_run                       lstmlm export

Runs are named, never pathed: `--run NAME` is `RUNS_DIR/NAME` in every command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

from . import checkpoint, config, distributed
from .atomic import write_text_atomic
from .config import Config
from .corpus import Progress
from .data.pipeline import Data, prepare_data
from .data.text import read_text
from .device import resolve_device, resolve_precision
from .distributed import World
from .errors import ConfigError
from .evaluation import Score, score_text
from .events import Event
from .generate import Continuation, Sampling, generate, prepare_prefix
from .model import CharLM, convert
from .runs import BEST, LATEST, RunStore, check_run_name
from .train import Trainer
from .units import Inspection, inspect_text

if TYPE_CHECKING:
    from .export import Exported
from .vocab import Vocab

# ---- training ---------------------------------------------------------------------------------


class StopFlag:
    """Set by SIGINT/SIGTERM: training finishes the current batch, saves, and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, _frame: FrameType | None) -> None:
            if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def default_run_name(cfg: Config, runs_dir: Path) -> str:
    """corpus-model, with -2, -3, ... when that run exists already."""
    base = f"{Path(cfg.data.corpus).stem or 'corpus'}-{cfg.model.model}"
    name, n = base, 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def open_for_resume(runs_dir: Path, run: str | None, overrides: dict[str, Any]) -> tuple[RunStore, Config]:
    """The run to continue and its stored config with the options a resume may change
    (config.RESUMABLE); any other option that differs from the stored value is refused."""
    store = RunStore.find(runs_dir, run)
    stored = store.config
    for key, value in overrides.items():
        if value is None or key in config.RESUMABLE:
            continue
        current = stored.value(key)
        if value != current:
            raise ConfigError(
                f"--resume keeps the run's stored {key} = {current!r}; it cannot change to {value!r} "
                f"(start a new --run instead)"
            )
    return store, stored.with_overrides({k: v for k, v in overrides.items() if k in config.RESUMABLE})


@dataclass(frozen=True)
class Plan:
    """A training made ready: its config, its data, and the run it writes (`store` when resuming)."""

    config: Config
    data: Data
    runs_dir: Path
    run: str | None
    store: RunStore | None


def prepare_training(
    runs_dir: Path,
    run: str | None = None,
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    resume: bool = False,
    progress: Progress | None = None,
) -> Plan:
    """The effective config (a file, then options; or the resumed run's) and its data, read or
    downloaded (`progress` follows a download). Nothing is written yet."""
    overrides = overrides or {}
    if run is not None:
        check_run_name(run)
    store = None
    if resume:
        store, cfg = open_for_resume(runs_dir, run, overrides)
    else:
        base = config.load(config_file) if config_file else Config()
        cfg = base.with_overrides(overrides).resolved()
    resolve_device(cfg.train.device)  # an absent device is refused before any download
    data = prepare_data(cfg, vocab=store.vocab if store else None, progress=progress)
    return Plan(cfg, data, runs_dir, run, store)


@dataclass(frozen=True)
class Training:
    trainer: Trainer
    store: RunStore
    world: World

    @property
    def config(self) -> Config:
        return self.trainer.cfg

    def run(self, should_stop: StopFlag | None = None) -> Iterator[Event]:
        return self.trainer.run(should_stop or (lambda: False))


@contextlib.contextmanager
def training(plan: Plan) -> Iterator[Training]:
    """Join the processes (under torchrun), create the run (or open it), hold its lock, build the
    Trainer and resume it from its checkpoint; leave the process group on the way out."""
    cfg = plan.config
    world = distributed.from_environment()  # several processes under torchrun, else one
    device = distributed.start(world, resolve_device(cfg.train.device), cfg.data.batch_size)
    try:
        precision = resolve_precision(cfg.train.precision, device)
        store = plan.store or create_run(plan.runs_dir / (plan.run or default_run_name(cfg, plan.runs_dir)), cfg, plan.data.vocab, world)
        with store.locked() if world.is_main else contextlib.nullcontext():
            trainer = Trainer(store, cfg, plan.data, device, precision, world)
            if plan.store is not None and store.has_checkpoint():
                trainer.resume()
            yield Training(trainer, store, world)
    finally:
        distributed.stop(world)


def create_run(path: Path, cfg: Config, vocab: Vocab, world: World) -> RunStore:
    """Rank 0 creates the run; the others open it once it exists."""
    distributed.barrier(world)  # every process has chosen the name before it exists
    store = RunStore.create(path, cfg, vocab) if world.is_main else None
    distributed.barrier(world)
    return store or RunStore.open(path)


# ---- a trained model ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """A model from a run's checkpoint, in eval mode on the CPU, with what it was trained on."""

    model: CharLM
    config: Config
    vocab: Vocab
    prime: str  # the text generation reads before a prefix ("" if none)
    store: RunStore


def load_trained(runs_dir: Path, run: str | None = None, core: str | None = None, best: bool = False) -> Trained:
    """Run `run` (default: the most recently trained) from its latest or best checkpoint,
    converted to `core` if asked."""
    store = RunStore.find(runs_dir, run)
    which = BEST if best else LATEST
    payload = checkpoint.load(store, which)
    cfg, vocab = checkpoint.checkpoint_config(payload), checkpoint.checkpoint_vocab(payload)
    core = core or cfg.model.model
    if core not in ("scratch", "cudnn"):
        raise ConfigError(f"--model must be scratch or cudnn, not {core!r}")
    net = CharLM.from_config(dataclasses.replace(cfg.model, model=cast(config.Core, core)), len(vocab))
    checkpoint.load_weights(net, convert(payload["model"], core), store.path(which))
    return Trained(net.eval(), cfg, vocab, checkpoint.checkpoint_prime(payload, vocab), store)


@dataclass(frozen=True)
class Generation:
    prefix: str  # as the model reads it: d2l-normalized for a d2l model
    normalized: bool  # whether that changed the prefix given
    steps: Continuation  # per step, the text each sample adds (see generate.Continuation)


def continue_prefix(trained: Trained, prefix: str, sampling: Sampling, precision: str = "fp32", context: str | list[str] = "") -> Generation:
    """Continue `prefix` with a loaded model (on its device), having read `context` first (a
    text, or tokens: see generate.generate)."""
    text = prepare_prefix(prefix, trained.vocab, trained.config.data.normalize)
    steps = generate(trained.model, trained.vocab, text, sampling, context, precision)
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
    trained, prec = load_for_generation(runs_dir, run, core, best, device, precision)
    return continue_prefix(trained, prefix, sampling, prec, trained.prime if prime else "")


def load_for_generation(runs_dir: Path, run: str | None, core: str | None, best: bool, device: str, precision: str) -> tuple[Trained, str]:
    """A trained model moved to `device`, and the precision it generates in there."""
    trained = load_trained(runs_dir, run, core, best)
    dev = resolve_device(device)
    trained.model.to(dev)
    return trained, resolve_precision(precision, dev)


class Conversation:
    """`lstmlm generate --interactive`: the model loaded once, each `turn` a prefix continued.

    Without `carry` every turn starts afresh (after the prime), exactly as `lstmlm generate`
    with the same options. With `carry` a turn reads on from where the last one ended: its
    context is the prime and every token read and written so far — each prefix, and what the
    model wrote after it, held-back text and stop strings included, as far as it got — which
    puts the LSTM in the state that reading them gives; an empty prefix simply continues. A
    seed then moves on by one a turn (turn k samples with seed + k): the session repeats, but
    its turns do not draw the same random numbers over again.
    """

    def __init__(self, trained: Trained, sampling: Sampling, precision: str = "fp32", prime: bool = True, carry: bool = False) -> None:
        if carry and sampling.num_samples > 1:
            raise ConfigError("--carry keeps one state between turns: it needs --num-samples 1")
        self.trained, self.sampling, self.precision, self.carry = trained, sampling, precision, carry
        self.context: list[str] = list(trained.prime if prime else "")  # the tokens every turn reads first
        self.turns = 0
        self._last: Generation | None = None

    def turn(self, prefix: str) -> Generation:
        if self.carry and self._last is not None:  # the last turn, as far as the model got
            self.context += [*self._last.prefix, *self._last.steps.tokens[0]]
            self._last = None
        sampling = self.sampling
        if self.carry and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + self.turns)
        if self.carry and self.turns and prefix == "":
            model, vocab = self.trained.model, self.trained.vocab
            generation = Generation("", False, generate(model, vocab, "", sampling, self.context, self.precision))
        else:
            generation = continue_prefix(self.trained, prefix, sampling, self.precision, self.context)
        self.turns += 1
        self._last = generation
        return generation


def evaluate_file(
    runs_dir: Path, run: str | None, file: Path, best: bool = False, device: str = "cpu", precision: str = "fp32"
) -> Score:
    """Perplexity and bits per character of a text file under a trained model, as validation measures them."""
    trained = load_trained(runs_dir, run, best=best)
    dev = resolve_device(device)
    d = trained.config.data
    return score_text(trained.model, trained.vocab, read_text(file), d.normalize, d.batch_size, d.num_steps, dev, resolve_precision(precision, dev))


@dataclass(frozen=True)
class InspectedRun:
    run: str
    inspection: Inspection


def inspect_run(
    runs_dir: Path,
    run: str | None,
    text: str | None = None,
    file: Path | None = None,
    gate: str = "cell",
    layer: int | None = None,
    units: list[int] | None = None,
    find: str | None = None,
    top: int = 3,
    best: bool = False,
    html: Path | None = None,
) -> InspectedRun:
    """A text (given, or read from `file`) read through a trained model, the units to show
    chosen; with `html`, the whole analysis also written as a page there."""
    if (text is None) == (file is None):
        raise ConfigError("give the text with exactly one of --text or --file")
    trained = load_trained(runs_dir, run, best=best)
    given = text if text is not None else read_text(file)  # type: ignore[arg-type]
    inspection = inspect_text(trained.model, trained.vocab, trained.config.data.normalize, given, gate, layer, units, find, top)
    if html is not None:
        from .units_page import html_page

        ranking = inspection.ranking[: max(top, 10)]
        page = html_page(inspection.layers, inspection.text, f"lstmlm inspect · {trained.store.name}", find, gate, ranking)
        write_text_atomic(html, page, "page")
    return InspectedRun(trained.store.name, inspection)


def export_run(runs_dir: Path, run: str | None, format: str, output: Path | None = None, best: bool = False) -> Exported:
    """A trained run's one-step model written to `output` (default: RUN.onnx or RUN.pt here),
    checked against lstmlm first."""
    from .export import FORMATS, SUFFIXES, export_model

    if format not in FORMATS:
        raise ConfigError(f"--format must be onnx or torchscript, not {format!r}")
    trained = load_trained(runs_dir, run, best=best)
    path = output if output is not None else Path(trained.store.name + SUFFIXES[format])
    return export_model(trained.model, trained.vocab, trained.config.data.normalize, trained.prime, trained.store.name, path, format)
