"""What lstmlm's results are held to: d2l's own prediction loop (`predict_ch8`, the seed's
semantics) and one tolerance rule for comparing tensors (`assert_close`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from lstmlm.model import CharLM
    from lstmlm.vocab import Vocab


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """|actual - expected| ≤ tol · max(1, max|expected|): absolute for values of order one,
    relative for large gradients."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert diff <= tol * scale, f"{what}: max difference {diff:.3g} > {tol:.0e} × {scale:.3g}"


def predict_ch8(prefix: str, num_preds: int, net: CharLM, vocab: Vocab) -> str:
    """d2l's predict_ch8: warm up on the prefix one character at a time, then feed back the argmax."""
    import torch

    state = net.begin_state(batch_size=1)
    outputs = [vocab.index[prefix[0]]]
    get_input = lambda: torch.tensor([outputs[-1]]).reshape((1, 1))  # noqa: E731
    for y in prefix[1:]:  # warm-up period
        _, state = net(get_input(), state)
        outputs.append(vocab.index[y])
    for _ in range(num_preds):  # predict num_preds steps
        y, state = net(get_input(), state)  # y: (1, 1, vocab) here; d2l's is (1, vocab)
        outputs.append(int(y.reshape(1, -1).argmax(dim=1).reshape(1)))
    return "".join(vocab.tokens[i] for i in outputs)
