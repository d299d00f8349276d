"""The training loop: the loss falls, perplexity is what d2l computes, runs are reproducible,
resume is exact (bitwise) at epoch edges and mid-epoch, and a non-finite loss keeps the last
good checkpoint."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lstmlm.step as step_mod
import lstmlm.train as train_mod
from lstmlm import cells, checkpointer
from lstmlm.checkpoint import load_checkpoint
from lstmlm.data import batches
from lstmlm.errors import TrainingError
from lstmlm.events import EpochEnded, Evaluated, Finished, Sampled, Saved, Stepped
from lstmlm.generate import PRIME_CHARS
from lstmlm.model import CharLM, Dropouts, activation_penalty, loss_fn
from lstmlm.runs import BEST, LATEST, RunStore
from lstmlm.step import train_step
from lstmlm.train import Trainer

from support.on_a_cpu import as_on_a_gpu, graphs_on_the_cpu, host_syncs
from support.references import assert_close

MakeTrainer = Callable[..., Trainer]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def epoch_losses(store: RunStore) -> list[tuple[int, float, float | None]]:
    return [(r["epoch"], r["train_loss"], r["val_perplexity"]) for r in store.read_metrics()]


# ---- the loss, and perplexity as d2l computes it -------------------------------------------------


def test_loss_falls(make_trainer: MakeTrainer) -> None:
    events = list(make_trainer(epochs=5, optimizer="adam", lr=0.01, hidden=32).run())
    ppl = [e.train_perplexity for e in events if isinstance(e, EpochEnded)]
    val = [e.val_perplexity for e in events if isinstance(e, EpochEnded)]
    assert len(ppl) == 5
    assert all(b < a for a, b in itertools.pairwise(ppl)), ppl
    assert ppl[-1] < 0.6 * ppl[0]
    assert val[-1] < val[0]
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "completed" and done.perplexity == ppl[-1]


def d2l_grad_clipping(net: torch.nn.Module, theta: float) -> None:
    """d2l's grad_clipping: scale every gradient by θ/‖g‖ when the global norm exceeds θ."""
    params = [p for p in net.parameters() if p.requires_grad]
    norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in params))
    if norm > theta:
        for p in params:
            p.grad[:] *= theta / norm


def d2l_train_epoch(net: CharLM, ids: torch.Tensor, batch_size: int, num_steps: int, rng: random.Random, lr: float) -> float:
    """d2l's train_epoch_ch8 with the sequential iterator: returns exp(token-weighted mean loss)."""
    state = None
    total, count = 0.0, 0
    for X, Y in batches.sequential(ids, batch_size, num_steps, rng):
        if state is not None:
            state = tuple(s.detach() for s in state)  # the first batch starts from a zero state
        y_hat, state = net(X, state)
        loss = F.cross_entropy(y_hat.reshape(-1, y_hat.shape[-1]), Y.reshape(-1))  # the mean
        net.zero_grad()
        loss.backward()
        d2l_grad_clipping(net, 1.0)
        with torch.no_grad():
            for p in net.parameters():
                p -= lr * p.grad
        total += loss.item() * Y.numel()
        count += Y.numel()
    return math.exp(total / count)


@pytest.mark.parametrize("normalize", ["d2l", "raw"])
def test_perplexity_is_exp_of_the_token_weighted_mean_loss(make_trainer: MakeTrainer, normalize: str) -> None:
    """The reported perplexity equals d2l's, recomputed here from the same batches and init."""
    trainer = make_trainer(normalize=normalize, epochs=3, val_fraction=0.0, lr=1.0, clip=1.0)
    cfg = trainer.cfg
    reported = [e.train_perplexity for e in trainer.run() if isinstance(e, EpochEnded)]

    torch.manual_seed(cfg.train.seed)  # the trainer's init, on the seed's N(0, 0.01²)
    net = CharLM.from_config(cfg.model, len(trainer.data.vocab))
    rng = random.Random(cfg.train.seed)  # the data order: one generator across the epochs
    mine = [d2l_train_epoch(net, trainer.data.train, cfg.data.batch_size, cfg.data.num_steps, rng, 1.0) for _ in range(3)]

    # clip_grad_norm_ divides by ‖g‖ + 1e-6 where d2l divides by ‖g‖: equal up to rounding
    assert reported == pytest.approx(mine, rel=1e-5)
    assert [r["train_perplexity"] for r in trainer.store.read_metrics()] == reported


def test_perplexity_is_exactly_exp_of_the_mean_of_the_batch_losses(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each batch's mean loss, weighted by its tokens, as the trainer's own steps returned them."""
    trainer = make_trainer(epochs=2, iterator="random")
    seen: list[tuple[int, float, int]] = []
    real_step = step_mod.train_step

    def step(model: CharLM, optimizer: Any, X: torch.Tensor, Y: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        loss, state = real_step(model, optimizer, X, Y, *args, **kwargs)
        seen.append((trainer.progress.epoch + 1, loss.item(), Y.numel()))
        return loss, state

    monkeypatch.setattr(step_mod, "train_step", step)
    reported = {e.epoch: e.train_perplexity for e in trainer.run() if isinstance(e, EpochEnded)}
    for epoch in (1, 2):
        total = sum(loss * n for e, loss, n in seen if e == epoch)
        count = sum(n for e, _, n in seen if e == epoch)
        assert count >= trainer.steps_per_epoch * 8 * 10  # every batch of the epoch was seen
        assert reported[epoch] == math.exp(total / count)


def test_validation_perplexity_is_exp_of_the_mean_loss_per_character(make_trainer: MakeTrainer) -> None:
    """evaluate() predicts each validation character once; check it one character at a time."""
    trainer = make_trainer(epochs=1, val_fraction=0.2)
    cfg = trainer.cfg
    events = list(trainer.run())
    val = trainer.data.val
    net = trainer.model.eval()
    streams = min(cfg.data.batch_size, (len(val) - 1) // cfg.data.num_steps)
    columns = (len(val) - 1) // streams
    total = 0.0
    with torch.no_grad():
        for row in range(streams):  # each stream from a zero state, one character at a time
            state, start = None, row * columns
            for t in range(columns):
                logits, state = net(val[start + t : start + t + 1].long().reshape(1, 1), state)
                total += F.cross_entropy(logits.reshape(1, -1), val[start + t + 1 : start + t + 2].long()).item()
    expected = math.exp(total / (streams * columns))
    reported = [e.val_perplexity for e in events if isinstance(e, EpochEnded)]
    assert reported == [pytest.approx(expected, rel=1e-5)]


# ---- AR and TAR: in the gradient, not in the figures ----------------------------------------------


def test_ar_and_tar_change_the_gradient_not_the_reported_loss() -> None:
    """train_step returns the cross-entropy alone; the update differs from the plain one by
    exactly the gradient of α·mean(H̃²) + β·mean((H_t − H_{t−1})²) (SGD, lr 1, no clipping)."""
    torch.manual_seed(0)
    model = CharLM(12, 16, 2, Dropouts(output=0.3, hidden=0.2), embedding=5).double()
    with torch.no_grad():  # weights large enough for activations of order one
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = torch.randint(0, 12, (4, 9)), torch.randint(0, 12, (4, 9))
    results = []
    for ar, tar in ((0.0, 0.0), (2.0, 1.0)):
        model.load_state_dict(start)
        torch.manual_seed(1)  # the same dropout masks in both steps
        loss, _ = train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), X, Y, None, 0.0, torch.device("cpu"), ar=ar, tar=tar)
        results.append((loss, {k: v.clone() for k, v in model.state_dict().items()}))
    (plain_loss, plain), (loss, regularized) = results
    model.load_state_dict(start)
    torch.manual_seed(1)
    logits, _, top = model(X, top=True)
    assert loss.item() == plain_loss.item() == loss_fn(logits, Y).item()  # bitwise: the penalty is not in it
    model.zero_grad()
    activation_penalty(top, 2.0, 1.0).backward()
    for name, p in model.named_parameters():  # W_hq and b_q come after the top layer: untouched
        penalty_grad = torch.zeros_like(p) if p.grad is None else p.grad
        assert_close(plain[name] - regularized[name], penalty_grad, 1e-10, name)
    assert model.W_hq.grad is None and all(p.grad.abs().max() > 1e-6 for p in model.core.parameters())


def test_the_trainer_trains_on_ar_and_tar_and_reports_the_cross_entropy(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same run with AR and TAR: its first batch reports the same loss (the same model,
    cross-entropy alone), its updates differ; perplexity is still exp of those losses."""
    real_step = step_mod.train_step
    seen: list[float] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        loss, state = real_step(*args, **kwargs)
        seen.append(loss.item())
        return loss, state

    monkeypatch.setattr(step_mod, "train_step", step)
    losses, trained = [], []
    for name, extra in (("plain", {}), ("ar", {"ar": 5.0, "tar": 5.0})):
        seen.clear()
        trainer = make_trainer(name, epochs=1, val_fraction=0.0, **extra)
        reported = [e.train_perplexity for e in trainer.run() if isinstance(e, EpochEnded)]
        assert reported == [pytest.approx(math.exp(sum(seen) / len(seen)), rel=1e-12)]  # batches of equal size
        losses.append(list(seen))
        trained.append(weights(trainer))
    (plain, regularized), (plain_weights, regularized_weights) = losses, trained
    assert regularized[0] == plain[0] and regularized[1:] != plain[1:]
    assert not torch.equal(regularized_weights["W_hq"], plain_weights["W_hq"])


# ---- reproducibility and exact resume -------------------------------------------------------------


def test_same_seed_same_run_and_samples(make_trainer: MakeTrainer) -> None:
    args: dict[str, Any] = {"epochs": 2, "dropout": 0.2, "layers": 2, "iterator": "random"}
    runs = [make_trainer(name, **args) for name in ("a", "b")]  # both built before either runs
    finished = [list(t.run())[-1] for t in runs]
    assert_bitwise_equal(weights(runs[0]), weights(runs[1]))
    assert finished[0].samples == finished[1].samples and finished[0].samples
    assert epoch_losses(runs[0].store) == epoch_losses(runs[1].store)
    other = make_trainer("c", **args, seed=1)
    list(other.run())
    assert not torch.equal(weights(other)["W_hq"], weights(runs[0])["W_hq"])


RESUME_CASES = [
    pytest.param("sequential", "scratch", id="sequential-scratch"),
    pytest.param("random", "scratch", id="random-scratch"),
    pytest.param("sequential", "cudnn", id="sequential-cudnn"),
    pytest.param("random", "cudnn", id="random-cudnn"),
]
# AWD-LSTM's regularization, all of it: every mask drawn from the generator the checkpoint saves
AWD = {"embedding": 6, "embedding_dropout": 0.1, "dropout_input": 0.2, "dropout_hidden": 0.25, "dropout_output": 0.3,
       "locked_dropout": True, "weight_drop": 0.4, "ar": 2.0, "tar": 1.0}  # fmt: skip


@pytest.mark.parametrize(
    ("iterator", "model", "regularization"),
    [
        *((*case.values, {}) for case in RESUME_CASES),
        ("sequential", "scratch", AWD),
        ("sequential", "cudnn", AWD),
        ("sequential", "scratch", {"reset_every": 3}),
        *(("sequential", core, {"cell": cell, "weight_drop": 0.3}) for cell in cells.NAMES if cell != "lstm" for core in ("scratch", "cudnn")),
    ],
    ids=[
        *(str(case.id) for case in RESUME_CASES),
        "sequential-scratch-awd",
        "sequential-cudnn-awd",
        "sequential-scratch-reset",
        *(f"sequential-{core}-{cell}" for cell in cells.NAMES if cell != "lstm" for core in ("scratch", "cudnn")),
    ],
)
def test_resume_mid_epoch_is_bitwise_exact(make_trainer: MakeTrainer, iterator: str, model: str, regularization: dict[str, Any]) -> None:
    """Stop after k batches (as SIGINT does), resume in a fresh trainer: the same weights and the
    same per-epoch losses as a run never stopped; dropout > 0 so the torch RNG matters."""
    args = {"epochs": 2, "dropout": 0.3, "layers": 2, "iterator": iterator, "model": model, "checkpoint_every": 5, **regularization}
    straight = make_trainer("straight", **args)
    list(straight.run())

    first = make_trainer("stopped", **args)
    stop_after = first.steps_per_epoch + 3  # inside the second epoch, state carried
    events = list(first.run(lambda: first.progress.global_step >= stop_after))
    assert events[-1].reason == "interrupted" and isinstance(events[-2], Saved)
    torch.manual_seed(12345)  # whatever the process did in between must not matter
    resumed = make_trainer("stopped", **args)
    resumed.resume()
    assert resumed.progress.batch == 3 and resumed.progress.epoch == 1
    list(resumed.run())

    assert_bitwise_equal(weights(straight), weights(resumed))
    assert epoch_losses(straight.store) == epoch_losses(resumed.store)
    assert grad_norms(straight.store) == grad_norms(resumed.store)  # the resumed epoch's mean was of the steps after the resume alone


def grad_norms(store: RunStore) -> list[float | None]:
    return [r.get("grad_norm") for r in store.read_metrics()]


def test_reset_every_zeroes_each_row_once_per_cycle_staggered_and_carries_the_rest(make_trainer: MakeTrainer) -> None:
    """reset_every 4, batches of 8: row r starts afresh at the epoch's steps s with
    (s + r·4/8) % 4 == 0 (two rows a step), every other row continues the state the last step left."""
    trainer = make_trainer(epochs=1, reset_every=4)
    seen: list[tuple[int, Any, Any]] = []
    original = trainer.run_step

    def recording(X: torch.Tensor, Y: torch.Tensor, state: Any) -> Any:
        loss, out = original(X, Y, state)
        seen.append((trainer.progress.batch, None if state is None else [s.clone() for s in state], [s.detach().clone() for s in out]))
        return loss, out

    trainer.run_step = recording
    list(trainer.run())
    assert len(seen) == trainer.steps_per_epoch > 8 and seen[0][1] is None  # the epoch starts from zero
    for (_, _, before), (step, given, _) in itertools.pairwise(seen):
        for row in range(8):
            due = (step + row * 4 // 8) % 4 == 0
            for got, carried in zip(given, before, strict=True):
                expected = torch.zeros_like(carried[:, row]) if due else carried[:, row]
                assert torch.equal(got[:, row], expected), (step, row, due)
    assert all(bool(before[1].ne(0).any(-1).all()) for _, _, before in seen)  # so a zeroed row is never one that was zero already


@pytest.mark.parametrize(("iterator", "model"), RESUME_CASES[:2])
def test_resume_at_an_epoch_edge_is_bitwise_exact(make_trainer: MakeTrainer, iterator: str, model: str) -> None:
    """4 epochs straight == 2 epochs, a new process-like trainer, then 2 more."""
    args = {"dropout": 0.3, "layers": 2, "iterator": iterator, "model": model}
    straight = make_trainer("straight", epochs=4, **args)
    list(straight.run())
    list(make_trainer("split", epochs=2, **args).run())
    torch.manual_seed(999)
    rest = make_trainer("split", epochs=4, **args)
    rest.resume()
    assert rest.progress.epoch == 2
    ended = [e.epoch for e in rest.run() if isinstance(e, EpochEnded)]
    assert ended == [3, 4]
    assert_bitwise_equal(weights(straight), weights(rest))
    assert epoch_losses(straight.store) == epoch_losses(rest.store)


@pytest.mark.parametrize("at", ["epoch_end", "eval_every"])
def test_a_stop_on_a_step_a_validation_is_due_resumes_exactly(make_trainer: MakeTrainer, at: str) -> None:
    """Ctrl-C on the step a validation was due (an epoch's last, or eval_every's) skipped it, and
    the resume never made it up: the epoch's record lacked its val_perplexity (the mid-epoch
    line was missing), and patience and best.pt counted one validation fewer than the run never stopped."""
    args = {"epochs": 2, "dropout": 0.3, "layers": 2, "eval_every": "1e,7"}
    straight = make_trainer("straight", **args)
    list(straight.run())
    first = make_trainer("stopped", **args)
    stop_after = first.steps_per_epoch if at == "epoch_end" else 14
    list(first.run(lambda: first.progress.global_step >= stop_after))
    resumed = make_trainer("stopped", **args)
    resumed.resume()
    list(resumed.run())
    assert_bitwise_equal(weights(straight), weights(resumed))
    assert epoch_losses(straight.store) == epoch_losses(resumed.store)
    assert straight.progress.best_val == resumed.progress.best_val and straight.progress.evals_since_best == resumed.progress.evals_since_best


def test_resume_drops_metrics_no_checkpoint_holds(make_trainer: MakeTrainer) -> None:
    """A crash after an epoch was logged but before its checkpoint: resume re-logs it once."""
    trainer = make_trainer(epochs=3, checkpoint_every="2e")
    for event in trainer.run():
        if isinstance(event, EpochEnded) and event.epoch == 3:
            break  # "killed" after logging epoch 3, whose checkpoint is never written
    assert [r["epoch"] for r in trainer.store.read_metrics()] == [1, 2, 3]
    again = make_trainer(epochs=3, checkpoint_every="2e")
    again.resume()
    list(again.run())
    assert [r["epoch"] for r in again.store.read_metrics()] == [1, 2, 3]


def test_a_resume_from_a_latest_older_than_best_never_makes_best_worse(make_trainer: MakeTrainer) -> None:
    """latest.pt every 3 epochs, validation every epoch, the process killed after epoch 5:
    best.pt holds epoch 5's model, better than anything latest.pt (epoch 3) knows of. Resumed
    to stop at epoch 4, the run must keep it, and report its figure."""
    args = {"checkpoint_every": "3e", "optimizer": "adam", "lr": 0.01}
    first = make_trainer("r", epochs=6, **args)
    events = first.run()
    vals = {}
    for event in events:
        if isinstance(event, Evaluated):
            vals[event.epoch] = event.val_perplexity
        if isinstance(event, EpochEnded) and event.epoch == 5:
            break
    events.close()  # killed: no last save
    best_path = first.store.path(BEST)
    best_before = best_path.read_bytes()
    latest = load_checkpoint(first.store.path(LATEST))["trainer"]["state"]
    assert latest["epoch"] == 3
    assert vals[5] < vals[4] < vals[3] == pytest.approx(math.exp(latest["best_val"]), rel=1e-12)  # epoch 4 beats what latest.pt knows

    resumed = make_trainer("r", epochs=4, **args)
    resumed.resume()
    events = list(resumed.run())
    (evaluated,) = [e for e in events if isinstance(e, Evaluated)]
    assert (evaluated.epoch, evaluated.val_perplexity, evaluated.best) == (4, vals[4], False)
    assert best_path.read_bytes() == best_before
    assert events[-1].best_val_perplexity == pytest.approx(vals[5], rel=1e-12)
    # the replay was exact, and patience counted as in the run never interrupted
    assert math.exp(resumed.progress.best_val) == pytest.approx(vals[4], rel=1e-12) and resumed.progress.evals_since_best == 0


def test_best_is_replaced_only_by_a_better_model(make_trainer: MakeTrainer, scripted_validation: Any) -> None:
    trainer = make_trainer(epochs=5)
    scripted_validation(trainer, [3.0, 2.0, 2.5, 2.0, 1.5, 1.5])
    saved_best = [e.epoch for e in trainer.run() if isinstance(e, Saved) and e.path.endswith("best.pt")]
    assert saved_best == [1, 2, 5]


# ---- non-finite losses ----------------------------------------------------------------------------


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(epochs=4, checkpoint_every=1, val_fraction=0.0)
    events = trainer.run()
    for event in events:
        if isinstance(event, Saved) and event.epoch == 2:
            break
    good = trainer.store.path(LATEST).read_bytes()
    with torch.no_grad():
        trainer.model.W_hq.fill_(math.nan)  # the third epoch's losses are all NaN
    with pytest.raises(TrainingError, match=r"the loss became nan in epoch 3 .*last good checkpoint is kept"):
        list(events)
    assert trainer.store.path(LATEST).read_bytes() == good
    assert load_checkpoint(trainer.store.path(LATEST))["trainer"]["state"]["epoch"] == 2
    assert [r["epoch"] for r in trainer.store.read_metrics()] == [1, 2]


def test_weights_broken_by_the_last_step_are_not_checkpointed(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loss is measured before the update: if the epoch's last update makes the weights
    non-finite, every recorded loss is finite, yet the checkpoint must not take them."""
    trainer = make_trainer(epochs=3, checkpoint_every="1e", val_fraction=0.0)  # a checkpoint at each epoch's end
    real_step = step_mod.train_step

    def step(model: CharLM, *args: Any, **kwargs: Any) -> Any:
        loss, state = real_step(model, *args, **kwargs)
        if trainer.progress.epoch == 1 and trainer.progress.batch == trainer.steps_per_epoch - 1:
            with torch.no_grad():
                model.b_q.fill_(math.inf)  # the second epoch's last update overflows
        return loss, state

    monkeypatch.setattr(step_mod, "train_step", step)
    events = trainer.run()
    for event in events:
        if isinstance(event, Saved) and event.epoch == 1:
            break
    good = trainer.store.path(LATEST).read_bytes()
    with pytest.raises(TrainingError, match=r"the weights became non-finite \(b_q\) in epoch 2 .*last good checkpoint is kept"):
        list(events)
    assert trainer.store.path(LATEST).read_bytes() == good


def test_lr_too_high_stops_before_anything_is_saved(make_trainer: MakeTrainer) -> None:
    trainer = make_trainer(epochs=2, lr=1e6, clip=0.0, val_fraction=0.0)
    with pytest.raises(TrainingError, match=r"the loss became .* in epoch 1 \(learning rate too high\?\); training stopped and no checkpoint was written"):
        list(trainer.run())
    assert not trainer.store.has_checkpoint()


# ---- learning-rate schedules ----------------------------------------------------------------


def test_schedules_warm_up_then_decay() -> None:
    from lstmlm.config import TrainConfig

    warm = TrainConfig(schedule="cosine", epochs=2, warmup_steps=4)
    assert [step_mod.lr_factor(warm, s, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert step_mod.lr_factor(warm, 4, 10) == 1.0  # the cosine starts at the top
    assert step_mod.lr_factor(warm, 4 + 8, 10) == pytest.approx(0.5)  # half way through the 16 cosine steps
    assert step_mod.lr_factor(warm, 20, 10) == pytest.approx(0.0)
    step = TrainConfig(schedule="step", step_every=2, gamma=0.5)
    assert [step_mod.lr_factor(step, s, 10) for s in (0, 19, 20, 39, 40)] == [1.0, 1.0, 0.5, 0.5, 0.25]
    assert step_mod.lr_factor(TrainConfig(), 1000, 10) == 1.0


def test_cosine_anneals_by_whichever_ends_first_steps_or_time() -> None:
    from lstmlm.config import TrainConfig

    t = TrainConfig(schedule="cosine", epochs=100, max_minutes=1.0)
    assert step_mod.lr_factor(t, 10, 10, time_used=0.5) == pytest.approx(0.5)  # time is further along
    assert step_mod.lr_factor(t, 500, 10, time_used=0.0) == pytest.approx(0.5)  # the steps are
    assert step_mod.lr_factor(t, 10, 10, time_used=1.0) == pytest.approx(0.0)
    # step and constant schedules ignore the clock
    assert step_mod.lr_factor(TrainConfig(schedule="step", step_every=1, max_minutes=1.0), 5, 10, time_used=0.9) == 1.0


def test_a_time_limited_cosine_run_ends_with_the_learning_rate_at_its_floor(make_trainer: MakeTrainer) -> None:
    """Far more epochs than the time allows: the run stops on its time limit, and by then the
    cosine, driven by the clock, has brought the learning rate down to (almost) nothing."""
    trainer = make_trainer(epochs=10_000, optimizer="adam", lr=0.01, schedule="cosine", max_minutes=0.02)
    events = list(trainer.run())
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "time_limit"
    assert done.epochs < 10_000
    assert trainer.optimizer.param_groups[0]["lr"] < 0.01 * 0.05  # by epochs it would still be ~0.01


# ---- the text generation reads before a prefix ----------------------------------------------


def test_prime_is_the_training_text_up_to_its_last_paragraph_break(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    from support.tiny import synthetic_text

    corpus = tmp_path / "plays.txt"
    corpus.write_text("".join(f"SPEAKER {i}:\n{synthetic_text(3, seed=i)}\n" for i in range(40)), encoding="utf-8")
    trainer = make_trainer(corpus=corpus, epochs=1)
    train_text = trainer.data.vocab.decode(trainer.data.train)
    prime = trainer.prime
    end = train_text.rfind("\n\n") + 2
    assert prime.endswith("\n\n") and 0 < len(prime) <= PRIME_CHARS
    assert train_text[end - len(prime) : end] == prime  # the training text's, never the validation's
    assert train_text[end - len(prime) - 1] == "\n"  # starting at a line
    list(trainer.run())
    assert load_checkpoint(trainer.store.path(LATEST))["prime"] == prime


def test_no_prime_in_d2l_mode_or_without_paragraph_breaks(make_trainer: MakeTrainer) -> None:
    assert make_trainer("raw").prime == ""  # the synthetic corpus has single line breaks only
    assert make_trainer("d2l", normalize="d2l").prime == ""


# ---- validation cadence, patience, and the one way out ----------------------------------------------


@pytest.fixture
def scripted_validation(monkeypatch: pytest.MonkeyPatch) -> Callable[[Trainer, list[float]], list[int]]:
    """script(trainer, losses): the trainer's validations return `losses` in turn; the list
    returned fills with the global step of each validation."""

    def script(trainer: Trainer, losses: list[float]) -> list[int]:
        at: list[int] = []
        queue = list(losses)

        def evaluate(model: Any, ids: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[float, int]:
            at.append(trainer.progress.global_step)
            return queue.pop(0), len(ids) - 1

        monkeypatch.setattr(train_mod, "evaluate", evaluate)
        return at

    return script


def kinds(events: list[Any]) -> list[str]:
    """The events after the last Stepped, by name (Saved as Saved:which), repeats folded (two samples: one Sampled)."""
    last_step = max(i for i, e in enumerate(events) if type(e).__name__ == "Stepped")
    names = [f"Saved:{Path(e.path).stem}" if isinstance(e, Saved) else type(e).__name__ for e in events[last_step + 1 :]]
    return [name for i, name in enumerate(names) if i == 0 or names[i - 1] != name]


def test_eval_every_validates_every_n_steps_across_epoch_edges(make_trainer: MakeTrainer, scripted_validation: Any) -> None:
    trainer = make_trainer(epochs=3, eval_every=5)
    at = scripted_validation(trainer, [3.0 - 0.01 * i for i in range(100)])
    events = list(trainer.run())
    total = trainer.progress.global_step  # an epoch has at least steps_per_epoch batches, one more for some offsets
    assert total >= 3 * trainer.steps_per_epoch
    assert at == list(range(5, total + 1, 5)) + ([total] if total % 5 else [])  # and once where training ends
    evaluated = [e for e in events if type(e).__name__ == "Evaluated"]
    assert [e.global_step for e in evaluated] == at and all(e.best for e in evaluated)
    # each epoch's record carries the latest validation, not one of its own
    ends = [i for i, e in enumerate(events) if isinstance(e, EpochEnded)]
    for i in ends:
        last = [e for e in events[:i] if type(e).__name__ == "Evaluated"][-1]
        assert events[i].val_perplexity == last.val_perplexity


@pytest.mark.parametrize("eval_every", ["2e", "1000"])
def test_the_validation_where_training_ends_is_the_last_epochs_record(make_trainer: MakeTrainer, scripted_validation: Any, eval_every: str) -> None:
    """The last epoch's end off the validation cadence (3 epochs, every 2; every 1000 steps):
    the end's validation came after that epoch's record, which carried an older one, so
    metrics.jsonl (plot, runs, the server's chart) never held it; TensorBoard did."""
    trainer = make_trainer(epochs=3, eval_every=eval_every)
    scripted_validation(trainer, [2.0, 1.5])
    events = list(trainer.run())
    evaluated = [e for e in events if type(e).__name__ == "Evaluated"]
    assert kinds(events)[-5:] == ["Evaluated", "EpochEnded", "Saved:latest", "Sampled", "Finished"]
    last = [r for r in trainer.store.read_metrics() if r["epoch"] == 3]
    assert len(last) == 1 and last[0]["val_perplexity"] == evaluated[-1].val_perplexity == pytest.approx(math.exp(len(evaluated) * -0.5 + 2.5))


def test_a_validation_within_an_epoch_is_a_line_of_the_metrics_at_its_fraction(make_trainer: MakeTrainer, scripted_validation: Any) -> None:
    """Every 5 steps: a validation that is not at an epoch's end logs its own line, its epoch
    the fraction of the epochs done and its training perplexity the epoch's so far; the
    epochs' own lines are as ever."""
    trainer = make_trainer(epochs=2, eval_every=5)
    at = scripted_validation(trainer, [3.0 - 0.01 * i for i in range(100)])
    events = list(trainer.run())
    records = trainer.store.read_metrics()
    assert [r["epoch"] for r in records if type(r["epoch"]) is int] == [1, 2]
    within = [r for r in records if type(r["epoch"]) is float]
    ends = [e.global_step for e in events if isinstance(e, EpochEnded)]
    assert [r["global_step"] for r in within] == [step for step in at if step not in ends]
    first_epoch = [r for r in within if r["global_step"] < ends[0]]
    assert [r["epoch"] for r in first_epoch] == [round(r["global_step"] / ends[0], 4) for r in first_epoch]
    assert all(0 < r["epoch"] % 1 and r["train_perplexity"] > 1 for r in within)
    assert within[0]["val_perplexity"] == pytest.approx(math.exp(3.0))


def test_a_resume_keeps_the_validations_its_checkpoint_holds_and_drops_the_rest(make_trainer: MakeTrainer) -> None:
    """Killed after a validation within the first epoch that no checkpoint holds: its line goes
    on resume, those before the checkpoint stay."""
    trainer = make_trainer(epochs=2, eval_every=2, checkpoint_every=4)
    for event in trainer.run():
        if type(event).__name__ == "Evaluated" and event.global_step == 6:
            break  # "killed" after validating at step 6, whose checkpoint is never written
    assert [r["global_step"] for r in trainer.store.read_metrics()] == [2, 4, 6]
    again = make_trainer(epochs=2, eval_every=2, checkpoint_every=4)
    again.resume()
    assert again.progress.global_step == 4
    assert [r["global_step"] for r in again.store.read_metrics()] == [2, 4]


def test_patience_stops_at_the_epoch_that_spends_it_saving_latest_once(make_trainer: MakeTrainer, scripted_validation: Any) -> None:
    """Validation per epoch: 2.0 (best), 1.5 (best), 1.6, 1.7 → patience 2 is spent at epoch 4."""
    trainer = make_trainer(epochs=10, patience=2, checkpoint_every="1e")
    scripted_validation(trainer, [2.0, 1.5, 1.6, 1.7, 1.0, 1.0])
    events = list(trainer.run())
    done = events[-1]
    assert isinstance(done, Finished) and (done.reason, done.epochs) == ("early_stop", 4)
    assert kinds(events) == ["Evaluated", "EpochEnded", "Saved:latest", "Sampled", "Finished"]  # latest written once
    assert done.val_perplexity == pytest.approx(math.exp(1.7))
    assert checkpoint_state(trainer, "best")["best_val"] == 1.5 and checkpoint_state(trainer, "best")["epoch"] == 2
    assert checkpoint_state(trainer, "latest")["best_val"] == 1.5 and checkpoint_state(trainer, "latest")["epoch"] == 4


def test_patience_with_eval_every_stops_mid_epoch_and_still_saves_and_samples(make_trainer: MakeTrainer, scripted_validation: Any) -> None:
    trainer = make_trainer(epochs=10, patience=1, eval_every=3)
    at = scripted_validation(trainer, [2.0, 2.5, 1.0])
    events = list(trainer.run())
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == "early_stop"
    assert at == [3, 6] and trainer.progress.global_step == 6  # stopped at the step whose validation spent the patience
    assert kinds(events) == ["Evaluated", "Saved:latest", "Sampled", "Finished"]
    latest = checkpoint_state(trainer, "latest")
    assert latest["global_step"] == 6 and latest["best_val"] == 2.0
    assert (latest["batch"] == 0) == (6 % trainer.steps_per_epoch == 0)


def test_a_completed_run_validates_saves_samples_in_that_order(make_trainer: MakeTrainer) -> None:
    events = list(make_trainer(epochs=2, checkpoint_every="5e").run())
    assert kinds(events)[-5:] == ["Evaluated", "EpochEnded", "Saved:latest", "Sampled", "Finished"]


@pytest.mark.parametrize(
    ("reason", "ending"),
    [
        ("time_limit", ["Saved:best", "Evaluated", "Saved:latest", "Sampled", "Finished"]),  # its first validation: the best yet
        ("interrupted", ["Saved:latest", "Finished"]),  # Ctrl-C: saved at once, neither validated nor sampled
    ],
)
def test_a_stop_inside_an_epoch_takes_the_one_way_out(make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, reason: str, ending: list[str]) -> None:
    """The time limit and Ctrl-C, three steps into the first epoch, end as every stop does: the
    stop path validates (unless interrupted), saves latest once, samples (unless interrupted)."""
    now = [0.0]  # 10 s a training step, on a clock of the test's own
    real_step = step_mod.train_step

    def step(*args: Any, **kwargs: Any) -> Any:
        now[0] += 10.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(step_mod, "train_step", step)
    cadences = {"checkpoint_every": "0", "sample_every": "0", "eval_every": "0"}  # nothing due before the stop
    trainer = make_trainer(epochs=10, max_minutes=0.5 if reason == "time_limit" else 0.0, clock=lambda: now[0], **cadences)  # 0.5 min: 3 steps
    assert trainer.steps_per_epoch > 3
    events = list(trainer.run(lambda: reason == "interrupted" and trainer.progress.global_step >= 3))
    done = events[-1]
    assert isinstance(done, Finished) and done.reason == reason and trainer.progress.global_step == 3
    assert kinds(events) == ending
    latest = checkpoint_state(trainer, "latest")
    assert (latest["epoch"], latest["batch"], latest["global_step"]) == (0, 3, 3) and latest["carry"] is not None


def test_a_checkpoint_from_before_this_layout_resumes(make_trainer: MakeTrainer) -> None:
    """Version 1's trainer state: the batch named "step", and (the first release) an unused "extra"."""
    trainer = make_trainer(epochs=1)
    list(trainer.run())
    path = trainer.store.path(LATEST)
    payload = load_checkpoint(path)
    state = payload["trainer"]["state"]
    state["extra"], state["step"] = {}, state.pop("batch")
    torch.save({**payload, "version": 1}, path)
    resumed = make_trainer(epochs=2)
    resumed.resume()
    assert resumed.progress.epoch == 1
    assert isinstance(list(resumed.run())[-1], Finished)


def checkpoint_state(trainer: Trainer, which: str) -> dict[str, Any]:
    return load_checkpoint(trainer.store.path(which))["trainer"]["state"]


# ---- no waiting for the device between reports ---------------------------------------------------


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize(("iterator", "model", "reset_every"), [*((*case.values, 0) for case in RESUME_CASES), ("sequential", "scratch", 3)],
                         ids=[*(str(case.id) for case in RESUME_CASES), "sequential-scratch-reset"])  # fmt: skip
def test_a_step_never_waits_for_the_device_only_a_report_does(
    make_trainer: MakeTrainer, monkeypatch: pytest.MonkeyPatch, iterator: str, model: str, reset_every: int, graphed: bool
) -> None:
    """On a GPU the host queues the steps and runs ahead; reading any value back makes it wait.
    Counted on a CPU as a GPU meets them (`as_on_a_gpu`): not one such read from one step to the
    next; reads only where a figure is reported (an epoch's loss, validation, a checkpoint)."""
    as_on_a_gpu(monkeypatch)
    if graphed:
        graphs_on_the_cpu(monkeypatch)
    trainer = make_trainer(epochs=2, iterator=iterator, model=model, layers=2, reset_every=reset_every)
    between: list[tuple[object, list[str]]] = []  # each event, and the reads made since the one before
    with host_syncs() as seen:
        done = 0
        for event in trainer.run():
            between.append((event, seen[done:]))
            done = len(seen)
    steps = [reads for (before, _), (event, reads) in itertools.pairwise(between) if isinstance(before, Stepped) and isinstance(event, Stepped)]
    assert len(steps) >= 2 * (trainer.steps_per_epoch - 1) and not any(steps)
    assert any(reads for event, reads in between if isinstance(event, EpochEnded | Evaluated | Saved))  # the count counts


def test_an_optimizer_state_loads_into_an_optimizer_built_another_way() -> None:
    """A checkpoint from a GPU (fused, the learning rate a tensor) resumes on a CPU and the other
    way round: the loading optimizer keeps its own flags, the saved learning rate is a float."""
    torch.manual_seed(0)
    model = CharLM(9, 6)
    from lstmlm.config import TrainConfig

    saved = step_mod.build_optimizer(TrainConfig(optimizer="adam", lr=0.01), model)  # foreach, as on a CPU
    model(torch.randint(0, 9, (2, 4)))[0].sum().backward()
    saved.step()
    saved.param_groups[0]["lr"] = torch.tensor(0.01)  # as a graphed step leaves it
    state = checkpointer.optimizer_state(saved)
    assert state["param_groups"][0]["lr"] == pytest.approx(0.01) and isinstance(state["param_groups"][0]["lr"], float)
    fused = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)  # as built on a GPU
    checkpointer.load_optimizer_state(fused, state)
    group = fused.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None and group["lr"] == pytest.approx(0.01)
    assert all(fused.state[p]["step"].dtype == torch.float32 for p in model.parameters())
    fused.step()  # and it steps
    assert all(fused.state[p]["step"].item() == 2 for p in model.parameters())


# ---- what training samples from ---------------------------------------------------------------------


def test_on_ones_own_text_samples_start_from_its_own_words(make_trainer: MakeTrainer, tmp_path: Path) -> None:
    """Not d2l's "time traveller" on a text of another kind: the opening words of the first
    paragraph past the middle of the training text."""
    front = "*** START OF THE PROJECT GUTENBERG EBOOK ***\n\n"
    body = "".join(f"Call me Ishmael, for the {n}th time. Some years ago, never mind how long.\n\n" for n in range(60))
    corpus = tmp_path / "moby.txt"
    corpus.write_text(front + body, encoding="utf-8")
    trainer = make_trainer(corpus=corpus, epochs=1)
    (prefix,) = trainer.sample_prefixes
    assert prefix.startswith("Call me Ishmael,") and len(prefix) <= 16 and not prefix.endswith(" ")
    assert {e.prefix for e in trainer.run() if isinstance(e, Sampled)} == {prefix}


def test_d2l_text_keeps_d2l_prefixes(make_trainer: MakeTrainer) -> None:
    assert make_trainer(normalize="d2l", epochs=1).sample_prefixes == ["time traveller", "traveller"]


def test_a_thread_limit_below_the_cores_trains_as_one_thread_does(tiny_train_args: list[str]) -> None:
    """Under OMP_THREAD_LIMIT=1 on two cores torch still asked OpenMP for two threads, and its
    oneDNN kernels left undone what the second thread never granted would have done: nn.LSTM's
    gradients came out NaN and the run stopped as diverged (the scratch core's too, whose
    weight gradients are oneDNN's). The command keeps torch within the limit, so the run is the
    one-thread run, to the bit."""
    import json
    import os
    import subprocess
    import sys

    def epochs(run: str, **env: str) -> list[float]:
        args = [*tiny_train_args, "--run", run, "--model", "cudnn", "--hidden", "64", "--batch-size", "16", "--epochs", "1", "--json", "--seed", "4"]
        result = subprocess.run([sys.executable, "-m", "lstmlm", *args], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        assert result.returncode == 0, result.stderr
        return [e["train_perplexity"] for e in map(json.loads, result.stdout.splitlines()) if e["event"] == "epoch"]

    limited = epochs("limited", OMP_THREAD_LIMIT="1")
    one = epochs("one", OMP_NUM_THREADS="1")
    assert len(limited) == 1 and math.isfinite(limited[0])
    assert limited == one
