"""A training's TensorBoard log (`--tensorboard DIR`): each run in DIR/RUN, written from its events.

    scalars   loss (nats), perplexity and bits per character (per byte in bytes mode) of the
              training text at each epoch's end and of the validation text at each validation;
              the learning rate, tokens per second and the mean gradient norm (before clipping)
              at each epoch's end — each at the optimizer step it was reached, the steps
              metrics.jsonl records
    lines     the baselines (baselines.py) as runs of their own, RUN/baselines/uniform, …/unigram
              and …/bigram: each a flat line under the tag of the curve it is a reference for
              (bpc/val; bpc/train for a run without validation text), so that on the Scalars
              page it shares that curve's chart
    text      the samples, at the step they were written
    hparams   the config, with the validation loss and bits as its metrics (the HParams view
              shows each run's last): runs and tune's trials compare there

It is a sink on the training's events (`logged`), attached by `training.Training.run` on rank 0
only: `lstmlm train` and every trial of `lstmlm tune` (a run of its own, so a subdirectory of
DIR) log the same way, and the trainer knows nothing of it.

A resumed run continues the same curves. Its session opens a new event file with `purge_step`
one past the step it resumes from, so TensorBoard drops whatever the previous session logged
after its last checkpoint (the resumed run trains those steps again), and it skips the steps up
to that one, already logged: no point appears twice. A new run in a directory that holds an
old run's logs purges them all (purge_step 0).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import baselines as baselines_mod
from .baselines import Baselines
from .config import Config
from .data.text import bits_abbreviation, token_unit
from .errors import TensorBoardError
from .events import Baselined, EpochEnded, Evaluated, Event, Finished, Sampled, Saved, Stepped

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

EXTRA_HINT = "--tensorboard needs TensorBoard: pip install 'lstmlm[tensorboard]'"


def prepare(directory: Path, run: str | None = None) -> None:
    """Check, before a run is made, that TensorBoard is installed and that the run's logs can
    go in `directory` (`run`: the run's name where it is given): a run refused after it was made
    would keep its name, with no checkpoint, until `lstmlm runs rm`."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise TensorBoardError(EXTRA_HINT) from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TensorBoardError(f"cannot make the TensorBoard directory {directory}: {e.strerror or e}") from None
    logs = directory / run if run else directory
    if logs.exists() and not logs.is_dir():
        raise TensorBoardError(f"cannot write TensorBoard logs in {logs}: it is not a directory")
    if not os.access(logs if logs.exists() else directory, os.W_OK | os.X_OK):
        raise TensorBoardError(f"cannot write TensorBoard logs in {logs}: permission denied")


def logged(events: Iterator[Event], root: Path, cfg: Config, resumed_at: int) -> Iterator[Event]:
    """`events`, each passed on once it is logged under `root` (DIR/RUN); `resumed_at`: the
    global step the run resumes from (0 for a new run). The files are closed however the
    training ends; a write that fails (a full disk) is a TensorBoardError naming the logs."""
    board = Board(root, cfg, resumed_at)
    try:
        for event in events:
            board.log(event)
            yield event
    except BaseException:
        with contextlib.suppress(TensorBoardError):  # the logs' own failure, or whatever stopped the training, is the one to tell
            board.close()
        raise
    board.close()


class Board:
    """The writers of one run's log: its own, and one per baseline line."""

    def __init__(self, root: Path, cfg: Config, resumed_at: int) -> None:
        _quiet_writer_threads()
        self.root, self.cfg, self.resumed_at = Path(root), cfg, resumed_at
        self.purge_step = resumed_at + 1 if resumed_at else 0
        self.unit = bits_abbreviation(token_unit(cfg.data.normalize))
        fresh = resumed_at == 0 or not any(self.root.glob("events.out.tfevents.*"))
        self.writer = self._writer(self.root)
        self.lines: dict[str, tuple[SummaryWriter, float]] = {}  # baseline name → (its writer, its bits)
        self.line_tag = f"{self.unit}/val"
        self.step = resumed_at  # the last optimizer step an event reported
        self.samples: list[Sampled] = []
        if fresh:
            with self._writing():
                self._hparams_start()

    def _writer(self, directory: Path) -> SummaryWriter:
        from torch.utils.tensorboard import SummaryWriter

        with self._writing(directory):
            _sorting_after_the_last(directory)
            return SummaryWriter(str(directory), purge_step=self.purge_step)

    @contextlib.contextmanager
    def _writing(self, directory: Path | None = None) -> Iterator[None]:
        """A failed write as a TensorBoardError naming the logs. TensorBoard writes on a thread of
        its own; its OSError comes back at the next write or flush here."""
        try:
            yield
        except OSError as e:
            raise TensorBoardError(f"cannot write TensorBoard logs in {directory or self.root}: {e.strerror or e}") from None

    # ---- the events ----

    def log(self, event: Event) -> None:
        with self._writing():
            self._log(event)

    def _log(self, event: Event) -> None:
        if not isinstance(event, Sampled):
            self._write_samples()
        if isinstance(event, Baselined):
            self._baselines(event.baselines)
        elif isinstance(event, Stepped):
            self.step = event.global_step
        elif isinstance(event, Evaluated):
            self.step = event.global_step
            self._split("val", math.log(event.val_perplexity), event.val_perplexity, event.val_bpc)
            self.flush()
        elif isinstance(event, EpochEnded):
            self.step = event.global_step
            self._epoch(event)
            self.flush()
        elif isinstance(event, Sampled):
            self.samples.append(event)
        elif isinstance(event, Saved):
            self.flush()  # what the checkpoint holds is on disk with it
        elif isinstance(event, Finished):
            self._hparams_end()
            self.flush()

    def _baselines(self, baselines: Baselines) -> None:
        """Open a writer for each line; each point of the curve it goes with gets one of each."""
        self.line_tag = f"{self.unit}/{'val' if baselines.text == 'validation' else 'train'}"
        for name in baselines_mod.NAMES:
            if name not in self.lines:
                self.lines[name] = (self._writer(self.root / "baselines" / name), getattr(baselines, name))

    def _split(self, split: str, loss: float, perplexity: float, bits: float) -> None:
        self._scalar(f"loss/{split}", loss)
        self._scalar(f"perplexity/{split}", perplexity)
        self._scalar(f"{self.unit}/{split}", bits)
        if self.line_tag == f"{self.unit}/{split}" and self.step > self.resumed_at:
            for writer, value in self.lines.values():
                writer.add_scalar(self.line_tag, value, self.step)

    def _epoch(self, e: EpochEnded) -> None:
        loss = math.log(e.train_perplexity) if e.train_perplexity > 0 else math.nan
        self._split("train", loss, e.train_perplexity, loss / math.log(2))
        self._scalar("train/lr", e.lr)
        self._scalar("train/tokens_per_s", e.tokens_per_s)
        if e.grad_norm is not None:
            self._scalar("train/grad_norm", e.grad_norm)

    def _scalar(self, tag: str, value: float) -> None:
        if self.step > self.resumed_at:  # steps up to the resumed one are logged already
            self.writer.add_scalar(tag, value, self.step)

    def _write_samples(self) -> None:
        """The samples of one sampling as one text: each a Markdown code block (verbatim)."""
        if not self.samples:
            return
        if self.step > self.resumed_at:
            blocks = ["\n".join("    " + line for line in s.text.splitlines() or [""]) for s in self.samples]
            self.writer.add_text("samples", "\n\n".join(blocks), self.step)
        self.samples = []

    # ---- hparams ----

    def _hparams_start(self) -> None:
        """The config (less where the logs go) and the metrics the HParams view shows: once, in a new log."""
        from torch.utils.tensorboard.summary import hparams

        values = {k: v for table in self.cfg.to_dict().values() for k, v in table.items() if k != "tensorboard"}
        metrics = ("loss/val", f"{self.unit}/val")  # the HParams view's: the last validation's (bpb/val in bytes mode)
        experiment, start, _ = hparams(values, dict.fromkeys(metrics, 0.0))
        start.value[0].metadata.plugin_data.content = _started_now(start.value[0].metadata.plugin_data.content)
        self._summary(experiment)
        self._summary(start)

    def _hparams_end(self) -> None:
        from torch.utils.tensorboard.summary import hparams

        _, _, end = hparams({}, {})
        self._summary(end)

    def _summary(self, summary: Any) -> None:
        self.writer._get_file_writer().add_summary(summary)  # as SummaryWriter.add_hparams does, in this run's own file

    def flush(self) -> None:
        self.writer.flush()
        for writer, _ in self.lines.values():
            writer.flush()

    def close(self) -> None:
        with self._writing():
            self._write_samples()
            self.writer.close()
            for writer, _ in self.lines.values():
                writer.close()


def _quiet_writer_threads() -> None:
    """Keep the traceback of TensorBoard's writer thread off the terminal (its error is raised
    again here, at the next write or flush, and said in one line); other threads' as before."""
    from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread

    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if not isinstance(args.thread, _AsyncWriterThread):
            previous(args)

    hook.quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _sorting_after_the_last(directory: Path) -> None:
    """Wait, where needed, until a file made now sorts after `directory`'s event files. TensorBoard
    reads a directory's files in name order, and a name starts with the second the file was made,
    then the process's counter of writers (unpadded: "10" sorts before "9"); a resumed session's
    file made in the same second as the last one's could sort first, and its purge and points be
    overridden by the older file's (a short training resumed at once, as a script might)."""
    seconds = [int(p.name.split(".")[3]) for p in directory.glob("events.out.tfevents.*") if p.name.split(".")[3].isdigit()]
    if seconds:
        while time.time() < max(seconds) + 1:
            time.sleep(0.05)


def _started_now(content: bytes) -> bytes:
    """The session-start record with its start time set (torch leaves it 0: the HParams view's
    'start time' column would say 1970)."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    data = HParamsPluginData.FromString(content)
    data.session_start_info.start_time_secs = time.time()
    return bytes(data.SerializeToString())


def directory_of(cfg: Config, run: str) -> Path | None:
    """Where a run of `cfg` named `run` logs: DIR/RUN, or None without --tensorboard."""
    return Path(cfg.train.tensorboard) / run if cfg.train.tensorboard else None
