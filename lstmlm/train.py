"""The training loop, as a generator of events (`events.py`): the CLI renders them, tests `list(...)` them.

The seed's semantics (d2l's train_ch8): the recurrent state starts at zero on an epoch's first
batch (on every batch for the random iterator; with `reset_every`, on each row once every N
batches as well) and is detached between batches, so gradients flow back only through the
current `num_steps`; the loss is the mean cross-entropy; gradients are clipped to a global
norm θ; perplexity is exp of the token-weighted mean loss. AR and TAR, when set, are added to
what is differentiated, never to the loss reported: perplexity stays exp of the cross-entropy.

Beside the loop: the step it runs (`step.build_step`), when it validates, samples, saves and stops
(`cadences.Cadences`), what it saves and resumes from (`checkpointer.Checkpointer`, `progress.Progress`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict
from typing import Any, cast

import torch

from . import cells, graphs
from .cadences import Cadences, Due
from .carry import gathered, next_batch, own_rows
from .cells.base import State
from .checkpointer import Checkpointer, non_finite
from .config import Config, RecurrencePath
from .data import batches
from .data.batches import BatchSource, Epoch, on_device
from .data.pipeline import Data
from .data.text import as_text
from .device import describe, keep_freed_memory, synchronize
from .distributed import World, sum_all
from .errors import TrainingError
from .evaluation import MAX_LOSS, bits_per_char, evaluate, perplexity
from .events import EpochEnded, Evaluated, Event, Finished, Noted, Sampled, Saved, Started, Stepped, Warned
from .generate import complete, prime_text
from .model import CharLM
from .progress import Progress
from .runs import BEST, LATEST, RunStore
from .samples import sample_prefixes
from .step import build_schedule, build_step, settle_path


class Trainer:
    """Holds what the loop needs; `run()` is the loop, `resume()` continues a stored run.
    `training.start` builds one the way `lstmlm train` does."""

    def __init__(
        self,
        store: RunStore,
        cfg: Config,
        data: Data,
        device: torch.device,
        precision: str,
        world: World = World(),
        *,
        clock: Callable[[], float] = time.perf_counter,
        capture: graphs.Capture | None = None,
    ) -> None:
        """`clock`: seconds, for the cadences, the time limit and tokens/s. `capture`: records the
        step as a graph (a CUDA graph by default where one pays; given, it graphs the step on any
        device, as tests do on a CPU)."""
        self.store, self.cfg, self.data = store, cfg, data
        self.device, self.precision, self.world, self.clock = device, precision, world, clock
        if device.type == "cpu":
            keep_freed_memory()  # every batch frees and makes the same buffers: no fresh pages for each
        torch.manual_seed(cfg.train.seed)  # the same on every process: same init, same dropout stream
        d = cfg.data
        # the path is chosen here; a compiled one is built at run()'s start, where it is said
        self.model = CharLM.from_config(cfg.model, len(data.vocab), cfg.train.path, device, build=False).to(device)
        built = build_step(cfg, self.model, device, world, precision=precision, capture=capture)
        self.optimizer, self.run_step, self.eager_because, self.grad_norms = built.optimizer, built.run, built.eager_because, built.grad_norms
        self.steps_per_epoch = batches.num_batches(len(data.train), d.batch_size, d.num_steps, d.iterator)
        tokens = on_device(data.train, device)  # the whole text on a GPU where it fits: batches gathered there
        self.batches = BatchSource(tokens, d.batch_size, d.num_steps, d.iterator, world.rows(d.batch_size), device)
        self.cadences = Cadences(cfg, world, clock)
        self.schedule = build_schedule(cfg.train, self.optimizer, self.steps_per_epoch, self.cadences.time_used)
        # the dropout stream's start, owned by this trainer: run() restores it, so another
        # trainer built (or anything random done) in between cannot change this run
        self.progress = Progress(epoch_rng=random.Random(cfg.train.seed).getstate(), torch_rng=torch.get_rng_state())
        self.prime = prime_text(data.vocab, data.train, d.normalize)
        self.sample_prefixes = sample_prefixes(cfg, data)
        self.checkpoints = Checkpointer(store, data.vocab, self.prime, self.model, self.optimizer, self.schedule, device, world)
        self.samples: dict[str, str] = {}
        self.has_val = len(data.val) > 1
        self._validated_at = -1  # the global step of the last validation
        self._carry: State | None = None  # the recurrent state reached, gathered from every process
        self._tic = 0.0  # when the current stretch of training steps began
        self._said_eager = False
        self.train_perplexity = math.nan  # the last completed epoch's
        self._norm_steps = 0  # the current epoch's steps whose gradient norms `grad_norms` sums
        self._epoch_length = self.steps_per_epoch  # the current epoch's batches

    def resume(self) -> None:
        """Continue from latest.pt (weights, optimizer, schedule, RNGs, position); best.pt kept till beaten."""
        self.progress = self.checkpoints.resume(self.cfg)
        self.grad_norms.fill_(self.progress.grad_norm_sum)  # the epoch's steps before the stop count in its mean
        self._norm_steps = self.progress.grad_norm_steps
        if self.world.is_main:
            self.store.truncate_metrics(self.progress.epoch, self.progress.global_step)
            records = [r for r in self.store.read_metrics() if type(r.get("epoch")) is int]  # the epochs', not a validation's within one
            if records and isinstance(records[-1].get("train_perplexity"), float):
                self.train_perplexity = records[-1]["train_perplexity"]

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """Train until the epochs are done, the time is up, validation stops improving or
        `should_stop()` says so; every way out ends the same: validate, save, sample, Finished."""
        yield from self._settle_path()
        yield self._started()
        yield from self._why_eager()
        self.cadences.start()
        if self.progress.torch_rng is not None:
            torch.set_rng_state(self.progress.torch_rng)
        self.model.train()
        reason = yield from self._train(should_stop)
        yield from self._stop(reason)

    # ---- the loop ----

    def _train(self, should_stop: Callable[[], bool]) -> Generator[Event, None, str]:
        """The epochs and their batches; returns why training stopped."""
        p = self.progress
        while p.epoch < self.cfg.train.epochs:
            rng, epoch = self._epoch_batches()
            self._epoch_length = len(epoch)  # its batches (one more than steps_per_epoch at some offsets)
            carry = own_rows(p.carry, self.cfg.data.batch_size, self.world, self.device)
            # this process's share of the epoch's loss sum; the saved sum is the global one
            loss_sum = torch.tensor(p.loss_sum if self.world.is_main else 0.0, dtype=torch.float64, device=self.device)
            self._tic = self.clock()
            for X, Y in epoch:
                carry = self._step(X, Y, carry, loss_sum)
                yield from self._why_eager()
                yield self._stepped(epoch)
                reason = yield from self._between_steps(rng, epoch, carry, loss_sum, should_stop)
                if reason is not None:
                    return reason
            if p.batch > 0:  # resumed after the epoch's last batch (a checkpoint taken there): close it
                reason = yield from self._between_steps(rng, epoch, carry, loss_sum, should_stop)
                if reason is not None:
                    return reason
        return "completed"

    def _step(self, X: torch.Tensor, Y: torch.Tensor, carry: State | None, loss_sum: torch.Tensor) -> State:
        """One optimizer step on this process's rows of the batch, from the recurrent state
        `carry`; its loss, weighted by its tokens, is added to `loss_sum` on the device (no
        sync per batch). Returns the state reached."""
        p, d = self.progress, self.cfg.data
        if carry is not None and d.iterator == "sequential":
            carry = next_batch(carry, p.batch, d.reset_every, d.batch_size, self.world)
        else:
            carry = None  # zero state: the epoch's first batch, or every random-iterator batch
        X, Y = X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)  # this process's rows (already there on a GPU)
        loss, carry = self.run_step(X, Y, carry)
        loss_sum += loss.double() * Y.numel()
        self.schedule.step()
        p.batch += 1
        p.global_step += 1
        p.tokens += Y.numel() * self.world.size
        self._norm_steps += 1
        return carry

    def _between_steps(
        self, rng: random.Random, epoch: Epoch, carry: State | None, loss_sum: torch.Tensor, should_stop: Callable[[], bool]
    ) -> Generator[Event, None, str | None]:
        """After a step: close the epoch if it was its last; validate, record, sample and save as
        their cadences say; stop if asked to, out of time, or out of patience (the reason)."""
        p = self.progress
        now = self.clock()
        ends_epoch = p.batch >= len(epoch)
        epoch_number = p.epoch + 1 if ends_epoch else p.epoch  # an epoch's last step counts as its own
        due = self.cadences.due(p.global_step, epoch_number, ends_epoch, self.has_val, should_stop, now)
        if not ends_epoch and due == Due():
            p.epoch_seconds += now - self._tic
            self._tic = self.clock()
            return None
        p.epoch_seconds += self._settled(now) - self._tic
        p.loss_sum = self._finite(loss_sum)
        p.grad_norm_sum, p.grad_norm_steps = self.grad_norms.item(), self._norm_steps
        self._carry = None if ends_epoch else gathered(carry, self.world)
        closed = self._close_epoch(rng) if ends_epoch else None
        if due.validate:
            yield from self._validate()
        if closed is not None:
            yield self._epoch_ended(*closed)
        if self._patience_spent():
            return "early_stop"
        if due.sample:
            yield from self._sample()
        if due.save:
            yield self._save()
        self._tic = self.clock()
        return due.stop

    def _stop(self, reason: str) -> Iterator[Event]:
        """The one way out: validate where the model stands (unless interrupted, or just done),
        save it (unless just saved), sample it (unless interrupted), and say so."""
        p = self.progress
        if reason != "interrupted" and self.has_val and self._validated_at != p.global_step:
            yield from self._validate()
        if self.checkpoints.saved_at != p.global_step:
            yield self._save()
        if reason != "interrupted":
            yield from self._sample()
        train_ppl = perplexity(p.loss_sum / p.tokens) if p.tokens > 0 else self.train_perplexity  # mid-epoch: the epoch so far
        finished = self._finished(reason, train_ppl)
        if self.world.is_main:  # after the last save: a latest.pt newer than this is a later training's
            self.store.record_done(self._done_record(finished))
        yield finished

    # ---- what happens between steps ----

    def _validate(self) -> Iterator[Event]:
        """Validate; a model better than best.pt's is saved as `best` at once."""
        d, p = self.cfg.data, self.progress
        loss, _ = evaluate(self.model, self.data.val, d.batch_size, d.num_steps, self.device, self.precision, self.cfg.train.val_tokens, self.world)
        if not loss <= MAX_LOSS:  # NaN, Inf, or a perplexity that overflows
            self._diverged(f"the validation loss became {loss:.4g} after {p.global_step} steps")
        better = p.validated(loss)
        if better:
            yield self._save(BEST)
        self._validated_at = p.global_step
        if p.batch > 0 and self.world.is_main:  # within an epoch, a line of its own: an epoch's comes at its end, past the minutes of a run it outlasts
            train_loss = p.loss_sum / p.tokens if p.tokens else None  # the epoch's so far; its epoch below a fraction (1.25: a quarter into the second)
            self.store.append_metrics({
                "epoch": round(p.epoch + p.batch / self._epoch_length, 4), "global_step": p.global_step, "train_loss": train_loss,
                "train_perplexity": None if train_loss is None else perplexity(train_loss), "val_perplexity": perplexity(loss),
                "val_bpc": bits_per_char(loss), "lr": float(self.optimizer.param_groups[0]["lr"])})  # fmt: skip
        yield Evaluated(p.epoch, p.global_step, perplexity(loss), bits_per_char(loss), better, val_loss=loss)

    def _patience_spent(self) -> bool:
        patience = self.cfg.train.patience
        return self.has_val and bool(patience) and self.progress.evals_since_best >= patience

    def save(self, which: str = LATEST) -> str:
        """Write a checkpoint (on the main process only); a model gone non-finite is never saved."""
        bad = non_finite(self.model)
        if bad:  # the loss is measured before the update, so the last update can break the weights unseen
            p = self.progress
            self._diverged(f"the weights became non-finite ({', '.join(bad[:3])}) in epoch {p.epoch + (p.batch > 0)}")
        return self.checkpoints.save(which, self.cfg, self.progress, self._carry)

    def _save(self, which: str = LATEST) -> Saved:
        return Saved(self.progress.epoch, self.save(which))

    def _sample(self) -> Iterator[Sampled]:
        if not self.world.is_main:
            return
        normalize = self.cfg.data.normalize
        for prefix in self.sample_prefixes:
            text = as_text(complete(self.model, self.data.vocab, prefix, prime=self.prime), normalize)
            shown = as_text(prefix, normalize)
            self.samples[shown] = text
            yield Sampled(self.progress.epoch, shown, text)

    # ---- the parts ----

    def _epoch_batches(self) -> tuple[random.Random, Epoch]:
        """The current epoch's batches from its stored generator state, past those already trained on."""
        rng = random.Random()
        rng.setstate(self.progress.epoch_rng)
        return rng, self.batches.epoch(rng, skip=self.progress.batch)

    def _settled(self, now: float) -> float:
        """The time the steps so far took: on a GPU, which runs behind the host, the time once it
        has done the work queued (so tokens/s counts work done, not launched); `now` on a CPU."""
        if self.device.type == "cpu":
            return now
        synchronize(self.device)
        return self.clock()

    def _settle_path(self) -> Iterator[Noted | Warned]:
        """The scratch core's path, settled before the clock starts (`step.settle_path`); the
        run's config then says how it ran."""
        yield from settle_path(self.model, self.cfg.train.path)
        if self.model.scratch_core is not None and self.world.is_main and self.cfg.train.path != self.path:
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, path=cast(RecurrencePath, self.path)))
            self.store.save_config(self.cfg)

    @property
    def path(self) -> str:
        """How the recurrence runs: the model's path, or graph where the step is one."""
        return "graph" if isinstance(self.run_step, graphs.GraphedStep) else self.model.path

    def _why_eager(self) -> Iterator[Warned]:
        """Once: why the scratch core's step runs eagerly on CUDA, where a graph would pay."""
        why = self.eager_because or (self.run_step.failure if isinstance(self.run_step, graphs.GraphedStep) else None)
        if why is not None and not self._said_eager:
            self._said_eager = True
            yield Warned(f"the scratch core's training step runs eagerly, not as a CUDA graph: {why}")

    def _close_epoch(self, rng: random.Random) -> tuple[float, float, int]:
        """Roll the progress over to the next epoch; (its training loss, seconds, tokens)."""
        closed = self.progress.close_epoch(rng.getstate())
        self._carry = None
        self.train_perplexity = perplexity(closed[0])
        return closed

    def _finite(self, loss_sum: torch.Tensor) -> float:
        """The loss sum over all processes as a float; a NaN or Inf stops training before anything is saved."""
        value = sum_all(loss_sum, self.world).item()
        if not math.isfinite(value):
            self._diverged(f"the loss became {value} in epoch {self.progress.epoch + 1}")
        mean = value / max(1, self.progress.tokens)
        if mean > MAX_LOSS:  # finite, but its perplexity is not: the run has diverged
            self._diverged(f"the loss became {mean:.4g} nats per character in epoch {self.progress.epoch + 1}")
        return value

    def _diverged(self, what: str) -> None:
        last = "the last good checkpoint is kept" if self.store.has_checkpoint() else "no checkpoint was written"
        raise TrainingError(f"{what} (learning rate too high?); training stopped and {last}")

    def _mean_grad_norm(self) -> float | None:
        """The mean gradient norm of the epoch just closed, then zeroed in place (a graph adds into it)."""
        steps, self._norm_steps = self._norm_steps, 0
        mean = self.grad_norms.item() / steps if steps else None
        self.grad_norms.zero_()
        return mean

    # ---- the events ----

    def _started(self) -> Started:
        cell = self.model.cell
        return Started(
            run=self.store.name,
            device=describe(self.device),
            precision=self.precision,
            model=self.cfg.model.model,
            cell=cells.title(cell.name, cell.form),
            path=self.path,
            vocab_size=len(self.data.vocab),
            num_params=sum(p.numel() for p in self.model.parameters()),
            train_tokens=len(self.data.train),
            val_tokens=len(self.data.val),
            batches_per_epoch=self.steps_per_epoch,
            start_epoch=self.progress.epoch,
            epochs=self.cfg.train.epochs,
        )

    def _stepped(self, epoch: Epoch) -> Stepped:
        p, d = self.progress, self.cfg.data
        # the progress bar's rate, by the host's clock: on a GPU it runs ahead of the work done
        # by the steps still queued (the epoch's figure is taken after a synchronize)
        seconds = p.epoch_seconds + (self.clock() - self._tic)
        return Stepped(
            epoch=p.epoch + 1,
            step=p.batch,
            global_step=p.global_step,
            batches=len(epoch),
            tokens=p.tokens,
            epoch_tokens=len(epoch) * d.batch_size * d.num_steps,
            tokens_per_s=p.tokens / seconds if seconds > 0 else 0.0,
            session_seconds=self.clock() - (self.cadences.started or self.clock()),
        )

    def _epoch_ended(self, train_loss: float, seconds: float, epoch_tokens: int) -> EpochEnded:
        """The epoch's record (with the latest validation), logged to the run's metrics."""
        p = self.progress
        val = p.last_val
        record = EpochEnded(
            epoch=p.epoch,
            train_perplexity=self.train_perplexity,
            val_perplexity=perplexity(val) if val is not None else None,
            val_bpc=bits_per_char(val) if val is not None else None,
            tokens_per_s=epoch_tokens / seconds if seconds else 0.0,
            seconds=seconds,
            lr=float(self.optimizer.param_groups[0]["lr"]),  # a device tensor under a graph: read where it is shown
            global_step=p.global_step,
            grad_norm=self._mean_grad_norm(),
        )
        if self.world.is_main:
            self.store.append_metrics({**asdict(record), "train_loss": train_loss})
        return record

    def _finished(self, reason: str, train_perplexity: float) -> Finished:
        p = self.progress
        seconds, tokens = p.all_seconds, p.all_tokens
        return Finished(
            reason=reason,
            perplexity=train_perplexity,
            val_perplexity=perplexity(p.last_val) if p.last_val is not None else None,
            tokens_per_s=tokens / seconds if seconds else 0.0,
            device=describe(self.device),
            model=self.cfg.model.model,
            run=self.store.name,
            epochs=p.epoch,
            vocab_size=len(self.data.vocab),
            samples=dict(self.samples),
            best_val_perplexity=perplexity(p.best_saved) if p.best_saved is not None else None,
        )

    def _done_record(self, finished: Finished) -> dict[str, Any]:
        """What run.json keeps of how this training ended (`lstmlm runs` reads it without torch)."""
        p = self.progress
        kept = {"reason": finished.reason, "val_perplexity": finished.val_perplexity, "best_val_perplexity": finished.best_val_perplexity}
        return {**kept, "epochs": p.epoch, "global_step": p.global_step, "tokens": p.all_tokens, "seconds": p.all_seconds}
