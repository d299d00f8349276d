"""The training step as a CUDA graph (`lstmlm.graphs`), on a CPU: the graph itself needs a GPU
(tests/test_cuda.py), everything around it does not. `Replayed` records a step as a graph does —
the body kept, not run — and runs it at each replay, so these tests prove the decisions, the
static buffers, the learning rate as a tensor, the fallback, and that a graphed run is the
eager run, bitwise, resumed or not."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lstmlm import graphs
from lstmlm.cells.base import State
from lstmlm.checkpoint import load_checkpoint
from lstmlm.events import EpochEnded, Started, Stepped, Warned
from lstmlm.model import CharLM, loss_fn
from lstmlm.step import train_step
from lstmlm.train import Trainer

from support.cli import cli
from support.on_a_cpu import Replayed, graphs_on_the_cpu

MakeTrainer = Callable[..., Trainer]
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_a_graph_is_for_the_scratch_cores_fused_path_on_cuda() -> None:
    assert graphs.pays(CUDA, "fused")
    assert not graphs.pays(CUDA, "cudnn") and not graphs.pays(CUDA, "loop") and not graphs.pays(CPU, "fused")


def test_what_keeps_the_step_eager() -> None:
    assert graphs.why_eager(False, distributed=False) is None
    assert "DistributedDataParallel" in str(graphs.why_eager(True, distributed=True))
    assert "dropout" in str(graphs.why_eager(True, distributed=False))


# ---- GraphedStep on its own -------------------------------------------------------------------


def tiny(seed: int = 0) -> tuple[CharLM, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = CharLM(11, 8, num_layers=2)
    return model, torch.optim.SGD(model.parameters(), lr=0.5, fused=True)


def batches(n: int, batch: int = 4, steps: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ids = torch.randint(0, 11, (n, batch, steps + 1), generator=torch.Generator().manual_seed(1))
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def eager_step(model: CharLM, optimizer: torch.optim.Optimizer) -> graphs.Step:
    def step(X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        return train_step(model, optimizer, X, Y, state, 1.0, CPU)

    return step


def carry(step: graphs.Step, data: list[tuple[torch.Tensor, torch.Tensor]], reset_every: int = 3) -> list[float]:
    """The losses of `data` through `step`, the state carried (and detached), zero every few batches."""
    losses, state = [], None
    for i, (X, Y) in enumerate(data):
        loss, final = step(X, Y, None if i % reset_every == 0 else state)
        losses.append(loss.item())
        state = tuple(S.detach() for S in final)
    return losses


def test_warm_up_then_record_once_then_replay() -> None:
    model, optimizer = tiny()
    capture = Replayed()
    step = graphs.GraphedStep(eager_step(model, optimizer), optimizer, (2, 4, 8), 2, capture)
    results = [step(X, Y, None) for X, Y in batches(graphs.WARMUP + 3)]
    assert capture.recorded == 1 and step.replays == 3 and step.failure is None
    graphed = results[graphs.WARMUP :]
    assert all(loss is graphed[0][0] and H is graphed[0][1][0] for loss, (H, _) in graphed)  # the buffers, overwritten
    assert results[0][0] is not results[1][0]  # the warm-up steps' own


def test_the_steps_buffers_replayed_are_the_eager_step_bitwise() -> None:
    """What a graph holds besides its kernels: the batch and state copied into the buffers, the
    loss and state read back from them, the learning rate on the device. (On a CPU `Replayed`
    reruns the body: this checks the buffers' wiring, not a CUDA graph; tests/test_cuda.py and
    benchmarks/gpu_check.py check the graph itself on a GPU.)"""
    data = batches(10)
    model, optimizer = tiny()
    eager = carry(eager_step(model, optimizer), data)
    twin, twin_optimizer = tiny()
    graphed = carry(graphs.GraphedStep(eager_step(twin, twin_optimizer), twin_optimizer, (2, 4, 8), 2, Replayed()), data)
    assert graphed == eager
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_the_learning_rate_becomes_a_tensor_the_schedule_fills_in_place() -> None:
    model, optimizer = tiny()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    step = graphs.GraphedStep(eager_step(model, optimizer), optimizer, (2, 4, 8), 2, Replayed())
    for X, Y in batches(graphs.WARMUP + 1):
        step(X, Y, None)
        schedule.step()
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor)  # what the graph reads at each replay
    schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.5 / (graphs.WARMUP + 3))


def test_a_replay_moves_the_parameters_versions_on() -> None:
    """A graph writes the parameters where autograd cannot see it; the versions must move, or
    `ScratchLayer.stacked` would serve evaluation the weights from before the step."""
    model, optimizer = tiny()
    params = list(model.parameters())

    def unseen_update(X: torch.Tensor, Y: torch.Tensor, state: State | None) -> tuple[torch.Tensor, State]:
        for p in params:
            p.data.add_(1.0)  # as a replay writes: no version counter moves
        return torch.zeros(()), model.begin_state(X.shape[0])

    step = graphs.GraphedStep(unseen_update, optimizer, (2, 4, 8), 2, Replayed(), warmup=0)
    X, Y = batches(1)[0]
    layer = model.core.layers[0]
    with torch.no_grad():
        before = layer.stacked(torch.float32, ids=True).table.clone()
    versions = [p._version for p in params]
    step(X, Y, None)
    assert all(p._version > v for p, v in zip(params, versions))
    with torch.no_grad():
        assert not torch.equal(layer.stacked(torch.float32, ids=True).table, before)


def test_a_batch_of_another_shape_runs_eagerly() -> None:
    model, optimizer = tiny()
    step = graphs.GraphedStep(eager_step(model, optimizer), optimizer, (2, 4, 8), 2, Replayed())
    for X, Y in batches(graphs.WARMUP + 1):
        step(X, Y, None)
    X, Y = batches(1, batch=3)[0]
    loss, (H, _) = step(X, Y, None)
    assert step.replays == 1 and H.shape == (2, 3, 8)
    assert loss.item() == pytest.approx(loss_fn(model(X)[0], Y).item(), rel=0.2)  # a real step's loss


class Refused(Replayed):
    def record(self, body: Callable[[], None]) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def test_a_step_that_cannot_be_recorded_runs_eagerly_from_then_on() -> None:
    data = batches(8)
    model, optimizer = tiny()
    eager = carry(eager_step(model, optimizer), data)
    twin, twin_optimizer = tiny()
    step = graphs.GraphedStep(eager_step(twin, twin_optimizer), twin_optimizer, (2, 4, 8), 2, Refused())
    assert carry(step, data) == eager
    assert step.failure == "recording it failed (RuntimeError: operation not permitted when stream is capturing)"
    assert step.replays == 0


# ---- in the trainer -----------------------------------------------------------------------------


def run_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    list(trainer.run())
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("iterator", ["sequential", "random"])
def test_a_graphed_run_is_the_eager_run(make_trainer: MakeTrainer, iterator: str) -> None:
    args = {"epochs": 2, "layers": 2, "iterator": iterator, "schedule": "cosine", "warmup_steps": 4}
    eager = make_trainer("eager", **args)
    expected = run_weights(eager)
    graphed = make_trainer("graphed", capture=Replayed(), **args)
    assert isinstance(graphed.run_step, graphs.GraphedStep)
    got = run_weights(graphed)
    assert graphed.run_step.replays == graphed.progress.global_step - graphs.WARMUP  # every step after the warm-up
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert [r["train_loss"] for r in graphed.store.read_metrics()] == [r["train_loss"] for r in eager.store.read_metrics()]


def test_a_graphed_run_resumes_exactly_and_its_checkpoint_holds_plain_numbers(make_trainer: MakeTrainer) -> None:
    """Stopped mid-epoch and resumed, graphed, it ends where the eager run does; its checkpoint's
    learning rate is a float (a run graphed on a GPU resumes on a CPU)."""
    args = {"epochs": 2, "layers": 2, "schedule": "cosine", "checkpoint_every": 5}
    expected = run_weights(make_trainer("eager", **args))
    first = make_trainer("graphed", capture=Replayed(), **args)
    list(first.run(lambda: first.progress.global_step >= first.steps_per_epoch + 3))
    saved = load_checkpoint(first.store.path())["trainer"]
    assert isinstance(saved["optimizer"]["param_groups"][0]["lr"], float)
    assert all(isinstance(lr, float) for lr in saved["schedule"]["_last_lr"])
    resumed = make_trainer("graphed", capture=Replayed(), **args)
    resumed.resume()
    got = run_weights(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_the_trainer_says_once_why_a_graph_could_not_be_used(make_trainer: MakeTrainer) -> None:
    events = list(make_trainer("dropout", capture=Replayed(), epochs=1, dropout=0.2, layers=2).run())
    warned = [e for e in events if isinstance(e, Warned)]
    assert len(warned) == 1 and "dropout" in warned[0].message and isinstance(events[events.index(warned[0]) - 1], Started)  # right after Started

    events = list(make_trainer("refused", capture=Refused(), epochs=2).run())
    warned = [e for e in events if isinstance(e, Warned)]
    assert len(warned) == 1 and "recording it failed" in warned[0].message
    first_step = next(i for i, e in enumerate(events) if isinstance(e, Stepped) and e.global_step == graphs.WARMUP + 1)
    assert events.index(warned[0]) == first_step - 1  # said with the step that tried
    assert sum(isinstance(e, EpochEnded) for e in events) == 2  # and training went on


def test_no_warning_where_eager_is_simply_the_path(make_trainer: MakeTrainer) -> None:
    assert not [e for e in make_trainer(epochs=1, dropout=0.2, layers=2).run() if isinstance(e, Warned)]  # a CPU


def test_a_graph_asked_for_on_a_cpu_is_said_to_run_eagerly(make_trainer: MakeTrainer) -> None:
    """--path graph on a CPU ran the LSTM's fused step eagerly and said nothing (the GRU's and the
    RNN's fallbacks were said): the docs promise training says which path ran when it is not the one asked for."""
    warned = [e.message for e in make_trainer(epochs=1, path="graph").run() if isinstance(e, Warned)]
    assert warned == ["the scratch core's training step runs eagerly, not as a CUDA graph: a CUDA graph needs a CUDA GPU, and this run is on cpu"]


@pytest.mark.parametrize(("path", "said"), [("loop", True), ("auto", False)])
def test_a_path_given_to_the_cudnn_model_is_said_not_to_be_used(make_trainer: MakeTrainer, path: str, said: bool) -> None:
    """--model cudnn --path loop showed 'path loop' in the run's table, of a core with no path."""
    warned = [e.message for e in make_trainer(epochs=1, model="cudnn", path=path).run() if isinstance(e, Warned)]
    expected = "path loop is not used: it chooses how the scratch core runs, and this run's model is cudnn (torch's own layer)"
    assert warned == ([expected] if said else [])


def test_the_command_line_shows_the_warning_as_a_line_or_a_json_event(tiny_train_args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    graphs_on_the_cpu(monkeypatch)
    shown = cli(*tiny_train_args, "--run", "lines", "--dropout", "0.2", "--layers", "2")
    assert shown.code == 0 and "warning: the scratch core's training step runs eagerly" in shown.stderr
    events = cli(*tiny_train_args, "--run", "json", "--dropout", "0.2", "--layers", "2", "--json")
    assert events.code == 0
    warnings = [e for e in events.json() if e["event"] == "warning"]
    assert len(warnings) == 1 and "dropout" in warnings[0]["message"]
