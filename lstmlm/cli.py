"""The `lstmlm` command: parses options, calls the library, renders with Rich.

The only module that prints. Every library error becomes one red line on stderr and exit
code 1 (a traceback only with LSTMLM_DEBUG=1); usage errors are Typer's, exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from . import config, corpus, distributed
from . import generate as gen
from . import train as train_mod
from .checkpoint import BEST, LATEST, RunStore, checkpoint_config, checkpoint_vocab, latest_run, load_weights
from .config import Config
from .device import autocast, describe, resolve_device, resolve_precision
from .errors import CheckpointError, ConfigError, DeviceError, LstmlmError
from .generate import prepare_prefix
from .model import CharLM, convert
from .plot import perplexity_chart
from .train import EpochEnded, Evaluated, Event, Finished, Sampled, Started, Stepped, Trainer, prepare_data
from .vocab import Vocab

app = typer.Typer(
    name="lstmlm",
    help="Train character-level LSTM language models: the d2l LSTM from scratch and on cuDNN.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def friendly(command: F) -> F:
    """Turn every error into one line: library errors and OS errors as they are, out-of-memory
    with a hint, anything unexpected as an internal error; exit code 1 (130 on Ctrl-C).
    LSTMLM_DEBUG=1 shows the traceback instead."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as e:  # noqa: BLE001 - this is the one place that decides what the user sees
            if os.environ.get("LSTMLM_DEBUG") == "1" or isinstance(e, SystemExit):
                raise
            raise fail(_one_line(e), 130 if isinstance(e, KeyboardInterrupt) else 1) from None

    return wrapper  # type: ignore[return-value]


def _one_line(e: BaseException) -> str:
    if isinstance(e, LstmlmError):
        return str(e)
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError):
        return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if isinstance(e, (MemoryError, RuntimeError)) and _out_of_memory(e):  # torch's allocators raise RuntimeError
        size = re.search(r"tried to allocate (\d+) bytes", str(e))
        what = f" allocating {int(size.group(1)):,} bytes" if size else ""
        return f"out of memory{what}: lower --hidden, --embedding, --batch-size or --num-steps"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"internal error: {type(e).__name__}: {first} (LSTMLM_DEBUG=1 shows the traceback; please report it)"


def _out_of_memory(e: BaseException) -> bool:
    """An allocation that failed, or whose size does not even fit torch's integers."""
    message = str(e).lower()
    return isinstance(e, MemoryError) or any(s in message for s in ("out of memory", "can't allocate memory", "overflow"))


def download_progress(description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def fetch(target: corpus.Target, force: bool) -> Path:
    """Download with a progress bar on stderr (silent when the cache already has the file)."""
    if not force and corpus.is_cached(target):
        return target.path
    if not err.is_terminal:  # in a log or a pipe a bar is noise, and Rich leaves a blank line there
        return corpus.download(target, force=True)
    with download_progress(target.url) as bar:
        task = bar.add_task(f"downloading {target.path.name}", total=None)
        return corpus.download(target, force=True, progress=lambda done, total: bar.update(task, completed=done, total=total))


def _version(value: bool) -> None:
    if value:
        from . import __version__

        out.print(f"lstmlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Train character-level LSTM language models: the d2l LSTM from scratch and on cuDNN."""


@app.command()
@friendly
def download(
    name: str = typer.Argument("timemachine", help=f"A known corpus ({', '.join(corpus.KNOWN)}) or an http(s) URL."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch a known corpus from this address (a mirror); its SHA-1 is still checked."),
    sha1: Optional[str] = typer.Option(None, "--sha1", help="Expected SHA-1 of a file given by URL."),
    directory: Optional[Path] = typer.Option(None, "--dir", help="Cache directory (default $LSTMLM_HOME or ~/.cache/lstmlm)."),
    force: bool = typer.Option(False, "--force", help="Download again even if a verified copy is cached."),
) -> None:
    """Download a corpus into the cache, checking its SHA-1; a verified cached copy means no network."""
    target = corpus.resolve_target(name, url=url, sha1=sha1, directory=directory)
    path = fetch(target, force)
    text = corpus.read_text(path)
    out.out(str(path))  # verbatim: no markup, no wrapping, so scripts can use the line
    out.print(f"{path.stat().st_size:,} bytes, {len(text):,} characters, {len(set(text)):,} distinct")


# ---- train ------------------------------------------------------------------------------------

RUNS_DIR_OPTION = typer.Option(Path("runs"), "--runs-dir", help="Where runs are kept.", envvar="LSTMLM_RUNS")


class StopFlag:
    """Set by SIGINT/SIGTERM: training finishes the current batch, saves, and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, _frame: Any) -> None:
            if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _default_run_name(cfg: Config, runs_dir: Path) -> str:
    """corpus-model, with -2, -3, ... when that run exists already."""
    base = f"{Path(cfg.data.corpus).stem or 'corpus'}-{cfg.model.model}"
    name, n = base, 1
    while (runs_dir / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def _open_for_resume(runs_dir: Path, run: str | None, overrides: dict[str, Any]) -> tuple[RunStore, Config]:
    store = RunStore.open(runs_dir / run) if run else latest_run(runs_dir)
    stored = store.config
    for key, value in overrides.items():
        if value is None or key in RESUMABLE:
            continue
        current = getattr(getattr(stored, config._section_of(key)), key)
        if value != current:
            raise ConfigError(
                f"--resume keeps the run's stored {key} = {current!r}; it cannot change to {value!r} "
                f"(start a new --run instead)"
            )
    return store, stored.with_overrides({k: v for k, v in overrides.items() if k in RESUMABLE})


# Options that a resumed run may change: they alter neither the model nor the data.
RESUMABLE = {"epochs", "device", "precision", "sample_every", "eval_every", "checkpoint_every", "patience", "max_minutes"}


def _config_table(cfg: Config, started: Started) -> Table:
    table = Table(title=f"run [bold]{started.run}[/]", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="dim")
    table.add_column()
    table.add_column(style="dim")
    table.add_column()
    rows = [(k, str(v)) for section in cfg.to_dict().values() for k, v in section.items()]
    rows += [
        ("parameters", f"{started.num_params:,}"),
        ("vocab", str(started.vocab_size)),
        ("train tokens", f"{started.train_tokens:,}"),
        ("val tokens", f"{started.val_tokens:,}"),
        ("batches/epoch", str(started.batches_per_epoch)),
        ("on", f"{started.device} {started.precision}"),
    ]
    half = (len(rows) + 1) // 2
    for left, right in itertools.zip_longest(rows[:half], rows[half:], fillvalue=("", "")):
        table.add_row(*left, *right)
    return table


def _render(cfg: Config, events: Iterator[Event], as_json: bool) -> Finished:
    """Show the events: a progress bar and samples, or JSON lines on stdout."""
    progress = Progress(
        TextColumn("{task.description} {task.completed:.0f}/{task.total:.0f}"),
        BarColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=err,
        disable=as_json,
    )
    epochs = steps = None
    with progress:
        for event in events:
            if isinstance(event, Started):
                if not as_json:
                    out.print(_config_table(cfg, event))
                epochs = progress.add_task("epoch", total=event.epochs, completed=event.start_epoch, stats="")
                if event.batches_per_epoch >= STEP_BAR_MIN_BATCHES:  # long epochs: a bar within the epoch too
                    steps = progress.add_task("step", total=event.batches_per_epoch, stats="")
            elif isinstance(event, Stepped) and steps is not None:
                progress.update(steps, completed=event.step)
            elif isinstance(event, EpochEnded):
                val = f"  val {event.val_perplexity:.3f} ({event.val_bpc:.3f} bpc)" if event.val_perplexity else ""
                stats = f"ppl {event.train_perplexity:.3f}{val}  {event.tokens_per_s:,.0f} tok/s"
                progress.update(epochs, completed=event.epoch, stats=stats)
                if as_json:
                    _json({"event": "epoch", **dataclasses.asdict(event)})
            elif isinstance(event, Evaluated):
                if as_json:
                    _json({"event": "eval", **dataclasses.asdict(event)})
            elif isinstance(event, Sampled) and not as_json and event.epoch < cfg.train.epochs:
                progress.console.print(f"[dim]epoch {event.epoch}[/] {escape(event.text)}")
            elif isinstance(event, Finished):
                return event
    raise AssertionError("training ended without a Finished event")


STEP_BAR_MIN_BATCHES = 50


def _json(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


@app.command()
@friendly
def train(
    config_file: Optional[Path] = typer.Option(None, "--config", help="A TOML config (see configs/); options override it."),
    corpus_: Optional[str] = typer.Option(None, "--corpus", help="A known corpus name, a text file or a directory of text files."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="d2l (the seed's letters-only text) or raw (every character)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Train on the first N tokens (0 = all)."),
    model: Optional[str] = typer.Option(None, "--model", help="scratch (the article's LSTM) or cudnn (nn.LSTM)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or mps."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or auto."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    num_steps: Optional[int] = typer.Option(None, "--num-steps", help="Characters per sequence (backprop through time)."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden units per layer."),
    layers: Optional[int] = typer.Option(None, "--layers"),
    dropout: Optional[float] = typer.Option(None, "--dropout", help="Dropout on the non-recurrent connections (embedding, between layers, before the output layer)."),
    embedding: Optional[int] = typer.Option(None, "--embedding", help="Learned embedding size (0 = one-hot input)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="sgd, adam or adamw."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay"),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="constant, step or cosine."),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps"),
    clip: Optional[float] = typer.Option(None, "--clip", help="Global gradient-norm clipping threshold (0 = off)."),
    iterator: Optional[str] = typer.Option(None, "--iterator", help="sequential (state carried) or random."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="The last fraction of the text, held out for validation."),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="Validate every N steps (0 = every epoch)."),
    patience: Optional[int] = typer.Option(None, "--patience", help="Stop after N validations without improvement (0 = never)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Epochs between checkpoints."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", help="Show a greedy sample every N epochs."),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop (with a checkpoint) after this much time."),
    run: Optional[str] = typer.Option(
        None, "--run", "--name", help="Run name under --runs-dir (default: corpus-model). Under torchrun, say --name."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run (default: the latest) from its last checkpoint."),
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print only JSON lines: one per epoch and a last 'done'."),
) -> None:
    """Train a character-level LSTM; prints perplexity as it falls and samples at the end."""
    overrides = {
        "corpus": corpus_, "normalize": normalize, "max_tokens": max_tokens, "model": model, "device": device,
        "precision": precision, "epochs": epochs, "batch_size": batch_size, "num_steps": num_steps,
        "hidden": hidden, "layers": layers, "dropout": dropout, "embedding": embedding, "lr": lr,
        "optimizer": optimizer, "weight_decay": weight_decay, "schedule": schedule, "warmup_steps": warmup_steps,
        "clip": clip, "iterator": iterator, "seed": seed, "val_fraction": val_fraction, "eval_every": eval_every,
        "patience": patience, "checkpoint_every": checkpoint_every, "sample_every": sample_every,
        "max_minutes": max_minutes,
    }
    if run is not None and (run in ("", ".", "..") or "/" in run or os.sep in run):
        # a path would put the run's files (latest.pt, config.json, ...) outside --runs-dir
        raise ConfigError(f"--run must be a plain name, not {run!r} (choose the directory with --runs-dir)")
    if resume:
        store, cfg = _open_for_resume(runs_dir, run, overrides)
    else:
        base = config.load(config_file) if config_file else Config()
        cfg = base.with_overrides(overrides).resolved()
    world = distributed.from_environment()  # several processes under torchrun, else one
    dev = distributed.start(world, resolve_device(cfg.train.device), cfg.data.batch_size)
    prec = resolve_precision(cfg.train.precision, dev)
    # in a log or a pipe a bar is noise, and Rich leaves a blank line there (before any error line)
    with download_progress("corpus") if err.is_terminal else contextlib.nullcontext() as bar:
        show = None
        if bar is not None:
            task = bar.add_task(f"downloading {cfg.data.corpus}", total=None, visible=False)
            show = lambda done, total: bar.update(task, completed=done, total=total, visible=True)  # noqa: E731
        data = prepare_data(cfg, vocab=store.vocab if resume else None, progress=show)
    if not resume:
        store = _create_run(runs_dir / (run or _default_run_name(cfg, runs_dir)), cfg, data.vocab, world)
    stop = StopFlag()
    try:
        with store.locked() if world.is_main else contextlib.nullcontext(), stop.installed():
            trainer = Trainer(store, cfg, data, dev, prec, world)
            if resume and store.has_checkpoint():
                trainer.resume()
            if not world.is_main:  # only rank 0 shows anything
                done = next(e for e in trainer.run(stop) if isinstance(e, Finished))
                return
            done = _render(cfg, trainer.run(stop), as_json)
    finally:
        distributed.stop(world)
    if not as_json and done.epochs > 1:
        out.print(perplexity_chart(store.read_metrics(), width=min(out.width, 100), height=10))
    _report(done, as_json)
    if done.reason == "interrupted":
        where = "" if runs_dir == Path("runs") else f" --runs-dir {shlex.quote(str(runs_dir))}"  # a command that works as is
        err.print(f"stopped: checkpoint saved; continue with: lstmlm train --resume --run {shlex.quote(done.run)}{where}", markup=False, soft_wrap=True)
        raise typer.Exit(128 + (stop.signal or signal.SIGINT))


def _create_run(path: Path, cfg: Config, vocab: Vocab, world: distributed.World) -> RunStore:
    """Rank 0 creates the run; the others open it once it exists."""
    distributed.barrier(world)  # every process has chosen the name before it exists
    store = RunStore.create(path, cfg, vocab) if world.is_main else None
    distributed.barrier(world)
    return store or RunStore.open(path)


def _report(done: Finished, as_json: bool) -> None:
    if as_json:
        _json({"event": "done", **dataclasses.asdict(done)})
        return
    if done.reason == "early_stop":
        out.print(f"early stop after epoch {done.epochs}: validation stopped improving")
    if done.reason == "time_limit":
        out.print(f"time limit reached after epoch {done.epochs}")
    out.print(f"perplexity {done.perplexity:.1f}, {done.tokens_per_s:.1f} tokens/sec on {done.device}")
    if done.val_perplexity is not None:
        out.print(f"validation perplexity {done.val_perplexity:.3f}, {math.log2(done.val_perplexity):.3f} bits per character")
    for text in done.samples.values():
        out.print(escape(text), soft_wrap=True)


# ---- generate -------------------------------------------------------------------------------


def load_model(runs_dir: Path, run: str | None, core: str | None, which: str = LATEST) -> tuple[CharLM, Config, Vocab, str]:
    """A trained model from a run store, converted to `core` if asked, in eval mode on the CPU;
    with its config, vocab and the text generation reads before a prefix ("" if none)."""
    store = RunStore.open(runs_dir / run) if run else latest_run(runs_dir)
    payload = store.load(which)
    cfg, vocab = checkpoint_config(payload), checkpoint_vocab(payload)
    core = core or cfg.model.model
    if core not in ("scratch", "cudnn"):
        raise ConfigError(f"--model must be scratch or cudnn, not {core!r}")
    net = CharLM.from_config(dataclasses.replace(cfg.model, model=core), len(vocab))
    load_weights(net, convert(payload["model"], core), store.path(which))
    prime = payload.get("prime", "")
    return net.eval(), cfg, vocab, prime if isinstance(prime, str) and all(c in vocab.index for c in prime) else ""


@app.command()
@friendly
def generate(
    run: Optional[str] = typer.Option(None, "--run", help="Run name (default: the most recently trained)."),
    prefix: str = typer.Option("time traveller", "--prefix", help="Text to continue."),
    length: int = typer.Option(50, "--length", min=0, help="Characters to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy (the seed); > 0 samples."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Sample among the k most likely characters (0 = all)."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Sample within this probability mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (same seed, same text)."),
    num_samples: int = typer.Option(1, "--num-samples", min=1, help="Independent continuations."),
    model: Optional[str] = typer.Option(None, "--model", help="Run the weights on scratch or cudnn (default: as trained)."),
    device: str = typer.Option("cpu", "--device", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or auto."),
    best: bool = typer.Option(False, "--best", help="Use the best-validation checkpoint instead of the latest."),
    prime: bool = typer.Option(True, "--prime/--no-prime", help="Read the end of the training text before the prefix (raw-mode runs)."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Continue a prefix with a trained model, streaming the characters."""
    net, cfg, vocab, prime_text = load_model(runs_dir, run, model, BEST if best else LATEST)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    net = net.to(dev)
    text = prepare_prefix(prefix, vocab, cfg.data.normalize)
    if text != prefix:
        err.print(f"[dim]prefix normalized as the model was trained (d2l): {text!r}[/]")
    steps = gen.generate(net, vocab, text, length, temperature, top_k, top_p, num_samples, seed, prime_text if prime else "")
    with autocast(dev, prec):
        if num_samples == 1:
            sys.stdout.write(text)
            for chars in steps:
                sys.stdout.write(chars[0])
                sys.stdout.flush()
            sys.stdout.write("\n")
            return
        samples = [text] * num_samples
        for chars in steps:
            samples = [s + c for s, c in zip(samples, chars)]
    for i, sample in enumerate(samples, 1):
        out.print(f"[dim]--- sample {i}[/]")
        out.print(escape(sample), soft_wrap=True)


# ---- evaluate -------------------------------------------------------------------------------


@app.command()
@friendly
def evaluate(
    file: Path = typer.Argument(..., help="A UTF-8 text file to score."),
    run: Optional[str] = typer.Option(None, "--run", help="Run name (default: the most recently trained)."),
    best: bool = typer.Option(False, "--best", help="Use the best-validation checkpoint."),
    device: str = typer.Option("cpu", "--device"),
    precision: str = typer.Option("fp32", "--precision"),
    runs_dir: Path = RUNS_DIR_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line."),
) -> None:
    """Perplexity and bits per character of a text under a trained model."""
    net, cfg, vocab, _ = load_model(runs_dir, run, None, BEST if best else LATEST)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    text = corpus.normalize(corpus.read_text(file), cfg.data.normalize)
    unknown = sum(1 for c in text if c not in vocab.index)
    ids = vocab.encode(text)
    loss, count = train_mod.evaluate(net.to(dev), ids, cfg.data.batch_size, cfg.data.num_steps, dev, prec)
    result = {"file": str(file), "characters": len(text), "predicted": count, "unknown_characters": unknown,
              "loss": loss, "perplexity": math.exp(loss), "bits_per_char": train_mod.bits_per_char(loss)}
    if as_json:
        _json(result)
        return
    out.print(f"{file}: perplexity {result['perplexity']:.3f}, {result['bits_per_char']:.3f} bits per character "
              f"({count:,} characters predicted, {unknown:,} outside the vocabulary)")


# ---- plot -----------------------------------------------------------------------------------


# ---- bench ----------------------------------------------------------------------------------


@app.command()
@friendly
def bench(
    config_file: Optional[Path] = typer.Option(None, "--config", help="Model and batch shapes to measure (default: the d2l model)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or mps."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16, auto, or both."),
    steps: int = typer.Option(20, "--steps", min=1, help="Timed training steps per core."),
    vocab_size: int = typer.Option(28, "--vocab-size", min=2, help="Vocabulary size (28: The Time Machine in d2l mode)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON line per measurement."),
) -> None:
    """Measure this machine: matrix-product ceiling, training tokens/s of both cores, generation chars/s."""
    from . import bench as b

    cfg = config.load(config_file) if config_file else Config()
    dims = b.Dims.from_config(cfg, vocab_size)
    world = distributed.from_environment()  # under torchrun: also measure data-parallel scaling
    dev = distributed.start(world, resolve_device(device), dims.batch_size)
    precisions = ["fp32", "bf16"] if precision == "both" else [resolve_precision(precision, dev)]
    rows: list[dict[str, Any]] = []
    try:
        if world.is_main:
            rows = _bench_one_process(b, dims, dev, precisions, steps)
        distributed.barrier(world)  # the others wait: one process measures alone first
        if world.active:
            rows += _bench_scaling(b, dims, dev, precisions, steps, world, rows)
    finally:
        distributed.stop(world)
    if not world.is_main:
        return
    _bench_report(rows, dims, dev, as_json)


def _bench_scaling(b: Any, dims: Any, dev: torch.device, precisions: list[str], steps: int, world: distributed.World, single: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training tokens/s of all processes together, and its ratio to one process's."""
    rows = []
    for prec in precisions:
        for core in ("scratch", "cudnn"):
            speed = b.measure_training(core, dims, dev, prec, steps=steps, world=world)  # every process takes part
            alone = next((r["raw"] for r in single if r["what"] == f"train {core}" and r["precision"] == prec and r["raw"]), None)
            if alone is None:  # on the other processes, which report nothing
                continue
            scaling = speed.tokens_per_s / alone["tokens_per_s"]
            rows.append({"what": f"train {core} ×{world.size} processes", "precision": prec,
                         "figure": f"{speed.tokens_per_s:,.0f} tokens/s ({scaling:.2f}× one)", "of_ceiling": None,
                         "memory": speed.peak_memory_bytes, "raw": {**dataclasses.asdict(speed), "processes": world.size, "scaling": scaling}})
    return rows


def _bench_one_process(b: Any, dims: Any, dev: torch.device, precisions: list[str], steps: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for prec in precisions:
        ceiling = b.measure_matmul_ceiling(dev, prec)
        rows.append({"what": f"matmul {ceiling.size}×{ceiling.size}", "precision": prec, "figure": f"{ceiling.gflops:,.1f} GFLOP/s",
                     "of_ceiling": 1.0, "memory": None, "raw": dataclasses.asdict(ceiling)})
        for core in ("scratch", "cudnn"):
            try:
                speed = b.measure_training(core, dims, dev, prec, steps=steps, ceiling=ceiling)
            except DeviceError as e:
                rows.append({"what": f"train {core}", "precision": prec, "figure": f"skipped: {e}", "of_ceiling": None, "memory": None, "raw": None})
                continue
            rows.append({"what": f"train {core}", "precision": prec, "figure": f"{speed.tokens_per_s:,.0f} tokens/s",
                         "of_ceiling": speed.utilisation, "memory": speed.peak_memory_bytes, "raw": dataclasses.asdict(speed)})
        if prec == "fp32":
            for core in ("scratch", "cudnn"):
                gen_speed = b.measure_generation(core, dims, dev, prec)
                rows.append({"what": f"generate {core}", "precision": prec, "figure": f"{gen_speed.chars_per_s:,.0f} chars/s",
                             "of_ceiling": None, "memory": gen_speed.peak_memory_bytes, "raw": dataclasses.asdict(gen_speed)})
    return rows


def _bench_report(rows: list[dict[str, Any]], dims: Any, dev: torch.device, as_json: bool) -> None:
    from . import bench as b

    if as_json:
        for row in rows:
            _json({"event": "bench", "what": row["what"], "precision": row["precision"], **(row["raw"] or {"skipped": row["figure"]})})
        return
    title = (f"{describe(dev)}: hidden {dims.hidden}, {dims.layers} layer(s), batch {dims.batch_size}, "
             f"{dims.num_steps} steps, vocab {dims.vocab_size} — {b.training_flops_per_token(dims):,} FLOPs per trained token")
    table = Table(title=title)
    for column in ("measure", "precision", "figure", "of ceiling", "peak memory"):
        table.add_column(column, justify="left" if column in ("measure", "precision") else "right")
    for row in rows:
        share = f"{row['of_ceiling']:.0%}" if row["of_ceiling"] is not None else ""
        memory = f"{row['memory'] / 2**20:,.0f} MiB" if row["memory"] else ""
        table.add_row(row["what"], row["precision"], row["figure"], share, memory)
    out.print(table)


@app.command("plot")
@friendly
def plot_(
    runs: list[str] = typer.Argument(..., help="Run names under --runs-dir; several share one figure."),
    output: Optional[Path] = typer.Option(
        None, "--output", "-o", help="Write FILE.png or FILE.svg (needs: pip install 'lstmlm[plot]'); default: a chart per run here."
    ),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Train and validation perplexity per epoch (and bits per character in files), from the runs' metrics."""
    from . import plot

    dirs = [runs_dir / name for name in runs]
    if output is not None:
        series = plot.plot_runs(dirs, output)
        out.print(f"wrote {escape(str(output))}: {len(series)} series from {len(dirs)} run(s)", soft_wrap=True)
        return
    for d in dirs:
        records = plot.read_metrics(d)
        out.print(f"[bold]{escape(d.name)}[/] [dim]{len(records)} epochs[/]")
        out.print(plot.perplexity_chart(records, width=min(out.width, 100), height=12))


# ---- inspect --------------------------------------------------------------------------------

INSPECT_TERMINAL_CHARS = 2000  # the terminal shows this much of a long text; the HTML page shows all
BLUE, RED = (33, 102, 172), (178, 24, 43)  # the page's colours: below and above the neutral level


def _level_style(level: float, underline: bool) -> str:
    """Blue below 0, red above, white at 0 (levels in [-1, 1]); light text on the dark ends."""
    r, g, b = BLUE if level < 0 else RED
    a = min(abs(level), 1.0)
    mix = lambda c: round(255 + (c - 255) * a)  # noqa: E731
    return f"{'white' if a > 0.6 else 'black'} on rgb({mix(r)},{mix(g)},{mix(b)}){' underline' if underline else ''}"


def _coloured(text: str, levels: list[float], inside: list[bool]) -> Any:
    from rich.text import Text

    line = Text()
    for c, level, m in zip(text, levels, inside):
        line.append(c, _level_style(round(level, 2), m))
    return line


def _ranking_table(ranking: list[Any]) -> Table:
    table = Table()
    for name in ("rank", "layer", "unit", "r"):
        table.add_column(name, justify="right")
    for rank, s in enumerate(ranking, 1):
        table.add_row(str(rank), str(s.layer), str(s.unit), f"{s.correlation:+.3f}")
    return table


def _saturation_table(stats: list[Any]) -> Table:
    table = Table(title="gate saturation: fraction of time < 0.1 (closed) and > 0.9 (open)", title_justify="left")
    for name in ("layer", "gate", "< 0.1", "> 0.9", "units mostly < 0.1", "units mostly > 0.9"):
        table.add_column(name, justify="right")
    for s in stats:
        table.add_row(str(s.layer), s.gate, f"{float(s.left.mean()):.1%}", f"{float(s.right.mean()):.1%}",
                      str(int((s.left > 0.5).sum())), str(int((s.right > 0.5).sum())))
    return table


@app.command("inspect")
@friendly
def inspect_(
    run: Optional[str] = typer.Option(None, "--run", help="Run name (default: the most recently trained)."),
    text: Optional[str] = typer.Option(None, "--text", help="The text to read through the model."),
    file: Optional[Path] = typer.Option(None, "--file", help="Read the text from a UTF-8 file instead."),
    layer: Optional[int] = typer.Option(None, "--layer", min=0, help="Layer to show (default: the last; --find searches all)."),
    units: Optional[list[int]] = typer.Option(None, "--unit", min=0, help="A unit to colour the text by; repeat for several."),
    gate: str = typer.Option("cell", "--gate", help="cell (C_t), hidden (H_t), input, forget, output or candidate (C̃_t)."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Also write a self-contained HTML page with every unit browsable."),
    find: Optional[str] = typer.Option(None, "--find", help="Rank units by |correlation| with being inside a match of this regex."),
    top: int = typer.Option(3, "--top", min=1, help="Units to list with --find and to colour without --unit."),
    best: bool = typer.Option(False, "--best", help="Use the best-validation checkpoint instead of the latest."),
    runs_dir: Path = RUNS_DIR_OPTION,
) -> None:
    """Colour a text by single LSTM units (the paper's quote cell), rank units by a feature, show gate saturation.

    Without --unit the text is coloured by the best units for --find, or else by the units that vary most.
    """
    from . import inspect as insp
    from .checkpoint import write_text_atomic
    from .vocab import describe_chars

    if (text is None) == (file is None):
        raise ConfigError("give the text with exactly one of --text or --file")
    name = run or latest_run(runs_dir).name
    net, cfg, vocab, _ = load_model(runs_dir, name, None, BEST if best else LATEST)
    given = text if text is not None else corpus.read_text(file)
    seen = corpus.normalize(given, cfg.data.normalize)
    if seen != given:
        err.print("[dim]text normalized as the model was trained (d2l)[/]")
    unknown = vocab.unknown_chars(seen)
    if unknown:
        err.print(f"[yellow]read as <unk>, outside the vocabulary:[/] {escape(describe_chars(unknown))}")
    insp.check_gate(gate)
    layers = insp.activations(net, vocab, seen)
    shown_layer = layer if layer is not None else len(layers) - 1
    acts = insp.check_layer(layers, shown_layer)
    ranking = insp.find_units(layers, seen, find, gate, layer) if find else []
    if ranking:
        out.print(f"[bold]{gate} units tracking[/] {escape(find)}", soft_wrap=True)  # a long regex stays whole
        out.print(_ranking_table(ranking[:top]))
    if units:
        chosen = [(shown_layer, insp.check_unit(acts, u)) for u in units]
    elif ranking:
        chosen = [(s.layer, s.unit) for s in ranking[:top]]
    else:
        chosen = [(shown_layer, u) for u in insp.most_variable_units(acts, gate, top)]

    shown = seen[:INSPECT_TERMINAL_CHARS]
    inside = insp.span_feature(seen, find)[: len(shown)].bool().tolist() if find else [False] * len(shown)
    scores = {(s.layer, s.unit): s.correlation for s in ranking}
    for k, u in chosen:
        values = layers[k].gate(gate)[: len(shown), u]
        r = f"  r = {scores[(k, u)]:+.3f}" if (k, u) in scores else ""
        out.print(f"\n[bold]layer {k} unit {u}[/] {gate}{r}  [dim]{float(values.min()):+.2f} … {float(values.max()):+.2f}[/]")
        out.print(_coloured(shown, insp.level(gate, values).tolist(), inside))
    if len(seen) > len(shown):
        out.print(f"[dim](the first {len(shown):,} of {len(seen):,} characters; --html shows them all)[/]")
    out.print()
    out.print(_saturation_table(insp.saturation(layers)))
    if html_out is not None:
        page = insp.html_page(layers, seen, f"lstmlm inspect · {name}", find, gate, ranking[: max(top, 10)])
        write_text_atomic(html_out, page)
        out.print(f"wrote {escape(str(html_out))}", soft_wrap=True)


def main() -> None:
    app()
