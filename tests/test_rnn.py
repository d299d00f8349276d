"""The plain RNN is the book's: its scratch model draws the book's parameters and computes the
book's `rnn`, and nn.RNN computes it too (tests/test_cells.py checks every path against nn.RNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lstmlm import cells
from lstmlm.cells.cores import TorchCore
from lstmlm.model import CharLM, convert

from support.references import assert_close


def book_rnn(inputs: torch.Tensor, state: tuple[torch.Tensor], params: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """d2l's RNN from scratch (chapter 8.5), as the book writes it."""
    W_xh, W_hh, b_h, W_hq, b_q = params
    (H,) = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.mm(X, W_xh) + torch.mm(H, W_hh) + b_h)
        Y = torch.mm(H, W_hq) + b_q
        outputs.append(Y)
    return torch.cat(outputs, dim=0), (H,)


def book_rnn_params(vocab_size: int, num_hiddens: int) -> list[torch.Tensor]:
    def normal(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(size=shape) * 0.01

    W_xh, W_hh, b_h = normal((vocab_size, num_hiddens)), normal((num_hiddens, num_hiddens)), torch.zeros(num_hiddens)
    return [W_xh, W_hh, b_h, normal((num_hiddens, vocab_size)), torch.zeros(vocab_size)]


def test_the_rnn_is_the_books_code() -> None:
    vocab_size, hiddens = 28, 32
    torch.manual_seed(2)
    params = book_rnn_params(vocab_size, hiddens)
    torch.manual_seed(2)
    model = CharLM(vocab_size, hiddens, cell="rnn", path="loop")
    layer = model.core.scratch_layers()[0]  # type: ignore[union-attr]
    for name, value in zip(["W_xh", "W_hh", "b_h"], params):
        assert torch.equal(getattr(layer, name), value), name
    assert torch.equal(model.W_hq, params[3])
    with torch.no_grad():
        for p in params[:3]:
            p.normal_(0.0, 0.4)  # lively, so the test has teeth
        for name, value in zip(["W_x", "W_h", "b"], params):
            getattr(layer, name).copy_(value)
    X = torch.randint(0, vocab_size, (3, 11))
    H_0 = torch.randn(3, hiddens) * 0.3
    expected, (H,) = book_rnn(F.one_hot(X.T, vocab_size).float(), (H_0,), params)
    with torch.no_grad():
        logits, (H_T,) = model(X, (H_0[None],))
    assert_close(logits.transpose(0, 1).reshape(-1, vocab_size), expected, 1e-6, "the book's outputs")
    assert_close(H_T[0], H, 1e-6, "the book's H")


def test_nn_rnn_computes_the_scratch_rnn() -> None:
    torch.manual_seed(0)
    scratch = CharLM(10, 16, num_layers=2, cell="rnn", path="loop").eval()
    with torch.no_grad():
        for p in scratch.parameters():
            p.normal_(0.0, 0.5)
    torch_model = CharLM(10, 16, num_layers=2, core="cudnn", cell="rnn").eval()
    torch_model.load_state_dict(convert(scratch.state_dict(), "cudnn", cells.get("rnn")))
    assert isinstance(torch_model.core, TorchCore) and isinstance(torch_model.core.module, torch.nn.RNN)
    assert torch_model.core.module.nonlinearity == "tanh"
    X = torch.randint(0, 10, (4, 9))
    with torch.no_grad():
        assert_close(torch_model(X)[0], scratch(X)[0], 1e-6, "logits")
