"""CharLM: the scratch and nn.LSTM models are one function after conversion, and the scratch
model is the seed's own code, one-hot products and all."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from lstmlm import cells
from lstmlm.checkpoint import migrate
from lstmlm.config import Config
from lstmlm.errors import CheckpointError, ConfigError, ShapeError
from lstmlm.model import CharLM, Dropouts, TopLayer, activation_penalty, convert, core_of, loss_fn, scratch_layer

from support.references import assert_close

LSTM = cells.get("lstm")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_pair(vocab_size: int, num_hiddens: int, num_layers: int, embedding: int, dtype: torch.dtype, dropout: float | Dropouts = 0.0) -> tuple[CharLM, CharLM]:
    """A scratch CharLM with random weights (large enough to use the nonlinearities) and the
    nn.LSTM CharLM converted from it."""
    torch.manual_seed(0)
    scratch = CharLM(vocab_size, num_hiddens, num_layers, dropout, core="scratch", embedding=embedding).to(dtype)
    with torch.no_grad():
        for p in scratch.parameters():
            p.normal_(0.0, 0.5)
    cudnn = CharLM(vocab_size, num_hiddens, num_layers, dropout, core="cudnn", embedding=embedding).to(dtype)
    cudnn.load_state_dict(convert(scratch.state_dict(), "cudnn", LSTM))
    return scratch, cudnn


def forward_backward(model: CharLM, X: torch.Tensor, Y: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
    model.zero_grad(set_to_none=True)
    logits, (H, C) = model(X, state)
    loss_fn(logits, Y).backward()
    return logits.detach(), H.detach(), C.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("embedding", [0, 6], ids=["one-hot", "embedding"])
@pytest.mark.parametrize("initial", ["zero", "random"])
def test_scratch_and_cudnn_models_agree(dtype: torch.dtype, num_layers: int, embedding: int, initial: str) -> None:
    vocab_size, num_hiddens, batch, steps = 12, 8, 3, 7
    scratch, cudnn = make_pair(vocab_size, num_hiddens, num_layers, embedding, dtype)
    X = torch.randint(0, vocab_size, (batch, steps))
    Y = torch.randint(0, vocab_size, (batch, steps))
    shape = (num_layers, batch, num_hiddens)
    state = None if initial == "zero" else (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype))
    tol = TOL[dtype]
    for a, e, name in zip(forward_backward(scratch, X, Y, state), forward_backward(cudnn, X, Y, state), ["logits", "H", "C"]):
        assert_close(a, e, tol, name)
    mapped = convert({name: p.grad for name, p in scratch.named_parameters()}, "cudnn", LSTM)
    for name, p in cudnn.named_parameters():
        assert_close(p.grad, mapped[name.replace("bias_hh", "bias_ih")], tol, f"d{name}")


def seed_lstm(inputs: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], params: list[torch.Tensor]):
    """The article's `lstm`, verbatim but for layout: one-hot inputs multiplied by W."""
    [W_xi, W_hi, b_i, W_xf, W_hf, b_f, W_xo, W_ho, b_o, W_xc, W_hc, b_c, W_hq, b_q] = params
    (H, C) = state
    outputs = []
    for X in inputs:
        I = torch.sigmoid((X @ W_xi) + (H @ W_hi) + b_i)
        F_ = torch.sigmoid((X @ W_xf) + (H @ W_hf) + b_f)
        O = torch.sigmoid((X @ W_xo) + (H @ W_ho) + b_o)
        C_tilda = torch.tanh((X @ W_xc) + (H @ W_hc) + b_c)
        C = F_ * C + I * C_tilda
        H = O * torch.tanh(C)
        Y = (H @ W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H, C)


def test_scratch_model_is_the_seed_code() -> None:
    """CharLM's row selection computes what the seed's one-hot products compute, to the last bit
    that float arithmetic allows."""
    vocab_size, num_hiddens, batch, steps = 28, 16, 4, 9
    scratch, _ = make_pair(vocab_size, num_hiddens, 1, 0, torch.float64)
    layer = scratch.core.layers[0]
    params = [getattr(layer, f"{w}{g}") for g in "ifoc" for w in ("W_x", "W_h", "b_")] + [scratch.W_hq, scratch.b_q]
    X = torch.randint(0, vocab_size, (batch, steps))
    state = (torch.zeros(batch, num_hiddens, dtype=torch.float64),) * 2
    expected, (H, C) = seed_lstm(F.one_hot(X.T, vocab_size).double(), state, params)  # (steps·batch, vocab)
    logits, (H2, C2) = scratch(X)
    assert_close(logits.transpose(0, 1).reshape(-1, vocab_size), expected, 1e-12, "logits")
    assert_close(H2[0], H, 1e-12, "H")
    assert_close(C2[0], C, 1e-12, "C")


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_two_chunks_equal_one_run(core: str) -> None:
    scratch, cudnn = make_pair(10, 8, 2, 0, torch.float64)
    model = scratch if core == "scratch" else cudnn
    X = torch.randint(0, 10, (3, 11))
    whole, (H, C) = model(X)
    first, state = model(X[:, :5])
    second, (H2, C2) = model(X[:, 5:], state)
    assert_close(torch.cat([first, second], dim=1), whole, 1e-12, "logits")
    assert_close(H2, H, 1e-12, "H")
    assert_close(C2, C, 1e-12, "C")


@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("embedding", [0, 5], ids=["one-hot", "embedding"])
def test_conversion_round_trip_is_exact(num_layers: int, embedding: int) -> None:
    scratch, _ = make_pair(10, 8, num_layers, embedding, torch.float32)
    original = scratch.state_dict()
    to_cudnn = convert(original, "cudnn", LSTM)
    assert core_of(to_cudnn) == "cudnn"
    back = convert(to_cudnn, "scratch", LSTM)
    assert back.keys() == original.keys()
    for name, value in original.items():
        assert torch.equal(back[name], value), name


def test_cudnn_weights_convert_to_an_equal_scratch_model() -> None:
    """From nn.LSTM, whose two biases are both random, the other way round."""
    torch.manual_seed(1)
    cudnn = CharLM(10, 8, 2, core="cudnn").double()
    scratch = CharLM(10, 8, 2, core="scratch").double()
    scratch.load_state_dict(convert(cudnn.state_dict(), "scratch", LSTM))
    X = torch.randint(0, 10, (3, 6))
    assert_close(scratch(X)[0], cudnn(X)[0], 1e-12, "logits")


def test_convert_to_the_same_core_copies() -> None:
    scratch, _ = make_pair(10, 8, 1, 0, torch.float32)
    state = scratch.state_dict()
    same = convert(state, "scratch", LSTM)
    assert same is not state and same.keys() == state.keys()


def test_foreign_weights_are_refused() -> None:
    with pytest.raises(CheckpointError, match=r"neither a scratch nor a torch core"):
        convert({"W_hq": torch.zeros(2, 2)}, "cudnn", LSTM)


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
@pytest.mark.parametrize(
    ("X", "state", "message"),
    [
        (torch.zeros(2, 5), None, "X must be (batch, steps) integer ids, got (2, 5) torch.float32"),
        (torch.zeros(2, 5, dtype=torch.bool), None, "X must be (batch, steps) integer ids, got (2, 5) torch.bool"),
        (torch.zeros(5, dtype=torch.long), None, "X must be (batch, steps) integer ids, got (5,) torch.int64"),
        (torch.zeros(2, 5, 10, dtype=torch.long), None, "X must be (batch, steps) integer ids, got (2, 5, 10) torch.int64"),
        (torch.full((2, 5), 10), None, "ids must lie in [0, 10), got [10, 10]"),
        (torch.tensor([[0, -3, 9]]), None, "ids must lie in [0, 10), got [-3, 9]"),
        (
            torch.zeros(2, 5, dtype=torch.long),
            (torch.zeros(1, 2, 8), torch.zeros(1, 2, 8)),
            "state H must be (2, 2, 8) (layers, batch, hiddens), got (1, 2, 8)",
        ),
        (
            torch.zeros(2, 5, dtype=torch.long),
            (torch.zeros(2, 2, 8), torch.zeros(2, 5, 8)),
            "state C must be (2, 2, 8) (layers, batch, hiddens), got (2, 5, 8)",
        ),
        # an empty batch killed the process on the compiled path (SIGFPE); no steps was an IndexError or RuntimeError
        (torch.zeros(0, 5, dtype=torch.long), None, "X must have at least one row and one step, got (0, 5)"),
        (torch.zeros(2, 0, dtype=torch.long), None, "X must have at least one row and one step, got (2, 0)"),
    ],
    ids=["float-ids", "bool", "1d", "3d", "id-too-big", "id-negative", "H-layers", "C-batch-is-steps", "no-rows", "no-steps"],
)
def test_bad_input_is_refused(core: str, X: torch.Tensor, state, message: str) -> None:
    scratch, cudnn = make_pair(10, 8, 2, 0, torch.float32)
    model = scratch if core == "scratch" else cudnn
    with pytest.raises(ShapeError, match=f"^{re.escape(message)}$"):
        model(X, state)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"core": "lstm"}, "unknown core 'lstm' (expected scratch or cudnn)"),
        ({"cell": "transformer"}, "unknown cell 'transformer' (choose from lstm, gru, rnn)"),
        ({"path": "fast"}, "unknown recurrence path 'fast' (expected auto, loop, fused, compiled or graph)"),  # was run on another path, silently
    ],
)
def test_a_model_asked_for_by_a_name_that_does_not_exist_is_refused_by_name(options: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        CharLM(10, 8, **options)  # type: ignore[arg-type]
    if "cell" in options:
        with pytest.raises(ConfigError, match=re.escape(message)):
            cells.get(options["cell"])
    with pytest.raises(ConfigError, match=re.escape("unknown GRU form 'book' (choose from cudnn, d2l)")):
        cells.get("gru", "book")


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        ((0, 8), {}, "a model needs a vocabulary, hidden units and layers: vocab 0, hidden 8, layers 1"),
        ((10, 0), {}, "a model needs a vocabulary, hidden units and layers: vocab 10, hidden 0, layers 1"),
        ((10, 8, 0), {}, "a model needs a vocabulary, hidden units and layers: vocab 10, hidden 8, layers 0"),
        ((10, 8), {"dropout": 2.0}, "the input dropout rate must lie in [0, 1), not 2.0"),  # was torch's ValueError at the first step
    ],
)
def test_a_model_of_nothing_or_a_rate_past_one_is_refused_when_made(args: tuple[int, ...], options: dict[str, float], message: str) -> None:
    """torch built them: a model of no units, or one that failed at its first step in training."""
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        CharLM(*args, **options)  # type: ignore[arg-type]
    with pytest.raises(ShapeError, match="a state's batch must not be negative, not -1"):
        CharLM(10, 8).begin_state(-1)


def test_cudnn_core_runs_under_cpu_bf16_autocast() -> None:
    # oneDNN's LSTM refuses autocast's mixed dtypes on the CPU (and CUDA's autocast would cast
    # cuDNN's RNN to fp16); the core runs on bf16 copies instead, with autocast off: bf16 is what
    # reaches nn.LSTM, the loss stays within bf16 rounding of fp32, the state and gradients are fp32.
    torch.manual_seed(0)
    model = CharLM(10, 16, 2, core="cudnn")
    X, Y = torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (3, 5))
    reached: list[tuple[torch.dtype, ...]] = []
    hook = model.core.lstm.register_forward_pre_hook(
        lambda module, args: reached.append((args[0].dtype, args[1][0].dtype, module.weight_hh_l1.dtype, torch.is_autocast_enabled("cpu")))
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, (H, C) = model(X)
        loss = loss_fn(logits, Y)
    hook.remove()
    assert reached == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, False)]
    loss.backward()
    assert H.dtype == C.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(model(X)[0], Y).item(), rel=1e-2)
    grads = [p.grad for p in model.core.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("layers", [1, 2])
def test_dropout_acts_on_the_non_recurrent_connections_and_only_in_training(layers: int) -> None:
    """Dropout on the embedding's output and the top layer's output (and between layers): in
    training mode a 1-layer model's logits change with the mask; both cores, given the same
    weights and the same seed, draw the same masks; eval mode is deterministic."""
    torch.manual_seed(0)
    net = CharLM(12, 16, num_layers=layers, dropout=0.5, embedding=6)
    twin = CharLM(12, 16, num_layers=layers, dropout=0.5, embedding=6, core="cudnn")
    twin.load_state_dict(convert(net.state_dict(), "cudnn", LSTM))
    X = torch.randint(12, (3, 9))
    torch.manual_seed(1)
    a, _ = net(X)
    torch.manual_seed(1)
    b, _ = twin(X)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c, _ = net(X)  # another mask
    assert not torch.allclose(a, c)
    net.eval()
    d, _ = net(X)
    e, _ = net(X)
    assert torch.equal(d, e) and not torch.allclose(a, d)
    # the output layer sees dropped units: with no embedding and one layer (no between-layers
    # dropout), training-mode logits still differ from eval-mode ones
    plain = CharLM(12, 16, dropout=0.5)
    assert not torch.allclose(plain(X)[0], plain.eval()(X)[0])


# ---- AWD-LSTM's regularization ---------------------------------------------------------------------

AWD = Dropouts(input=0.3, hidden=0.25, output=0.4, weight=0.5, embedding=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("locked", [False, True], ids=["per-element", "locked"])
def test_the_models_agree_in_training_with_every_regularization(dtype: torch.dtype, num_layers: int, locked: bool) -> None:
    """Embedding dropout, dropout at each place (per element or locked) and DropConnect: the same
    seed draws the same masks in both cores, so logits, state and every gradient agree."""
    vocab_size, batch, steps = 12, 3, 7
    scratch, cudnn = make_pair(vocab_size, 8, num_layers, 6, dtype, dataclasses.replace(AWD, locked=locked))
    X, Y = torch.randint(0, vocab_size, (batch, steps)), torch.randint(0, vocab_size, (batch, steps))
    torch.manual_seed(4)
    expected = forward_backward(cudnn, X, Y, None)
    torch.manual_seed(4)
    actual = forward_backward(scratch, X, Y, None)
    tol = TOL[dtype]
    for a, e, name in zip(actual, expected, ["logits", "H", "C"]):
        assert_close(a, e, tol, name)
    mapped = convert({name: p.grad for name, p in scratch.named_parameters()}, "cudnn", LSTM)
    for name, p in cudnn.named_parameters():
        assert_close(p.grad, mapped[name.replace("bias_hh", "bias_ih")], tol, f"d{name}")
    assert not torch.allclose(actual[0], scratch.eval()(X)[0])  # the regularization does act


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_evaluation_ignores_every_regularization(core: str) -> None:
    """model.eval(): the same function as the model without regularization, on the same
    parameters (the regularization adds none), and no random number drawn."""
    torch.manual_seed(0)
    regularized = CharLM(12, 8, 2, dataclasses.replace(AWD, locked=True), core=core, embedding=6)
    plain = CharLM(12, 8, 2, core=core, embedding=6)
    plain.load_state_dict(regularized.state_dict())  # strict: the same parameters, by name and shape
    X = torch.randint(0, 12, (3, 7))
    rng = torch.get_rng_state()
    assert torch.equal(regularized.eval()(X)[0], plain.eval()(X)[0])
    assert torch.equal(torch.get_rng_state(), rng)


def test_embedding_dropout_drops_whole_rows() -> None:
    """A dropped character is dropped at every position of the batch (its row of E is zero),
    a kept one scaled by 1/(1 - p) everywhere; a new draw the next batch; none in evaluation."""
    torch.manual_seed(0)
    model = CharLM(12, 8, embedding=5, dropout=Dropouts(embedding=0.5))
    seen: list[torch.Tensor] = []
    model.core.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    X = torch.arange(12).repeat(2, 3)  # (2, 36): every character 6 times
    model(X)
    model(X)
    E = model.embedding.weight.detach()
    fates = []
    for inputs in seen:  # (steps, batch, embedding)
        ids = X.T
        kept = inputs.abs().sum(-1) > 0  # (steps, batch)
        for c in range(12):
            assert kept[ids == c].all() or not kept[ids == c].any(), f"character {c} is dropped in some places only"
        assert_close(inputs[kept], 2 * E[ids[kept]], 1e-6, "kept rows")
        fates.append([bool(kept[ids == c][0]) for c in range(12)])
    assert 0 < sum(fates[0]) < 12 and fates[0] != fates[1]
    model.eval()(X)
    assert torch.equal(seen[-1], E[X.T])


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_locked_dropout_keeps_one_mask_over_the_steps_of_a_sequence(core: str) -> None:
    """The output layer reads H_t ⊙ m for one m per sequence (batch, hiddens), the same at every step."""
    torch.manual_seed(0)
    model = CharLM(12, 16, core=core, dropout=Dropouts(output=0.5, locked=True))
    _, _, top = model(torch.randint(0, 12, (4, 20)), top=True)
    assert isinstance(top, TopLayer)
    H, H_dropped = top.H.detach(), top.H_dropped.detach()  # (steps, batch, hiddens)
    kept = H_dropped != 0
    assert torch.equal(kept, kept[:1].expand_as(kept)) and 0 < kept[0].sum() < kept[0].numel()
    assert_close(H_dropped[kept], 2 * H[kept], 1e-6, "kept units")


def test_the_config_gives_each_place_its_rate() -> None:
    """-1 (the default) at a place is `dropout`'s rate; a rate given is that place's own."""
    base = Config().with_overrides({"dropout": 0.3, "layers": 2, "embedding": 4}).model
    assert Dropouts.of(base) == Dropouts(0.3, 0.3, 0.3)
    awd = dataclasses.replace(base, dropout_input=0.6, dropout_output=0.0, locked_dropout=True, weight_drop=0.5, embedding_dropout=0.1)
    assert Dropouts.of(awd) == Dropouts(input=0.6, hidden=0.3, output=0.0, locked=True, weight=0.5, embedding=0.1)
    model = CharLM.from_config(awd, 12)
    assert (model.core.dropout, model.core.locked, model.core.weight_drop) == (0.3, True, 0.5)


def test_activation_penalty_is_ar_on_the_dropped_outputs_plus_tar_on_the_steps() -> None:
    H = torch.tensor([[[1.0, 2.0]], [[3.0, 2.0]], [[3.0, 0.0]]])  # (steps 3, batch 1, hiddens 2)
    H_dropped = torch.tensor([[[2.0, 0.0]], [[0.0, 4.0]], [[6.0, 0.0]]])
    top = TopLayer(H, H_dropped)
    assert activation_penalty(top, 2.0, 0.0).item() == pytest.approx(2.0 * (4 + 16 + 36) / 6)  # α · mean(H̃²)
    assert activation_penalty(top, 0.0, 3.0).item() == pytest.approx(3.0 * (4 + 0 + 0 + 4) / 4)  # β · mean((H_t - H_{t-1})²)
    assert activation_penalty(top, 2.0, 3.0).item() == pytest.approx(2.0 * 56 / 6 + 3.0 * 2)
    assert activation_penalty(TopLayer(H[:1], H_dropped[:1]), 0.0, 3.0).item() == 0.0  # one step: no pair


# ---- the packed layout -----------------------------------------------------------------------------


def test_the_twelve_named_parameters_are_views_of_the_packed_three() -> None:
    """W_xi … b_c read and write the packed W_x, W_h, b (gates side by side as nn.LSTM's i, f, g, o)."""
    model = CharLM(10, 6, 2, core="scratch")
    layer = model.core.layers[1]
    assert [name for name, _ in layer.named_parameters()] == ["W_x", "W_h", "b"]
    assert layer.W_xi.shape == (6, 6) and layer.W_hc.shape == (6, 6) and layer.b_o.shape == (6,)
    with torch.no_grad():
        layer.W_hf.fill_(7.0)  # through the view
    assert torch.equal(layer.W_h[:, 6:12], torch.full((6, 6), 7.0)) and (layer.W_h[:, :6] != 7.0).all()
    assert torch.equal(layer.views()["b_c"], layer.b[12:18])


def test_the_seeds_init_draws_the_weights_the_twelve_tensor_layout_drew() -> None:
    """Matrix by matrix in the article's order (W_xi, W_hi, W_xf, W_hf, W_xo, W_ho, W_xc, W_hc), N(0, 0.01²)."""
    torch.manual_seed(3)
    layer = CharLM(10, 6, 1, core="scratch").core.layers[0]
    torch.manual_seed(3)
    expected = {}
    for g in "ifoc":
        expected[f"W_x{g}"] = torch.empty(10, 6).normal_(0.0, 0.01)
        expected[f"W_h{g}"] = torch.empty(6, 6).normal_(0.0, 0.01)
    for name, value in expected.items():
        assert torch.equal(layer.views()[name], value), name
    assert not layer.b.any()


@pytest.mark.parametrize("core", ["scratch", "cudnn"])
def test_a_checkpoint_of_the_first_release_loads(core: str) -> None:
    """The first release saved each scratch layer as the article's twelve tensors: the checkpoint's
    migration packs them, and they convert to nn.LSTM as well, giving the same function."""
    torch.manual_seed(0)
    packed = CharLM(10, 6, 2, core="scratch", embedding=4)
    with torch.no_grad():
        for p in packed.parameters():
            p.normal_(0.0, 0.5)
    old = {k: v for k, v in packed.state_dict().items() if not k.startswith("core.")}
    for k in range(2):
        old.update({f"core.layers.{k}.{name}": v.clone() for name, v in scratch_layer(packed.state_dict(), k, LSTM).items()})
    assert "core.layers.0.W_xi" in old and "core.layers.0.W_x" not in old
    migrated = migrate({"format": "lstmlm-checkpoint", "version": 1, "model": old})["model"]
    model = CharLM(10, 6, 2, core=core, embedding=4)
    model.load_state_dict(convert(migrated, core, LSTM))
    X = torch.randint(0, 10, (3, 7))
    torch.testing.assert_close(model.eval()(X)[0], packed.eval()(X)[0], rtol=1e-5, atol=1e-6)


def test_tf32_is_decided_explicitly_and_only_on_cuda() -> None:
    from lstmlm.device import set_tf32

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert set_tf32(torch.device("cpu"), True) is False  # no TF32 off CUDA, and nothing changed
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_the_first_releases_adam_state_is_packed_as_its_weights_are() -> None:
    """Adam's moments are laid out as the weights: migrated from the twelve-tensor layout, they
    are the packed model's own, each at its parameter's index."""
    torch.manual_seed(0)
    model = CharLM(10, 6, 2, core="scratch", embedding=4)
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randint(0, 10, (3, 7)))[0].sum().backward()
    adam.step()
    names = list(model.state_dict())
    saved = adam.state_dict()

    def twelve(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        old = {k: v for k, v in packed.items() if not k.startswith("core.")}
        for k in range(2):
            old.update({f"core.layers.{k}.{name}": v.clone() for name, v in scratch_layer(packed, k, LSTM).items()})
        return old

    old_weights = twelve(model.state_dict())
    moments = {key: twelve({n: saved["state"][i][key] for i, n in enumerate(names)}) for key in ("exp_avg", "exp_avg_sq")}
    old_state = {i: {"step": saved["state"][0]["step"], **{key: m[n] for key, m in moments.items()}} for i, n in enumerate(old_weights)}
    groups = [{**saved["param_groups"][0], "params": list(range(len(old_weights)))}]
    payload = {"version": 1, "model": old_weights, "trainer": {"optimizer": {"state": old_state, "param_groups": groups}, "state": {}}}
    migrated = migrate(payload)["trainer"]["optimizer"]
    assert migrated["param_groups"][0]["params"] == list(range(len(names)))
    for i in range(len(names)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(migrated["state"][i][key], saved["state"][i][key]), (names[i], key)
    fresh = torch.optim.Adam(model.parameters(), lr=0.01)
    fresh.load_state_dict(migrated)  # and it loads into today's optimizer
