"""The training loop, as a generator of events: the CLI renders them, tests `list(...)` them.

The seed's semantics (d2l's train_ch8): the recurrent state starts at zero on an epoch's first
batch (on every batch for the random iterator) and is detached between batches, so gradients
flow back only through the current `num_steps`; the loss is the mean cross-entropy; gradients
are clipped to a global norm θ; perplexity is exp of the token-weighted mean loss.

Everything that decides what happens next is in `TrainerState` and saved in every checkpoint —
the data generator's state at the epoch's start, the batch index within the epoch, the carried
(H, C), torch's RNG — so a run resumed from any checkpoint continues exactly as it would have.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import batches, encoded
from .distributed import World, all_gather, any_all, sum_all
from .checkpoint import BEST, LATEST, RunStore, check_compatible, load_weights
from .config import Config, TrainConfig
from .corpus import Progress, locate, normalize, read_text
from .device import autocast, describe
from .errors import CorpusError, TrainingError
from .generate import complete
from .lstm import State
from .model import CharLM, convert, loss_fn
from .vocab import Vocab

MAX_LOSS = math.log(sys.float_info.max)  # nats per character; above it exp (perplexity) overflows
SAMPLE_LENGTH = 50  # characters per progress sample, as d2l
PRIME_CHARS = 256  # at most this much training text is kept to read before a prefix
D2L_PREFIXES = ("time traveller", "traveller")


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    run: str
    device: str
    precision: str
    model: str
    vocab_size: int
    num_params: int
    train_tokens: int
    val_tokens: int
    batches_per_epoch: int
    start_epoch: int
    epochs: int


@dataclass(frozen=True)
class Stepped:
    epoch: int  # 1-based, the epoch in progress
    step: int  # batches done in this epoch
    global_step: int


@dataclass(frozen=True)
class Evaluated:
    epoch: int
    global_step: int
    val_perplexity: float
    val_bpc: float
    best: bool


@dataclass(frozen=True)
class EpochEnded:
    epoch: int
    train_perplexity: float
    val_perplexity: float | None
    val_bpc: float | None
    tokens_per_s: float
    seconds: float
    lr: float


@dataclass(frozen=True)
class Sampled:
    epoch: int
    prefix: str
    text: str


@dataclass(frozen=True)
class Saved:
    epoch: int
    path: str


@dataclass(frozen=True)
class Finished:
    reason: str  # completed | interrupted | early_stop | time_limit
    perplexity: float
    val_perplexity: float | None
    tokens_per_s: float
    device: str
    model: str
    run: str
    epochs: int  # epochs completed
    vocab_size: int
    samples: dict[str, str]


Event = Started | Stepped | Evaluated | EpochEnded | Sampled | Saved | Finished


# ---- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    vocab: Vocab
    train: torch.Tensor  # int32 ids
    val: torch.Tensor  # int32 ids, empty without a validation split


def build_vocab(text: str, normalize: str) -> Vocab:
    """d2l: the seed's vocab. raw: `<unk>` then every character by code point."""
    if normalize == "d2l":
        return Vocab.build(text, order="frequency", unk=True)
    return Vocab.build(text, order="codepoint", unk=True)


def prepare_data(cfg: Config, vocab: Vocab | None = None, progress: Progress | None = None) -> Data:
    """Text → vocab (built on the whole corpus, as d2l) → ids → the first max_tokens → split."""
    d = cfg.data
    path = locate(d.corpus, progress)
    cache = encoded.entry(path, d.normalize)
    hit = encoded.load(cache)
    if hit is not None and (vocab is None or hit[0] == vocab):
        vocab, ids = hit
    else:
        text = normalize(read_text(path), d.normalize)
        if not text:
            raise CorpusError(f"corpus {d.corpus} is empty after {d.normalize} normalization")
        built = build_vocab(text, d.normalize)
        ids = (vocab or built).encode(text)
        if vocab is None or vocab == built:
            encoded.save(cache, built, ids)
        vocab = vocab or built
    if d.max_tokens > 0:
        ids = ids[: d.max_tokens]
    parts = batches.split(ids, d.val_fraction)
    batches.check_length(len(parts.train), d.batch_size, d.num_steps, "training text")
    return Data(vocab, parts.train, parts.val)


# ---- one step, evaluation -----------------------------------------------------------------


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    X: torch.Tensor,
    Y: torch.Tensor,
    state: State | None,
    clip: float,
    device: torch.device,
    precision: str = "fp32",
) -> tuple[torch.Tensor, State]:
    """Forward, mean loss, backward, clip, update. Returns the loss (on the device, no sync)."""
    with autocast(device, precision):
        logits, state = model(X, state)  # (batch, steps, vocab)
        loss = loss_fn(logits, Y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    optimizer.step()
    return loss.detach(), state


@torch.no_grad()
def evaluate(
    model: CharLM, ids: torch.Tensor, batch_size: int, num_steps: int, device: torch.device, precision: str = "fp32"
) -> tuple[float, int]:
    """(mean loss in nats, characters predicted) over the whole text, the state carried.

    The text is cut into `streams` contiguous rows read in parallel, each from a zero state;
    every character after a row's first is predicted once.
    """
    streams = min(batch_size, max(1, (len(ids) - 1) // num_steps))
    columns = (len(ids) - 1) // streams
    if columns < 1:
        raise TrainingError(f"text of {len(ids)} characters is too short to evaluate")
    X = ids[: streams * columns].long().reshape(streams, columns).to(device)
    Y = ids[1 : streams * columns + 1].long().reshape(streams, columns).to(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    state = None
    for i in range(0, columns, num_steps):
        with autocast(device, precision):
            logits, state = model(X[:, i : i + num_steps], state)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), Y[:, i : i + num_steps].reshape(-1), reduction="sum").double()
    model.train(was_training)
    return total.item() / (streams * columns), streams * columns


def bits_per_char(loss: float) -> float:
    return loss / math.log(2)


# ---- optimizer and schedule -----------------------------------------------------------------


def build_optimizer(t: TrainConfig, model: CharLM) -> torch.optim.Optimizer:
    params = list(model.parameters())
    if t.optimizer == "sgd":  # d2l's sgd: param -= lr · grad
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


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
    best_val: float | None = None
    evals_since_best: int = 0
    last_val: float | None = None
    torch_rng: torch.Tensor | None = None
    carry: list[torch.Tensor] | None = None  # (H, C) mid-epoch, for the sequential iterator
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["epoch_rng"] = _rng_to_list(self.epoch_rng)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerState:
        st = cls(**d)
        st.epoch_rng = _rng_from_list(d["epoch_rng"])
        return st


def _rng_to_list(state: Any) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_list(d: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = d
    return (version, tuple(internal), gauss)


# ---- the loop -------------------------------------------------------------------------------


def sample_prefixes(cfg: Config, data: Data) -> list[str]:
    """d2l's two prefixes where the vocab can read them; else the training text's first line."""
    fits = [p for p in D2L_PREFIXES if all(c in data.vocab.index for c in p)]
    if cfg.data.normalize == "d2l" or fits:
        return fits
    first = data.vocab.decode(data.train[:64]).split("\n")[0][:16]
    return [first or data.vocab.decode(data.train[:8])]


def prime_text(cfg: Config, data: Data) -> str:
    """Context for generation to read before a prefix: the training text up to its last
    paragraph break ("\n\n"), from a line start at most PRIME_CHARS back.

    Trained with the state carried from batch to batch, a model has met a zero state only at
    the start of each epoch, and from one it can be lost for a while ("ROMEO:" → "XVVVV…");
    after reading some of its own kind of text it is where training left it. Empty in d2l
    mode (the seed's predict starts from zeros, and its lines are joined) and where the last
    20·PRIME_CHARS characters of the training text hold no paragraph break."""
    if cfg.data.normalize == "d2l":
        return ""
    tail = data.vocab.decode(data.train[-20 * PRIME_CHARS :])
    end = tail.rfind("\n\n") + 2
    if end < 2:
        return ""
    start = tail.find("\n", max(0, end - PRIME_CHARS), end - 2) + 1  # after a line break (0: none found)
    return tail[start:end] if start > 0 else tail[max(0, end - PRIME_CHARS) : end]


class Trainer:
    """Holds what the loop needs; `run()` is the loop. Build one with `Trainer.start`."""

    def __init__(
        self, store: RunStore, cfg: Config, data: Data, device: torch.device, precision: str, world: World = World()
    ) -> None:
        self.store, self.cfg, self.data = store, cfg, data
        self.device, self.precision, self.world = device, precision, world
        torch.manual_seed(cfg.train.seed)  # the same on every process: same init, same dropout stream
        self.model = CharLM.from_config(cfg.model, len(data.vocab)).to(device)
        self.net: torch.nn.Module = self.model  # what the step runs: the model, or its DDP wrapper
        if world.active:
            ids = [device.index] if device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(cfg.train, self.model)
        d = cfg.data
        self.steps_per_epoch = batches.num_batches(len(data.train), d.batch_size, d.num_steps, d.iterator)
        self._session_start: float | None = None  # when run() began: max_minutes counts from it
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg.train, s, self.steps_per_epoch, self._time_used())
        )
        # the dropout stream's start, owned by this trainer: run() restores it, so another
        # trainer built (or anything random done) in between cannot change this run
        self.state = TrainerState(epoch_rng=random.Random(cfg.train.seed).getstate(), torch_rng=torch.get_rng_state())
        self.samples: dict[str, str] = {}
        self.prime = prime_text(cfg, data)

    def resume(self) -> None:
        """Continue from the run's latest checkpoint (weights, optimizer, schedule, RNGs, position)."""
        payload = self.store.load(LATEST)
        check_compatible(payload, self.cfg, self.data.vocab, self.store.path(LATEST))
        load_weights(self.model, convert(payload["model"], self.cfg.model.model), self.store.path(LATEST))
        trainer = payload["trainer"]
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.schedule.load_state_dict(trainer["schedule"])
        self.state = TrainerState.from_dict(trainer["state"])
        if self.state.torch_rng is not None:
            torch.set_rng_state(self.state.torch_rng)
        if self.device.type == "cuda" and "cuda_rng" in trainer:
            torch.cuda.set_rng_state(trainer["cuda_rng"])
        if self.world.is_main:
            self.store.truncate_metrics(self.state.epoch)

    def save(self, which: str = LATEST, carry: State | None = None) -> str:
        """Write a checkpoint (on the main process only; the others' state is the same or derived)."""
        bad = [k for k, v in self.model.state_dict().items() if v.is_floating_point() and not bool(v.isfinite().all())]
        if bad:  # the loss is measured before the update, so the last update can break the weights unseen
            self._diverged(f"the weights became non-finite ({', '.join(bad[:3])}) in epoch {self.state.epoch + (self.state.step > 0)}")
        if not self.world.is_main:
            return ""
        st = self.state
        st.torch_rng = torch.get_rng_state()
        st.carry = [s.detach().cpu() for s in carry] if carry is not None and st.step > 0 else None
        trainer = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(), "state": st.to_dict()}
        if self.device.type == "cuda":
            trainer["cuda_rng"] = torch.cuda.get_rng_state()
        return str(self.store.save(self.cfg, self.data.vocab, self.model.state_dict(), trainer, which, self.prime))

    def validate(self) -> tuple[float, bool]:
        """(validation loss, whether it is the best so far), saving `best` when it is."""
        d = self.cfg.data
        loss, _ = evaluate(self.model, self.data.val, d.batch_size, d.num_steps, self.device, self.precision)
        if not loss <= MAX_LOSS:  # NaN, Inf, or a perplexity that overflows
            self._diverged(f"the validation loss became {loss:.4g} after {self.state.global_step} steps")
        st = self.state
        st.last_val = loss
        improved = st.best_val is None or loss < st.best_val
        if improved:
            st.best_val, st.evals_since_best = loss, 0
        else:
            st.evals_since_best += 1
        return loss, improved

    def sample(self) -> list[Sampled]:
        out: list[Sampled] = []
        if not self.world.is_main:
            return out
        for prefix in sample_prefixes(self.cfg, self.data):
            text = complete(self.model, self.data.vocab, prefix, SAMPLE_LENGTH, prime=self.prime)
            self.samples[prefix] = text
            out.append(Sampled(self.state.epoch, prefix, text))
        return out

    def finished(self, reason: str, perplexity: float) -> Finished:
        st = self.state
        return Finished(
            reason=reason,
            perplexity=perplexity,
            val_perplexity=math.exp(st.last_val) if st.last_val is not None else None,
            tokens_per_s=(st.total_tokens + st.tokens) / (st.seconds + st.epoch_seconds) if st.seconds + st.epoch_seconds else 0.0,
            device=describe(self.device),
            model=self.cfg.model.model,
            run=self.store.name,
            epochs=st.epoch,
            vocab_size=len(self.data.vocab),
            samples=dict(self.samples),
        )

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
        cfg, st, d, t = self.cfg, self.state, self.cfg.data, self.cfg.train
        has_val = len(self.data.val) > 1
        yield Started(
            run=self.store.name,
            device=describe(self.device),
            precision=self.precision,
            model=cfg.model.model,
            vocab_size=len(self.data.vocab),
            num_params=sum(p.numel() for p in self.model.parameters()),
            train_tokens=len(self.data.train),
            val_tokens=len(self.data.val),
            batches_per_epoch=self.steps_per_epoch,
            start_epoch=st.epoch,
            epochs=t.epochs,
        )
        started = self._session_start = time.perf_counter()
        train_ppl = math.nan
        if st.torch_rng is not None:
            torch.set_rng_state(st.torch_rng)
        self.model.train()
        while st.epoch < t.epochs:
            rng = random.Random()
            rng.setstate(st.epoch_rng)
            epoch_batches = batches.ITERATORS[d.iterator](self.data.train, d.batch_size, d.num_steps, rng)
            for _ in range(st.step):  # resuming mid-epoch: replay the batches already trained on
                next(epoch_batches)
            rows = self.world.rows(d.batch_size)  # this process's streams: all of them in one process
            state: State | None = None
            if st.carry is not None:
                state = (st.carry[0][:, rows].to(self.device), st.carry[1][:, rows].to(self.device))
            # this process's share of the epoch's loss sum; the saved sum is the global one
            loss_sum = torch.tensor(st.loss_sum if self.world.is_main else 0.0, dtype=torch.float64, device=self.device)
            tic = time.perf_counter()
            for X, Y in epoch_batches:
                if state is not None and d.iterator == "sequential":
                    state = (state[0].detach(), state[1].detach())  # truncate backprop at the batch edge
                else:
                    state = None  # zero state: the epoch's first batch, or every random-iterator batch
                X, Y = X[rows].to(self.device, non_blocking=True), Y[rows].to(self.device, non_blocking=True)
                loss, state = train_step(self.net, self.optimizer, X, Y, state, t.clip, self.device, self.precision)
                self.schedule.step()
                loss_sum += loss.double() * Y.numel()  # on the device: no sync per batch
                st.step += 1
                st.global_step += 1
                st.tokens += Y.numel() * self.world.size
                yield Stepped(st.epoch + 1, st.step, st.global_step)
                if has_val and t.eval_every and st.global_step % t.eval_every == 0:
                    st.epoch_seconds += time.perf_counter() - tic
                    st.loss_sum = self._finite(loss_sum)
                    yield from self._validate_and_keep(self._gather(state))
                    tic = time.perf_counter()
                    if t.patience and st.evals_since_best >= t.patience:
                        yield self.finished("early_stop", math.exp(st.loss_sum / st.tokens))
                        return
                if any_all(should_stop() or self._out_of_time(started), self.world, self.device):
                    st.epoch_seconds += time.perf_counter() - tic
                    st.loss_sum = self._finite(loss_sum)
                    carry = self._gather(state)
                    yield Saved(st.epoch, self.save(LATEST, carry))
                    reason = "interrupted" if should_stop() else "time_limit"
                    if reason == "time_limit":  # the run ends here: report where the model got to
                        if has_val:
                            yield from self._validate_and_keep(carry)
                        yield from self.sample()
                    yield self.finished(reason, math.exp(st.loss_sum / st.tokens))
                    return
            seconds = st.epoch_seconds + time.perf_counter() - tic
            train_loss = self._finite(loss_sum) / st.tokens
            train_ppl = math.exp(train_loss)
            st.seconds += seconds
            st.total_tokens += st.tokens
            epoch_tokens = st.tokens
            st.epoch += 1
            st.step, st.tokens, st.loss_sum, st.epoch_seconds, st.carry = 0, 0, 0.0, 0.0, None
            st.epoch_rng = rng.getstate()
            if has_val and not t.eval_every:
                yield from self._validate_and_keep(None)
            val = st.last_val
            record = EpochEnded(
                epoch=st.epoch,
                train_perplexity=train_ppl,
                val_perplexity=math.exp(val) if val is not None else None,
                val_bpc=bits_per_char(val) if val is not None else None,
                tokens_per_s=epoch_tokens / seconds if seconds else 0.0,
                seconds=seconds,
                lr=self.optimizer.param_groups[0]["lr"],
            )
            if self.world.is_main:
                self.store.append_metrics({**asdict(record), "train_loss": train_loss, "global_step": st.global_step})
            yield record
            if t.sample_every and st.epoch % t.sample_every == 0 and st.epoch < t.epochs:
                yield from self.sample()
            if st.epoch % t.checkpoint_every == 0 or st.epoch == t.epochs:
                yield Saved(st.epoch, self.save(LATEST))
            if has_val and t.patience and not t.eval_every and st.evals_since_best >= t.patience:
                yield Saved(st.epoch, self.save(LATEST))
                yield from self.sample()
                yield self.finished("early_stop", train_ppl)
                return
            if self._out_of_time(started):
                yield Saved(st.epoch, self.save(LATEST))
                yield from self.sample()
                yield self.finished("time_limit", train_ppl)
                return
        yield from self.sample()
        yield self.finished("completed", train_ppl)

    def _validate_and_keep(self, carry: State | None) -> Iterator[Event]:
        loss, best = self.validate()
        if best:
            yield Saved(self.state.epoch, self.save(BEST, carry))
        yield Evaluated(self.state.epoch, self.state.global_step, math.exp(loss), bits_per_char(loss), best)

    def _gather(self, state: State | None) -> State | None:
        """The carried (H, C) of every stream, from every process, for a mid-epoch checkpoint."""
        if state is None or not self.world.active:
            return state
        H, C = (torch.cat(all_gather(s.detach().contiguous(), self.world), dim=1) for s in state)
        return H, C

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
        return min(1.0, (time.perf_counter() - self._session_start) / (limit * 60))

    def _out_of_time(self, started: float) -> bool:
        limit = self.cfg.train.max_minutes
        return bool(limit) and time.perf_counter() - started >= limit * 60
