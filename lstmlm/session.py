"""Starting, resuming and loading runs: what each command does, as library calls.

The CLI reads options, calls one function here, and renders what it returns:

    prepare_training → training      lstmlm train (config → data → run store → lock → Trainer → resume)
    start_generation, Conversation   lstmlm generate (--interactive: one model, a turn per prefix)
    evaluate_file, evaluate_part     lstmlm evaluate FILE, lstmlm evaluate --part val|test
    inspect_run                      lstmlm inspect
    export_run                       lstmlm export

Runs are named, never pathed: `--run NAME` is `RUNS_DIR/NAME` in every command.

A resume does what the stored run says, plus the options a resume may change (config.RESUMABLE,
saved into the run), or refuses with the reason: a --config file, any other option that differs,
a run that never wrote a checkpoint, a corpus whose content is not the one the run was made from.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import glob
import itertools
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, get_args

import torch

from . import baselines, checkpoint, config, distributed, tensorboard
from .atomic import check_output, write_text_output
from .bench import measure_training
from .config import Config
from .corpus import StageProgress
from .data.batches import check_length
from .data.pipeline import Data, encode_file, prepare_data
from .data.text import as_text, normalize, read_text
from .device import available_memory, describe, resolve_device, resolve_precision, set_tf32
from .distributed import World
from .errors import CheckpointError, ConfigError, CorpusError, DeviceError
from .evaluation import Score, score_ids, unit_of
from .events import Baselined, Event, Started
from .generate import Continuation, Sampling, generate, prepare_prefix
from .model import CharLM, convert, training_bytes
from .recipe import RECIPE_KEYS, Recipe, choose, probe_dims
from .runs import BEST, LATEST, RunExists, RunStore, check_run_name
from .runs import resume_command as resume_command  # the CLI prints it on Ctrl-C; `lstmlm runs show` too, without torch
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


def run_base_name(cfg: Config) -> str:
    """corpus-model: the name a run gets when none is given (a glob's corpus is named by the
    folder it starts in: 'linux/**/*.[ch]' → linux)."""
    corpus = Path(cfg.data.corpus)
    if glob.has_magic(cfg.data.corpus):
        plain = [part for part in corpus.parts if not glob.has_magic(part) and part not in ("/", ".", "..", "~")]
        corpus = Path(plain[-1] if plain else "corpus")
    return f"{corpus.stem or 'corpus'}-{cfg.model.model}"


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


def check_resumable(store: RunStore) -> None:
    """Refuse a run with no checkpoint: resumed, it would start over, overwriting its best.pt and
    logging its epochs twice (asked while the run is held, so a training still on its way to
    its first checkpoint is reported as in use instead)."""
    if not store.has_checkpoint(LATEST):
        raise CheckpointError(
            f"run {store.root} has no checkpoint to resume from: it stopped before writing its first "
            f"(delete {store.root} and train it again)"
        )


def check_same_corpus(store: RunStore, data: Data, corpus: str) -> None:
    """Refuse to resume on a corpus whose content is not the one the run was created from (an
    edited file, or another one moved into its place)."""
    then, now = store.corpus_sha1, data.source_sha1
    if then is not None and now is not None and then != now:
        raise CorpusError(
            f"the corpus {corpus} has changed since run {store.name} was created (SHA-1 {then} then, {now} now): "
            f"restore it, or train a new --run on it"
        )


@dataclass(frozen=True)
class Plan:
    """A training made ready: its config, its data, and the run it writes (`store` when resuming)."""

    config: Config
    data: Data
    runs_dir: Path
    run: str | None
    store: RunStore | None
    recipe: Chosen | None = None  # when the default recipe chose the settings


@dataclass(frozen=True)
class Chosen:
    """The default recipe's choice (`recipe.choose`) and the speed it was chosen for."""

    recipe: Recipe
    tokens_per_s: float  # the probe's, measured here
    given: tuple[str, ...]  # the recipe's settings that options gave instead


def prepare_training(
    runs_dir: Path,
    run: str | None = None,
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    resume: bool = False,
    progress: StageProgress | None = None,
    default_recipe: bool = True,
) -> Plan:
    """The effective config (a file, then options; or the resumed run's) and its data, read or
    downloaded and encoded (`progress` follows each stage). Nothing is written in the run yet.

    A new run on a corpus other than d2l's, with --max-minutes and no --config, takes its
    model and training from the default recipe (`recipe.py`; off with `default_recipe=False`),
    for this machine's speed as a probe measures it in a few batches; options override it."""
    overrides = overrides or {}
    if run is not None:
        check_run_name(run)
    store = None
    if resume:
        if config_file is not None:
            raise ConfigError(
                f"--config cannot be given with --resume: a resumed run keeps its stored config "
                f"(a resume may change only {', '.join('--' + k.replace('_', '-') for k in sorted(config.RESUMABLE))})"
            )
        store, cfg = open_for_resume(runs_dir, run, overrides)
    else:
        base = config.load(config_file) if config_file else Config()
        cfg = base.with_overrides(overrides).resolved()
    device = resolve_device(cfg.train.device)  # an absent device is refused before any download
    given = {k: v for k, v in overrides.items() if v is not None}
    chosen = None
    if default_recipe and store is None and config_file is None and uses_default_recipe(cfg, given):
        data = prepare_data(smallest_batches(cfg, given), progress=progress, scratch=runs_dir)
        cfg, chosen = apply_default_recipe(cfg, given, data, device)
    else:
        data = prepare_data(cfg, vocab=store.vocab if store else None, progress=progress, scratch=runs_dir)
    if store is not None:
        check_same_corpus(store, data, cfg.data.corpus)
    check_memory(cfg, len(data.vocab), device)
    return Plan(cfg, data, runs_dir, run, store, chosen)


PROBE_TIMED = 4  # the probe's timed batches (after one to warm up): about a second on two CPU cores


def uses_default_recipe(cfg: Config, given: dict[str, Any]) -> bool:
    """A time budget, text other than d2l's (which keeps the seed), a recipe setting left to
    choose, and one process: under torchrun each would time its own probe and might choose
    another model (the process group, which could agree on one, starts later)."""
    return (
        cfg.train.max_minutes > 0
        and cfg.data.normalize != "d2l"
        and not set(RECIPE_KEYS) <= set(given)
        and not distributed.from_environment().active
    )


def smallest_batches(cfg: Config, given: dict[str, Any]) -> Config:
    """`cfg` with batches of one character where the recipe will choose them: the corpus is read
    before the recipe sizes its batches to it, so a short text is not refused for the defaults'."""
    sizes = {key: given.get(key, 1) for key in ("batch_size", "num_steps")}
    return cfg.with_overrides(sizes)


def apply_default_recipe(cfg: Config, given: dict[str, Any], data: Data, device: torch.device) -> tuple[Config, Chosen]:
    """The recipe for this corpus, vocabulary, machine and time, under the options given."""
    probe = probe_dims(len(data.vocab), cfg.model.cell)
    speed = measure_training(cfg.model.model, probe, device, resolve_precision(cfg.train.precision, device), steps=PROBE_TIMED, warmup=1)
    recipe = choose(len(data.train), len(data.vocab), speed.tokens_per_s, cfg.train.max_minutes, cfg.model.cell)
    cfg = cfg.with_overrides({**recipe.overrides(), **given})
    check_length(len(data.train), cfg.data.batch_size, cfg.data.num_steps, "training text")
    return cfg, Chosen(recipe, speed.tokens_per_s, tuple(k for k in RECIPE_KEYS if k in given))



def check_memory(cfg: Config, vocab_size: int, device: torch.device) -> None:
    """Refuse a model that cannot fit before the run is created: past the memory there is, a
    training would be ended by the OOM killer with no message, its run's name used up."""
    need, have = training_bytes(cfg, vocab_size), available_memory(device)
    if have is not None and need > have:
        m, d = cfg.model, cfg.data
        raise DeviceError(
            f"training {m.layers}×{m.hidden} {m.model} with batches of {d.batch_size}×{d.num_steps} needs at least "
            f"{_gib(need)} of memory and {describe(device)} has {_gib(have)} available: "
            f"lower --hidden, --layers, --embedding, --batch-size or --num-steps"
        )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


@dataclass(frozen=True)
class Training:
    trainer: Trainer
    store: RunStore
    world: World

    @property
    def config(self) -> Config:
        return self.trainer.cfg

    def run(self, should_stop: Callable[[], bool] | None = None) -> Iterator[Event]:  # a StopFlag, or any test of whether to stop (tune: the pruner too)
        """The trainer's events; on rank 0 with the run's baselines after Started, and logged
        to TensorBoard with --tensorboard."""
        events = self.trainer.run(should_stop or (lambda: False))
        if not self.world.is_main:
            return events
        events = with_baselines(events, self.trainer)
        logs = tensorboard.directory_of(self.config, self.store.name)
        return tensorboard.logged(events, logs, self.config, self.trainer.progress.global_step) if logs else events


def with_baselines(events: Iterator[Event], trainer: Trainer) -> Iterator[Event]:
    """`events` with the run's baselines (baselines.py) after Started: read from the run, or
    counted and scored there, before the trainer starts its clock."""
    for event in events:
        yield event
        if isinstance(event, Started):
            d, data = trainer.cfg.data, trainer.data
            unit = unit_of(d.normalize)
            found = baselines.for_training(
                trainer.store.root, data.train, data.val, len(data.vocab), unit, d.batch_size, d.num_steps, trainer.cfg.train.val_tokens
            )
            yield Baselined(found)


@contextlib.contextmanager
def training(plan: Plan) -> Iterator[Training]:
    """Join the processes (under torchrun), create the run (or open it), hold its lock, build the
    Trainer and resume it from its checkpoint; leave the process group on the way out. A
    resume's changes to the options it may change are saved into the run once it is held."""
    cfg = plan.config
    world = distributed.from_environment()  # several processes under torchrun, else one
    device = distributed.start(world, resolve_device(cfg.train.device), cfg.data.batch_size)
    completed = False
    try:
        precision = resolve_precision(cfg.train.precision, device)
        set_tf32(device, cfg.train.tf32)
        if cfg.train.tensorboard and world.is_main:
            tensorboard.prepare(Path(cfg.train.tensorboard))  # before the run is made: a missing extra costs no run
        store = plan.store or create_run(plan.runs_dir, plan.run, cfg, plan.data, world)
        with store.locked() if world.is_main else contextlib.nullcontext():
            resuming = plan.store is not None
            if resuming:
                check_resumable(store)
                if world.is_main and store.config != cfg:
                    store.save_config(cfg)
            trainer = Trainer(store, cfg, plan.data, device, precision, world)
            if resuming:
                trainer.resume()
            yield Training(trainer, store, world)
            completed = True
    except RuntimeError as e:
        raise distributed.other_process_failed(e, world) from None
    finally:
        distributed.stop(world, completed)


def create_run(runs_dir: Path, run: str | None, cfg: Config, data: Data, world: World) -> RunStore:
    """Rank 0 claims the run; the others only name the one it claimed (they never write it, and
    on another machine it is not even there)."""
    store = claim_run(runs_dir, run, cfg, data) if world.is_main else None
    name = distributed.broadcast_name(store.name if store else "", world)
    return store or RunStore(runs_dir / name)


def claim_run(runs_dir: Path, run: str | None, cfg: Config, data: Data) -> RunStore:
    """The run `run`, or without a name the first free one of corpus-model, corpus-model-2, ...:
    claimed atomically, so two trainings started at the same instant get two runs."""
    if run is not None:
        return RunStore.create(runs_dir / run, cfg, data.vocab, data.source_sha1)
    base = run_base_name(cfg)
    for n in itertools.count(1):
        name = base if n == 1 else f"{base}-{n}"
        if (runs_dir / name).exists():
            continue
        with contextlib.suppress(RunExists):  # another training claimed it a moment ago: the next name
            return RunStore.create(runs_dir / name, cfg, data.vocab, data.source_sha1)
    raise AssertionError("unreachable")


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
    if core not in get_args(config.Core):
        raise ConfigError(f"--model must be {' or '.join(get_args(config.Core))}, not {core!r}")
    try:
        model_cfg = config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "model": core}}).model
    except ConfigError as e:
        raise ConfigError(f"run {store.name} cannot run as --model {core}: {e}") from None
    net = CharLM.from_config(model_cfg, len(vocab))
    checkpoint.load_weights(net, convert(payload["model"], core, net.cell), store.path(which))
    return Trained(net.eval(), cfg, vocab, checkpoint.checkpoint_prime(payload, vocab), store)


@dataclass(frozen=True)
class Generation:
    prefix: str  # as the model reads it: d2l-normalized for a d2l model
    normalized: bool  # whether that changed the prefix given
    steps: Continuation  # per step, the text each sample adds (see generate.Continuation; a bytes model's, decoded)


def continue_prefix(trained: Trained, prefix: str, sampling: Sampling, precision: str = "fp32", context: str | list[str] = "") -> Generation:
    """Continue `prefix` with a loaded model (on its device), having read `context` first (a
    text, or tokens: see generate.generate). A bytes model reads the prefix's UTF-8 bytes and
    its steps come decoded (`Decoded`)."""
    mode = trained.config.data.normalize
    text = prepare_prefix(normalize(prefix, mode) if mode == "bytes" else prefix, trained.vocab, mode)
    steps = generate(trained.model, trained.vocab, text, sampling, context, precision)
    if mode == "bytes":
        return Generation(as_text(text, mode), False, Decoded(steps, sampling.num_samples))
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

    def close(self) -> None:
        self.steps.close()


def evaluate_file(
    runs_dir: Path,
    run: str | None,
    file: Path,
    best: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    progress: StageProgress | None = None,
) -> Score:
    """Perplexity and bits per character (per byte) of a text file — or a directory, or a glob —
    under a trained model, as validation measures them: all of it, streamed like a corpus;
    beside it, the run's baselines on the same characters (where the run keeps its counts)."""
    trained = load_trained(runs_dir, run, best=best)
    dev = resolve_device(device)
    d = trained.config.data
    encoded = encode_file(file, trained.vocab, d.normalize, progress, scratch=runs_dir)
    score = score_ids(trained.model, encoded.ids, encoded.unknown, d.normalize, d.batch_size, d.num_steps, dev, resolve_precision(precision, dev))
    return dataclasses.replace(score, baselines=baselines.for_text(trained.store.root, encoded.ids, d.batch_size, d.num_steps))


PARTS = ("train", "val", "test")


def evaluate_part(
    runs_dir: Path,
    run: str | None,
    part: str,
    best: bool = False,
    device: str = "cpu",
    precision: str = "fp32",
    progress: StageProgress | None = None,
) -> Score:
    """The same for a part of the run's own corpus: its whole validation or test text (the
    split the run was trained with; training validated on a sample of it, `val_tokens`)."""
    if part not in PARTS:
        raise ConfigError(f"--part must be one of {', '.join(PARTS)}, not {part!r}")
    trained = load_trained(runs_dir, run, best=best)
    dev = resolve_device(device)
    d = trained.config.data
    data = prepare_data(trained.config, vocab=trained.vocab, progress=progress, scratch=runs_dir)
    ids = {"train": data.train, "val": data.val, "test": data.test}[part]
    if len(ids) < 2:
        how = f"--split {d.split}" if d.split else f"--val-fraction {d.val_fraction}"
        raise ConfigError(f"run {trained.store.name} has no {part} text (it was trained with {how})")
    unknown = trained.vocab.count_unknown(ids)
    score = score_ids(trained.model, ids, unknown, d.normalize, d.batch_size, d.num_steps, dev, resolve_precision(precision, dev))
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
    trained = load_trained(runs_dir, run, best=best)
    given = text if text is not None else read_text(file)  # type: ignore[arg-type]
    inspection = inspect_text(trained.model, trained.vocab, trained.config.data.normalize, given, gate, layer, units, find, top)
    if html is not None:
        from .units_page import html_page

        ranking = inspection.ranking[: max(top, 10)]
        page = html_page(inspection.layers, inspection.text, f"lstmlm inspect · {trained.store.name}", find, inspection.gate.name, ranking)
        write_text_output(html, page, "page", force)
    return InspectedRun(trained.store.name, inspection)


def export_run(runs_dir: Path, run: str | None, format: str, output: Path | None = None, best: bool = False, force: bool = False) -> Exported:
    """A trained run's one-step model written to `output` (default: RUN.onnx or RUN.pt here),
    checked against lstmlm first (atomic.write_output's rule: an existing file only with `force`)."""
    from .export import FORMATS, SUFFIXES, export_model

    if format not in FORMATS:
        raise ConfigError(f"--format must be onnx or torchscript, not {format!r}")
    trained = load_trained(runs_dir, run, best=best)
    path = output if output is not None else Path(trained.store.name + SUFFIXES[format])
    check_output(path, force)  # refused before the export, not after
    return export_model(trained.model, trained.vocab, trained.config.data.normalize, trained.prime, trained.store.name, path, format, force)
