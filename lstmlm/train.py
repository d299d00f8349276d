"""The training loop, as a generator of events (`events.py`): the CLI renders them, tests `list(...)` them.

The seed's semantics (d2l's train_ch8): the recurrent state starts at zero on an epoch's first
batch (on every batch for the random iterator; with `reset_every`, on each row once every N
batches as well) and is detached between batches, so gradients flow back only through the
current `num_steps`; the loss is the mean cross-entropy; gradients
are clipped to a global norm θ; perplexity is exp of the token-weighted mean loss. AR and TAR,
when set, are added to what is differentiated, never to the loss reported: perplexity stays
exp of the cross-entropy.

Everything that decides what happens next is in `TrainerState` and saved in every checkpoint —
the data generator's state at the epoch's start, the batch index within the epoch, the carried
state (the cell's: (H, C) for the LSTM), torch's RNG — so a run resumed from any checkpoint continues exactly as it would have.

Between two steps the loop may validate, sample and checkpoint, each on its own cadence —
every N steps, every N minutes, at every N-th epoch end, or whichever of those comes first
(`config.Cadence`) — so an epoch of a 10 GB corpus, which can take a day, is checkpointed every
few minutes like an epoch of a 1 MB one.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

import torch

from . import checkpoint, graphs, native
from .cells.base import State
from .config import Cadence, Config, RecurrencePath, TrainConfig, cadence
from .data import batches
from .data.batches import BatchSource, Epoch, on_device
from .data.pipeline import Data
from .data.text import as_text
from .device import autocast, describe, keep_freed_memory, synchronize
from .distributed import World, all_gather, any_each, sum_all
from .errors import CheckpointError, TrainingError
from .evaluation import MAX_LOSS, bits_per_char, evaluate, perplexity
from .events import EpochEnded, Evaluated, Event, Finished, Noted, Sampled, Saved, Started, Stepped, Warned
from .generate import complete, prime_text, sample_prefixes
from .model import CharLM, Dropouts, activation_penalty, convert, loss_fn
from .runs import BEST, LATEST, RunStore

# ---- one step -------------------------------------------------------------------------------


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    state: State | None,
    clip: float,
    device: torch.device,
    precision: str = "fp32",
    ar: float = 0.0,
    tar: float = 0.0,
    grad_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """Forward, mean loss, backward, clip, update. Returns the loss — the cross-entropy alone,
    whatever AR (`ar`) and TAR (`tar`) add to the objective — on the device, no sync. The
    gradient's global norm before clipping is added to `grad_norms` (a float64 scalar on the
    device, updated in place, so a CUDA graph holds the addition too), if given."""
    with autocast(device, precision):
        if ar > 0 or tar > 0:
            logits, state, top = model(X, state, top=True)  # (batch, steps, vocab)
            loss = loss_fn(logits, Y)
            objective = loss + activation_penalty(top, ar, tar)
        else:
            logits, state = model(X, state)
            objective = loss = loss_fn(logits, Y)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True) if clip > 0 else None
    if grad_norms is not None:
        if norm is None:  # not clipped: measured for the record alone
            norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None], foreach=True)
        grad_norms += norm.double()
    optimizer.step()
    return loss.detach(), state


# ---- optimizer and schedule -----------------------------------------------------------------


def build_optimizer(t: TrainConfig, model: CharLM, graphed: bool = False) -> torch.optim.Optimizer:
    """d2l's SGD (param -= lr · grad), Adam or AdamW; on a GPU their fused kernels (one launch
    for every parameter instead of several a tensor). `graphed`: a CUDA graph holds the update,
    so fused wherever it runs (the learning rate, a tensor then, read by the kernel, not the
    host) and Adam and AdamW capturable (their step count on the device)."""
    params = list(model.parameters())
    fused = params[0].is_cuda or graphed or None  # None: torch's choice (foreach) off CUDA
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    adam = torch.optim.Adam if t.optimizer == "adam" else torch.optim.AdamW
    return adam(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused, capturable=graphed)


IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")  # how this process updates, not the run's state


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with each learning rate a float: a graphed step keeps it as a
    device tensor (`graphs.learning_rate_on_device`), which a checkpoint must not carry to a CPU."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """A checkpoint's optimizer state into `optimizer`, which keeps its own implementation flags
    (fused, capturable, …): a run trained on a GPU resumes on a CPU, and the other way round.
    Adam's step count goes where this optimizer keeps it: on the parameters' device when fused
    or capturable (a CPU run's count is a CPU tensor), else as it was saved."""
    own = [{k: group[k] for k in IMPLEMENTATION if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, own):
        group.update(flags)
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if isinstance(step, torch.Tensor):
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)


def lr_factor(t: TrainConfig, step: int, steps_per_epoch: int, time_used: float = 0.0) -> float:
    """The multiplier of the base learning rate after `step` optimizer steps.

    `time_used` is the fraction of the session's `max_minutes` spent (0 without a limit). The
    cosine anneals over whichever ends the run first, its epochs or its time limit: its
    progress is the larger of the two fractions, so a time-limited run ends with the learning
    rate at its floor however fast the machine is. (A resumed session has its own limit, so
    its learning rate rises back to where its steps put it and anneals again.)"""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "step":
        return t.gamma ** (step // (t.step_every * steps_per_epoch))
    if t.schedule == "cosine":
        total = max(1, t.epochs * steps_per_epoch - t.warmup_steps)
        progress = min(1.0, max((step - t.warmup_steps) / total, time_used))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# ---- the trainer's state --------------------------------------------------------------------


@dataclass
class TrainerState:
    epoch: int = 0  # epochs completed
    step: int = 0  # batches done in the current epoch (0 at an epoch boundary)
    global_step: int = 0
    epoch_rng: Any = None  # random.Random state at the current epoch's start
    loss_sum: float = 0.0  # the current epoch's token-weighted loss so far
    tokens: int = 0  # the current epoch's tokens so far
    epoch_seconds: float = 0.0  # the current epoch's training time so far
    seconds: float = 0.0  # training time of the completed epochs
    total_tokens: int = 0
    best_val: float | None = None  # the best validation loss along this run's steps: patience counts from it
    best_saved: float | None = None  # the validation loss of the model in best.pt: only a lower one replaces it
    evals_since_best: int = 0
    last_val: float | None = None
    torch_rng: torch.Tensor | None = None
    carry: list[torch.Tensor] | None = None  # the state mid-epoch, for the sequential iterator

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epoch_rng"] = _rng_to_list(self.epoch_rng)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        known = {f.name for f in dataclasses.fields(cls)}  # older checkpoints hold an unused "extra"
        st = cls(**{k: v for k, v in d.items() if k in known})
        st.epoch_rng = _rng_from_list(d["epoch_rng"])
        return st


def _rng_to_list(state: Any) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(d: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = d
    return (version, tuple(internal), gauss)


# ---- the loop -------------------------------------------------------------------------------

VALIDATE, SAMPLE, SAVE = "eval_every", "sample_every", "checkpoint_every"


@dataclass(frozen=True)
class Due:
    """What to do between this step and the next."""

    validate: bool = False
    sample: bool = False
    save: bool = False
    stop: str | None = None  # "interrupted" or "time_limit"


class Trainer:
    """Holds what the loop needs; `run()` is the loop, `resume()` continues a stored run.
    `session.training` builds one the way `lstmlm train` does."""

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
        self.device, self.precision, self.world = device, precision, world
        if device.type == "cpu":
            keep_freed_memory()  # every batch frees and makes the same buffers: no fresh pages for each
        torch.manual_seed(cfg.train.seed)  # the same on every process: same init, same dropout stream
        m, d, t = cfg.model, cfg.data, cfg.train
        # the path is chosen here; a compiled one is built at run()'s start, where it is said
        self.model = CharLM.from_config(m, len(data.vocab), t.path, device, build=False).to(device)
        self.net: torch.nn.Module = self.model  # what the step runs: the model, or its DDP wrapper
        if world.active:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        # the scratch core's fused step runs as a CUDA graph where it can; eager_because says why not
        wants_graph = t.path in ("auto", "graph") and (capture is not None or graphs.pays(device, self.model.path))
        self.eager_because = graphs.why_eager(Dropouts.of(m).draws, world.active) if wants_graph else None
        graphed = wants_graph and self.eager_because is None
        self.optimizer = build_optimizer(t, self.model, graphed)
        self.step: graphs.Step = self._eager_step
        if graphed:
            state_shape = (m.layers, d.batch_size, m.hidden)
            self.step = graphs.GraphedStep(self._eager_step, self.optimizer, state_shape, len(self.model.cell.state), capture or graphs.CudaGraph(device))
        self._said_eager = False
        self.steps_per_epoch = batches.num_batches(len(data.train), d.batch_size, d.num_steps, d.iterator)
        tokens = on_device(data.train, device)  # the whole text on a GPU where it fits: batches gathered there
        self.batches = BatchSource(tokens, d.batch_size, d.num_steps, d.iterator, world.rows(d.batch_size), device)
        self.cadences: dict[str, Cadence] = {key: cadence(cfg, key) for key in (VALIDATE, SAMPLE, SAVE)}
        self.clock = clock
        self._last: dict[str, float] = {}  # when each cadence's action last happened (clock seconds)
        self._tic = 0.0  # when the current stretch of training steps began
        self._session_start: float | None = None  # when run() began: max_minutes counts from it
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(cfg.train, s, self.steps_per_epoch, self._time_used()))
        # the dropout stream's start, owned by this trainer: run() restores it, so another
        # trainer built (or anything random done) in between cannot change this run
        self.state = TrainerState(epoch_rng=random.Random(cfg.train.seed).getstate(), torch_rng=torch.get_rng_state())
        self.samples: dict[str, str] = {}
        self.prime = prime_text(data.vocab, data.train, d.normalize)
        self.has_val = len(data.val) > 1
        self._saved_at = self._validated_at = -1  # global steps of the last save and validation
        self._carry: State | None = None  # the state reached, gathered from every process
        self.train_perplexity = math.nan  # the last completed epoch's
        # the gradient norms of this session's steps in the current epoch, summed on the device:
        # read (a sync) only where the epoch's end synchronizes anyway
        self.grad_norms = torch.zeros((), dtype=torch.float64, device=device)
        self._norm_steps = 0

    def resume(self) -> None:
        """Continue from the run's latest checkpoint (weights, optimizer, schedule, RNGs, position),
        keeping best.pt unless a better model comes."""
        path = self.store.path(LATEST)
        payload = checkpoint.load(self.store, LATEST)
        checkpoint.check_compatible(payload, self.cfg, self.data.vocab, path)
        checkpoint.load_weights(self.model, convert(payload["model"], self.cfg.model.model, self.model.cell), path)
        trainer = payload["trainer"]
        try:
            load_optimizer_state(self.optimizer, trainer["optimizer"])
            self.schedule.load_state_dict(trainer["schedule"])
            self.state = TrainerState.from_dict(trainer["state"])
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{path} is damaged: its trainer state does not load ({type(e).__name__}: {e})") from None
        self.state.best_saved = self._best_on_disk()
        if self.state.torch_rng is not None:
            torch.set_rng_state(self.state.torch_rng)
        if self.device.type == "cuda" and "cuda_rng" in trainer:
            torch.cuda.set_rng_state(trainer["cuda_rng"])
        self._saved_at = self.state.global_step
        if self.world.is_main:
            self.store.truncate_metrics(self.state.epoch)
            records = self.store.read_metrics()
            if records and isinstance(records[-1].get("train_perplexity"), float):
                self.train_perplexity = records[-1]["train_perplexity"]

    def _best_on_disk(self) -> float | None:
        """The validation loss of the model in best.pt, as best.pt itself records it: latest.pt
        can be older (checkpoints every few epochs, validations every few steps, a kill in
        between), and a figure taken from it would let a worse model replace the best."""
        if not self.store.has_checkpoint(BEST):
            return None
        state = checkpoint.load(self.store, BEST)["trainer"].get("state")
        figure = state.get("best_saved", state.get("best_val")) if isinstance(state, dict) else None  # older files: best_val
        if not isinstance(figure, (int, float)) or isinstance(figure, bool):
            raise CheckpointError(f"{self.store.path(BEST)} does not record its validation loss: move it aside to resume")
        return float(figure)

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        """Train until the epochs are done, the time is up, validation stops improving or
        `should_stop()` says so; every way out ends the same: validate, save, sample, Finished."""
        yield from self._settle_path()
        yield self._started()
        yield from self._why_eager()
        self._session_start = self.clock()
        self._last = dict.fromkeys(self.cadences, self._session_start)
        if self.state.torch_rng is not None:
            torch.set_rng_state(self.state.torch_rng)
        self.model.train()
        reason = yield from self._train(should_stop)
        yield from self._stop(reason)

    # ---- the loop's parts ----

    def _train(self, should_stop: Callable[[], bool]) -> Generator[Event, None, str]:
        """The epochs and their batches; returns why training stopped."""
        st, t = self.state, self.cfg.train
        while st.epoch < t.epochs:
            rng, epoch = self._epoch_batches()
            state = self._carried_state()
            # this process's share of the epoch's loss sum; the saved sum is the global one
            loss_sum = torch.tensor(st.loss_sum if self.world.is_main else 0.0, dtype=torch.float64, device=self.device)
            self._tic = self.clock()
            for X, Y in epoch:
                state = self._step(X, Y, state, loss_sum)
                yield from self._why_eager()
                yield self._stepped(epoch)
                reason = yield from self._between_steps(rng, epoch, state, loss_sum, should_stop)
                if reason is not None:
                    return reason
            if st.step > 0:  # resumed after the epoch's last batch (a checkpoint taken there): close it
                reason = yield from self._between_steps(rng, epoch, state, loss_sum, should_stop)
                if reason is not None:
                    return reason
        return "completed"

    def _between_steps(
        self, rng: random.Random, epoch: Epoch, state: State | None, loss_sum: torch.Tensor, should_stop: Callable[[], bool]
    ) -> Generator[Event, None, str | None]:
        """After a step: close the epoch if it was its last; validate, record, sample and save as
        their cadences say; stop if asked to, out of time, or out of patience (the reason)."""
        st = self.state
        now = self.clock()
        ends_epoch = st.step >= len(epoch)
        due = self._due(ends_epoch, should_stop, now)
        if not ends_epoch and due == Due():
            st.epoch_seconds += now - self._tic
            self._tic = self.clock()
            return None
        st.epoch_seconds += self._settled(now) - self._tic
        st.loss_sum = self._finite(loss_sum)
        self._carry = None if ends_epoch else self._gather(state)
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

    def _settled(self, now: float) -> float:
        """The time the steps so far took: on a GPU, which runs behind the host, the time once it
        has done the work queued (so tokens/s counts work done, not launched); `now` on a CPU."""
        if self.device.type == "cpu":
            return now
        synchronize(self.device)
        return self.clock()

    def _due(self, ends_epoch: bool, should_stop: Callable[[], bool], now: float) -> Due:
        """Which cadences are due after this step (the clock's, agreed by every process: one
        collective for all), and whether to stop. An epoch's last step counts as epoch st.epoch + 1."""
        st, t = self.state, self.cfg.train
        epoch = st.epoch + 1 if ends_epoch else st.epoch
        finishing = ends_epoch and epoch >= t.epochs  # the stop path validates, saves and samples then

        def counted(c: Cadence) -> bool:
            return bool(c.steps and st.global_step % c.steps == 0) or bool(ends_epoch and c.epochs and epoch % c.epochs == 0)

        def timed(key: str) -> bool:
            minutes = self.cadences[key].minutes
            return bool(minutes) and now - self._last[key] >= minutes * 60

        keys = (VALIDATE, SAMPLE, SAVE)
        interrupted, out_of_time, *by_clock = any_each([should_stop(), self._out_of_time(), *(timed(k) for k in keys)], self.world)
        validate, sample, save = (counted(self.cadences[k]) or by_time for k, by_time in zip(keys, by_clock))
        for key, fired in zip(keys, (validate, sample, save)):
            if fired:
                self._last[key] = now
        stop = "interrupted" if interrupted else "time_limit" if out_of_time else None
        return Due(
            validate=validate and self.has_val and not interrupted,
            sample=sample and stop is None and not finishing,
            save=save and stop is None,
            stop=stop,
        )

    def _epoch_batches(self) -> tuple[random.Random, Epoch]:
        """The current epoch's batches from its stored generator state, past those already trained on."""
        rng = random.Random()
        rng.setstate(self.state.epoch_rng)
        return rng, self.batches.epoch(rng, skip=self.state.step)

    def _carried_state(self) -> State | None:
        """This process's rows of the state a mid-epoch checkpoint carried, or None."""
        carry = self.state.carry
        if carry is None:
            return None
        rows = self.world.rows(self.cfg.data.batch_size)
        return tuple(S[:, rows].to(self.device) for S in carry)

    def _step(self, X: torch.Tensor, Y: torch.Tensor, state: State | None, loss_sum: torch.Tensor) -> State:
        """One optimizer step on this process's rows of the batch; its loss, weighted by its
        tokens, is added to `loss_sum` on the device (no sync per batch)."""
        d, st = self.cfg.data, self.state
        if state is not None and d.iterator == "sequential":
            state = self._reset_rows(tuple(S.detach() for S in state))  # truncate backprop at the batch edge
        else:
            state = None  # zero state: the epoch's first batch, or every random-iterator batch
        X, Y = X.to(self.device, non_blocking=True), Y.to(self.device, non_blocking=True)  # this process's rows (already there on a GPU)
        loss, state = self.step(X, Y, state)
        loss_sum += loss.double() * Y.numel()
        self.schedule.step()
        st.step += 1
        st.global_step += 1
        st.tokens += Y.numel() * self.world.size
        self._norm_steps += 1
        return state

    def _reset_rows(self, state: State) -> State:
        """The state with the rows due to start afresh zeroed (`reset_every`): row r of the batch
        every N batches, at step r·N/batch of each cycle, so each batch has its share of fresh
        rows. Decided by the step within the epoch and the row's place in the whole batch, both
        saved and the same on every process: a resume and a torchrun stay exact."""
        every, batch = self.cfg.data.reset_every, self.cfg.data.batch_size
        if every <= 0:
            return state
        rows = torch.arange(batch, device=state[0].device)[self.world.rows(batch)]  # made on the device: no copy, no wait
        keep = ((self.state.step + rows * every // batch) % every != 0)[None, :, None]
        return tuple(S * keep.to(S.dtype) for S in state)

    def _eager_step(self, X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        t = self.cfg.train
        return train_step(self.net, self.optimizer, X, Y, state, t.clip, self.device, self.precision, t.ar, t.tar, grad_norms=self.grad_norms)

    def _settle_path(self) -> Iterator[Noted | Warned]:
        """The scratch core's path, settled before the clock starts: a compiled recurrence this
        machine has not built yet is built here (said, since it takes a while, once), and where
        it cannot be, or the path asked for cannot run here, the path taken instead is said."""
        scratch = self.model.scratch_core
        if scratch is None:
            return
        if scratch.path == "compiled" and native.needs_build():
            yield Noted("compiling the scratch core's recurrence for this CPU (once)")
        why = scratch.settle()
        if why:
            yield Warned(f"the scratch core runs its {scratch.path} path: {why}")
        if self.world.is_main and self.cfg.train.path != self.path:  # the run's config says how it ran
            self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, path=cast(RecurrencePath, self.path)))
            self.store.save_config(self.cfg)

    @property
    def path(self) -> str:
        """How the recurrence runs: the model's path, or graph where the step is one."""
        return "graph" if isinstance(self.step, graphs.GraphedStep) else self.model.path

    def _why_eager(self) -> Iterator[Warned]:
        """Once: why the scratch core's step runs eagerly on CUDA, where a graph would pay."""
        why = self.eager_because or (self.step.failure if isinstance(self.step, graphs.GraphedStep) else None)
        if why is not None and not self._said_eager:
            self._said_eager = True
            yield Warned(f"the scratch core's training step runs eagerly, not as a CUDA graph: {why}")

    def _close_epoch(self, rng: random.Random) -> tuple[float, float, int]:
        """Roll the state over to the next epoch; (its training loss, seconds, tokens)."""
        st = self.state
        seconds, train_loss, epoch_tokens = st.epoch_seconds, st.loss_sum / st.tokens, st.tokens
        st.seconds += seconds
        st.total_tokens += st.tokens
        st.epoch += 1
        st.step, st.tokens, st.loss_sum, st.epoch_seconds, st.carry = 0, 0, 0.0, 0.0, None
        st.epoch_rng = rng.getstate()
        self._carry = None
        self.train_perplexity = perplexity(train_loss)
        return train_loss, seconds, epoch_tokens

    def _epoch_ended(self, train_loss: float, seconds: float, epoch_tokens: int) -> EpochEnded:
        """The epoch's record (with the latest validation), logged to the run's metrics."""
        st = self.state
        val = st.last_val
        record = EpochEnded(
            epoch=st.epoch,
            train_perplexity=self.train_perplexity,
            val_perplexity=perplexity(val) if val is not None else None,
            val_bpc=bits_per_char(val) if val is not None else None,
            tokens_per_s=epoch_tokens / seconds if seconds else 0.0,
            seconds=seconds,
            lr=float(self.optimizer.param_groups[0]["lr"]),  # a device tensor under a graph: read where it is shown
            global_step=st.global_step,
            grad_norm=self._mean_grad_norm(),
        )
        if self.world.is_main:
            self.store.append_metrics({**asdict(record), "train_loss": train_loss})
        return record

    def _mean_grad_norm(self) -> float | None:
        """The mean gradient norm over this session's steps of the epoch just closed, then zeroed
        for the next (in place: a graph adds into this very tensor)."""
        steps, self._norm_steps = self._norm_steps, 0
        mean = self.grad_norms.item() / steps if steps else None
        self.grad_norms.zero_()
        return mean

    def _stepped(self, epoch: Epoch) -> Stepped:
        st, d = self.state, self.cfg.data
        # the progress bar's rate, by the host's clock: on a GPU it runs ahead of the work done
        # by the steps still queued (the epoch's figure is taken after a synchronize)
        seconds = st.epoch_seconds + (self.clock() - self._tic)
        return Stepped(
            epoch=st.epoch + 1,
            step=st.step,
            global_step=st.global_step,
            batches=len(epoch),
            tokens=st.tokens,
            epoch_tokens=len(epoch) * d.batch_size * d.num_steps,
            tokens_per_s=st.tokens / seconds if seconds > 0 else 0.0,
        )

    def _stop(self, reason: str) -> Iterator[Event]:
        """The one way out: validate where the model stands (unless interrupted, or just done),
        save it (unless just saved), sample it (unless interrupted), and say so."""
        st = self.state
        if reason != "interrupted" and self.has_val and self._validated_at != st.global_step:
            yield from self._validate()
        if self._saved_at != st.global_step:
            yield self._save()
        if reason != "interrupted":
            yield from self._sample()
        mid_epoch = st.tokens > 0
        train_ppl = perplexity(st.loss_sum / st.tokens) if mid_epoch else self.train_perplexity
        finished = self._finished(reason, train_ppl)
        if self.world.is_main:  # after the last save: a latest.pt newer than this is a later training's
            self.store.record_done(self._done_record(finished))
        yield finished

    # ---- what the parts do ----

    def _validate(self) -> Iterator[Event]:
        """Validate; a model better than best.pt's is saved as `best` at once.

        Two figures, which agree unless a resume replays steps from a latest.pt older than
        best.pt: `best_val` follows this run's steps (so patience counts as if never
        interrupted), `best_saved` is best.pt's (so best.pt is only ever replaced by a better model)."""
        d, st = self.cfg.data, self.state
        loss, _ = evaluate(self.model, self.data.val, d.batch_size, d.num_steps, self.device, self.precision, self.cfg.train.val_tokens, self.world)
        if not loss <= MAX_LOSS:  # NaN, Inf, or a perplexity that overflows
            self._diverged(f"the validation loss became {loss:.4g} after {st.global_step} steps")
        st.last_val = loss
        if st.best_val is None or loss < st.best_val:
            st.best_val, st.evals_since_best = loss, 0
        else:
            st.evals_since_best += 1
        better = st.best_saved is None or loss < st.best_saved
        if better:
            st.best_saved = loss
            yield self._save(BEST)
        self._validated_at = st.global_step
        yield Evaluated(st.epoch, st.global_step, perplexity(loss), bits_per_char(loss), better, val_loss=loss)

    def _patience_spent(self) -> bool:
        patience = self.cfg.train.patience
        return self.has_val and bool(patience) and self.state.evals_since_best >= patience

    def save(self, which: str = LATEST) -> str:
        """Write a checkpoint (on the main process only; the others' state is the same or derived)."""
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # the loss is measured before the update, so the last update can break the weights unseen
            self._diverged(f"the weights became non-finite ({', '.join(bad[:3])}) in epoch {self.state.epoch + (self.state.step > 0)}")
        if which == LATEST:
            self._saved_at = self.state.global_step
        if not self.world.is_main:
            return ""
        st = self.state
        st.torch_rng = torch.get_rng_state()
        carry = self._carry
        st.carry = [s.detach().cpu() for s in carry] if carry is not None and st.step > 0 else None
        schedule = self.schedule.state_dict()
        schedule["_last_lr"] = [float(lr) for lr in schedule.get("_last_lr", [])]  # device tensors under a graph
        trainer: dict[str, Any] = {"optimizer": optimizer_state(self.optimizer), "schedule": schedule, "state": st.to_dict()}
        if self.device.type == "cuda":
            trainer["cuda_rng"] = torch.cuda.get_rng_state()
        path = checkpoint.save(self.store, self.cfg, self.data.vocab, self.model.state_dict(), trainer, which, self.prime)
        return str(path)

    def _save(self, which: str = LATEST) -> Saved:
        return Saved(self.state.epoch, self.save(which))

    def _sample(self) -> Iterator[Sampled]:
        if not self.world.is_main:
            return
        for prefix in sample_prefixes(self.data.vocab, self.data.train, self.cfg.data.normalize):
            text = as_text(complete(self.model, self.data.vocab, prefix, prime=self.prime), self.cfg.data.normalize)
            shown = as_text(prefix, self.cfg.data.normalize)
            self.samples[shown] = text
            yield Sampled(self.state.epoch, shown, text)

    def _started(self) -> Started:
        return Started(
            run=self.store.name,
            device=describe(self.device),
            precision=self.precision,
            model=self.cfg.model.model,
            cell=self.model.cell.name + ("" if self.model.cell.form == "cudnn" else f" ({self.model.cell.form})"),
            path=self.path,
            vocab_size=len(self.data.vocab),
            num_params=sum(p.numel() for p in self.model.parameters()),
            train_tokens=len(self.data.train),
            val_tokens=len(self.data.val),
            batches_per_epoch=self.steps_per_epoch,
            start_epoch=self.state.epoch,
            epochs=self.cfg.train.epochs,
        )

    def _finished(self, reason: str, train_perplexity: float) -> Finished:
        st = self.state
        seconds, tokens = st.seconds + st.epoch_seconds, st.total_tokens + st.tokens
        return Finished(
            reason=reason,
            perplexity=train_perplexity,
            val_perplexity=perplexity(st.last_val) if st.last_val is not None else None,
            tokens_per_s=tokens / seconds if seconds else 0.0,
            device=describe(self.device),
            model=self.cfg.model.model,
            run=self.store.name,
            epochs=st.epoch,
            vocab_size=len(self.data.vocab),
            samples=dict(self.samples),
            best_val_perplexity=perplexity(st.best_saved) if st.best_saved is not None else None,
        )

    def _done_record(self, finished: Finished) -> dict[str, Any]:
        """What run.json keeps of how this training ended (`lstmlm runs` reads it without torch)."""
        st = self.state
        return {
            "reason": finished.reason,
            "epochs": st.epoch,
            "global_step": st.global_step,
            "tokens": st.total_tokens + st.tokens,
            "seconds": st.seconds + st.epoch_seconds,
            "val_perplexity": finished.val_perplexity,
            "best_val_perplexity": finished.best_val_perplexity,
        }

    def _gather(self, state: State | None) -> State | None:
        """The carried state of every stream, from every process, for a mid-epoch checkpoint."""
        if state is None or not self.world.active:
            return state
        return tuple(torch.cat(all_gather(S.detach().contiguous(), self.world), dim=1) for S in state)

    def _finite(self, loss_sum: torch.Tensor) -> float:
        """The loss sum over all processes as a float; a NaN or Inf stops training before anything is saved."""
        value = sum_all(loss_sum, self.world).item()
        if not math.isfinite(value):
            self._diverged(f"the loss became {value} in epoch {self.state.epoch + 1}")
        mean = value / max(1, self.state.tokens)
        if mean > MAX_LOSS:  # finite, but its perplexity is not: the run has diverged
            self._diverged(f"the loss became {mean:.4g} nats per character in epoch {self.state.epoch + 1}")
        return value

    def _diverged(self, what: str) -> None:
        last = "the last good checkpoint is kept" if self.store.has_checkpoint() else "no checkpoint was written"
        raise TrainingError(f"{what} (learning rate too high?); training stopped and {last}")

    def _time_used(self) -> float:
        """The fraction of this session's max_minutes spent; 0 without a limit or outside run()."""
        limit = self.cfg.train.max_minutes
        if not limit or self._session_start is None:
            return 0.0
        return min(1.0, (self.clock() - self._session_start) / (limit * 60))

    def _out_of_time(self) -> bool:
        return self._time_used() >= 1.0
