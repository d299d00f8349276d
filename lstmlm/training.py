"""Starting and resuming a training: `lstmlm train` (and each of tune's trials) as library calls.

    plan   the options, a config file or the run's stored config, and the default recipe
           → one final Config, and the data read for it (nothing written in a run yet)
    start  the processes joined (under torchrun), the run created or opened and held, the
           Trainer built and resumed → a `Training` whose events the CLI renders

Runs are named, never pathed: `--run NAME` is `RUNS_DIR/NAME` in every command.

A resume does what the stored run says, plus the options a resume may change, or refuses with
the reason (`resuming`).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from . import baselines, config, distributed, native, tensorboard
from . import config_file as config_file_mod
from . import precision as precisions
from .config import Config
from .data.batches import check_length
from .data.download import StageProgress
from .data.pipeline import Data, prepare_data
from .data.text import token_unit
from .device import resolve_device, resolve_precision, set_tf32
from .distributed import World
from .errors import ConfigError
from .events import Baselined, Event, Started
from .model import CharLM, check_memory
from .recipe import RECIPE_KEYS, Recipe, choose, probe_dims, probe_speed_of
from .resuming import check_resumable, check_same_corpus, resumable_changes
from .runs import BEST, LATEST, RunExists, RunStore, check_run_name
from .step import BUILDING, timed_steps
from .train import Trainer

# ---- the plan: one final config, and its data ----------------------------------------------------


@dataclass(frozen=True)
class Chosen:
    """The default recipe's choice (`recipe.choose`) and the speed it was chosen for: the probe's,
    then that of the model it chose first, timed, as the probe's speed of the same FLOPs a second."""

    recipe: Recipe
    tokens_per_s: float  # the speed `recipe` was chosen for, in the probe's tokens/s
    given: tuple[str, ...]  # the recipe's settings that options (or the config file) gave instead
    probe_tokens_per_s: float = 0.0  # the probe's, timed here
    first: Recipe | None = None  # the choice the probe's speed gave
    first_tokens_per_s: float = 0.0  # its model's training speed, timed here


@dataclass(frozen=True)
class Plan:
    """A training made ready: its final config, its data, and the run it writes (`store` when resuming)."""

    config: Config
    data: Data
    runs_dir: Path
    run: str | None
    store: RunStore | None
    recipe: Chosen | None = None  # when the default recipe chose the settings
    precision: precisions.Choice | None = None  # what --precision auto chose, and why
    chosen_keys: tuple[str, ...] = ()  # the settings this run chose (`chosen_keys`), for the start table


def plan(
    runs_dir: Path,
    run: str | None = None,
    overrides: dict[str, Any] | None = None,
    config_file: Path | None = None,
    resume: bool = False,
    progress: StageProgress | None = None,
    default_recipe: bool = True,
) -> Plan:
    """The one final config — the stored config (resuming) or the file's, then the default
    recipe's settings, then the options, in that order of precedence — and its data, read or
    downloaded and encoded (`progress` follows each stage). Nothing is written in a run yet.

    A new run on a corpus other than d2l's, with --max-minutes and no --config, takes its
    model and training from the default recipe (`recipe.py`; off with `default_recipe=False`),
    for this machine's speed as a probe measures it in a few batches; options override it."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if run is not None:
        check_run_name(run)
    store = RunStore.find(runs_dir, run) if resume else None
    base = config_file_mod.load(config_file) if config_file else Config()
    written = config_file_mod.written_keys(config_file) if config_file else frozenset()
    if store is not None:
        given = resumable_changes(store.config, base, written, given, config_file)
        base = store.config
    draft = base.with_overrides(given).resolved()
    device = resolve_device(draft.train.device)  # an absent device is refused before any download
    chosen = None
    kept = {**{k: draft.value(k) for k in written}, **given}  # what the file and the options say: the recipe chooses the rest
    if default_recipe and store is None and uses_default_recipe(draft, kept, config_file is not None):
        data = prepare_data(smallest_batches(draft, kept), progress=progress, scratch=runs_dir)
        build_first(draft, device, progress)
        chosen = choose_recipe(draft, kept, data, device)
        final = base.with_overrides({**chosen.recipe.overrides(), **kept}).resolved()
        check_length(len(data.train), final.data.batch_size, final.data.num_steps, "training text")
    else:
        final = draft
        data = prepare_data(final, vocab=store.vocab if store else None, progress=progress, scratch=runs_dir)
    if store is not None:
        check_same_corpus(store, data, final.data.corpus)
    check_memory(final, len(data.vocab), device)
    precision = None
    if final.train.precision == "auto":  # decided once, here, and stored with the run: a resume trains on in it
        build_first(final, device, progress)
        precision = precisions.choose(final, len(data.vocab), device, distributed.from_environment())
        final = final.with_overrides({"precision": precision.precision})
    return Plan(final, data, runs_dir, run, store, chosen, precision, chosen_keys(final, set(written) | set(given)))


def chosen_keys(final: Config, given: set[str]) -> tuple[str, ...]:
    """The settings this run chose: those given (options, the file's keys) and every other that
    is not its default (the recipe's, and "auto" resolved for the corpus: normalize raw, ...)."""
    default = Config()
    return tuple(k for k in config.field_names() if k in given or final.value(k) != default.value(k))


# ---- what is timed before the run: the default recipe's probe, --precision auto --------------------


def build_first(cfg: Config, device: torch.device, progress: StageProgress | None) -> None:
    """The compiled recurrence built before a model is timed on it, as a stage of its own: the
    first time on a machine it takes a while, and the timing would otherwise hide it."""
    if cfg.model.model == "scratch" and device.type == "cpu" and native.needs_build():
        if progress:
            progress(BUILDING, 0, None)
        native.recurrence()
        if progress:
            progress(BUILDING, 1, 1)


PROBE_TIMED = 4  # the probe's timed batches (after one to warm up): about a second on two CPU cores
FIRST_TIMED, FIRST_WARMUP = 3, 2  # the first choice's batches, timed and not: a new model's second batch is still slow


def uses_default_recipe(cfg: Config, given: dict[str, Any], with_file: bool = False) -> bool:
    """`recipe` auto without a config file (`with_file`) or on, and then: a time budget, text
    other than d2l's (which keeps the seed), a recipe setting left to choose, and one process:
    under torchrun each would time its own probe and might choose another model (the process
    group, which could agree on one, starts later). Asked for (on) where it cannot be, it is refused."""
    asked = cfg.train.recipe
    if asked == "off" or (asked == "auto" and with_file):
        return False
    why_not = "d2l mode keeps the seed's settings" if cfg.data.normalize == "d2l" else None
    if distributed.from_environment().active:
        why_not = "under torchrun each process would time a probe of its own and might choose another model"
    if asked == "on" and why_not:
        raise ConfigError(f'recipe = "on": {why_not} (choose the model yourself, or train in one process)')
    return cfg.train.max_minutes > 0 and why_not is None and not set(RECIPE_KEYS) <= set(given)


def smallest_batches(cfg: Config, given: dict[str, Any]) -> Config:
    """`cfg` with batches of one character where the recipe will choose them: the corpus is read
    before the recipe sizes its batches to it, so a short text is not refused for the defaults'."""
    return cfg.with_overrides({key: given.get(key, 1) for key in ("batch_size", "num_steps")})


def choose_recipe(cfg: Config, given: dict[str, Any], data: Data, device: torch.device) -> Chosen:
    """The recipe for this corpus, vocabulary, machine and time, chosen twice: for the probe
    model's training speed here (`probe_speed`), then for the speed of the model that gave, timed
    too (`recipe.probe_speed_of`): a wider model multiplies faster than the probe, so it sees
    more passes than the probe's speed foretells, and the passes set the dropout."""
    tokens, vocab, minutes, cell, form = len(data.train), len(data.vocab), cfg.train.max_minutes, cfg.model.cell, cfg.model.gru_form
    probe = probe_speed(cfg, vocab, device)
    first = choose(tokens, vocab, probe, minutes, cell, form)
    first_cfg = cfg.with_overrides({**first.overrides(), **given})
    check_memory(first_cfg, vocab, device)
    timed = training_speed(first_cfg, vocab, device, FIRST_TIMED, FIRST_WARMUP)
    speed = probe_speed_of(first, timed, vocab, cell, form)
    recipe = choose(tokens, vocab, speed, minutes, cell, form)
    return Chosen(recipe, speed, tuple(k for k in RECIPE_KEYS if k in given), probe, first, timed)


def probe_speed(cfg: Config, vocab_size: int, device: torch.device) -> float:
    """Training tokens/s of the recipe's probe model (`recipe.probe_dims`) on this machine, in
    the precision `cfg` asks for (`training_speed`)."""
    probe = probe_dims(vocab_size, cfg.model.cell, cfg.model.gru_form).config(cfg.model.model)
    return training_speed(probe.with_overrides({"precision": cfg.train.precision}), vocab_size, device, PROBE_TIMED)


def training_speed(cfg: Config, vocab_size: int, device: torch.device, steps: int, warmup: int = 1) -> float:
    """Training tokens/s of `cfg`'s model and batches on this machine, in the precision it would
    train in (`precision.choose`): `steps` batches through the step a training builds, after
    `warmup` untimed."""
    precision = precisions.choose(cfg, vocab_size, device).precision
    torch.manual_seed(0)
    model = CharLM.from_config(cfg.model, vocab_size, device=device).to(device)
    seconds = timed_steps(cfg, model, device, World(), precision, steps, warmup)
    return steps * cfg.data.batch_size * cfg.data.num_steps / seconds


# ---- starting it ----------------------------------------------------------------------------------


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
            unit = token_unit(d.normalize)
            found = baselines.for_training(
                trainer.store.root, data.train, data.val, len(data.vocab), unit, d.batch_size, d.num_steps, trainer.cfg.train.val_tokens
            )
            yield Baselined(found)


@contextlib.contextmanager
def start(plan: Plan) -> Iterator[Training]:
    """Join the processes (under torchrun), create the run (or open it), hold its lock, build the
    Trainer and resume it from its checkpoint; leave the process group on the way out. A
    resume's changes to the options it may change are saved into the run once it is held."""
    cfg = plan.config
    world = distributed.from_environment()  # several processes under torchrun, else one
    device = distributed.start(world, resolve_device(cfg.train.device), cfg.data.batch_size)
    completed = False
    try:
        # Rank 0's precision on every process: on unlike machines (one with native bf16, one
        # without) `auto` chose unlike ones, the run stored rank 0's, and a resume went otherwise
        precision = distributed.broadcast_name(resolve_precision(cfg.train.precision, device), world)
        if precision != cfg.train.precision:
            cfg = cfg.with_overrides({"precision": precision})
        set_tf32(device, cfg.train.tf32)
        if cfg.train.tensorboard and world.is_main:
            tensorboard.prepare(Path(cfg.train.tensorboard), plan.run)  # before the run is made: a missing extra costs no run
        store = plan.store or create_run(plan.runs_dir, plan.run, cfg, plan.data, world)
        made = plan.store is None and world.is_main
        with removed_if_unsaved(store, made), store.locked() if world.is_main else contextlib.nullcontext():
            resuming = plan.store is not None
            if resuming:
                check_resumable(store)
            trainer = Trainer(store, cfg, plan.data, device, precision, world)
            if resuming:
                trainer.resume()  # refused where nothing is left to train: the run is unchanged
                if world.is_main and store.config != cfg:
                    store.save_config(cfg)
            yield Training(trainer, store, world)
            completed = True
    except RuntimeError as e:
        raise distributed.other_process_failed(e, world) from None
    finally:
        try:
            distributed.stop(world, completed)
        except RuntimeError as e:  # the barrier after this process's work: another failed while it waited
            raise distributed.other_process_failed(e, world) from None


@contextlib.contextmanager
def removed_if_unsaved(store: RunStore, made: bool) -> Iterator[None]:
    """A run this command made and left by an error or a Ctrl-C before any checkpoint (while its
    model is built, say) holds nothing: it goes, so the same command can be typed again."""
    try:
        yield
    except BaseException:
        if made and not any(store.has_checkpoint(which) for which in (LATEST, BEST)):
            shutil.rmtree(store.root, ignore_errors=True)
        raise


def run_base_name(cfg: Config) -> str:
    """corpus-model: the name a run gets when none is given (a glob's corpus is named by the
    folder it starts in: 'linux/**/*.[ch]' → linux)."""
    corpus = Path(cfg.data.corpus)
    if glob.has_magic(cfg.data.corpus):
        plain = [part for part in corpus.parts if not glob.has_magic(part) and part not in ("/", ".", "..", "~")]
        corpus = Path(plain[-1] if plain else "corpus")
    return f"{corpus.stem or 'corpus'}-{cfg.model.model}"


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
