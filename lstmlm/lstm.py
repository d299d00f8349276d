"""The two recurrent cores: the article's from-scratch LSTM and torch's nn.LSTM, one interface.

Both take `X` — (steps, batch) int64 ids, read as one-hot vectors, or (steps, batch, inputs)
floats — and an optional state `(H, C)`, each (layers, batch, hiddens), and return every step's
top-layer H as (steps, batch, hiddens) and the final `(H, C)`.

The scratch core keeps the article's parameters and names, stored (inputs, hiddens) so the code
reads like the equations:

    I_t = σ(X_t W_xi + H_{t-1} W_hi + b_i)        input gate
    F_t = σ(X_t W_xf + H_{t-1} W_hf + b_f)        forget gate
    O_t = σ(X_t W_xo + H_{t-1} W_ho + b_o)        output gate
    C̃_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)     candidate memory cell
    C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t
    H_t = O_t ⊙ tanh(C_t)

For one-hot X_t, X_t W_x is the row of W_x at the character's id: a gather, never a product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ShapeError

State = tuple[torch.Tensor, torch.Tensor]  # (H, C), each (layers, batch, hiddens)

GATES = ("i", "f", "o", "c")  # the article's order; nn.LSTM packs i, f, g(=c), o


def project(X: torch.Tensor, W_x: torch.Tensor) -> torch.Tensor:
    """X W_x for dense X, or the rows of W_x at the ids for one-hot X."""
    return W_x[X] if not X.is_floating_point() else X @ W_x


class ScratchLSTMLayer(nn.Module):
    """One layer of the article's LSTM: four gates, each with W_x*, W_h*, b_*."""

    def __init__(self, num_inputs: int, num_hiddens: int) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens = num_inputs, num_hiddens
        for g in GATES:
            self.register_parameter(f"W_x{g}", nn.Parameter(torch.empty(num_inputs, num_hiddens)))
            self.register_parameter(f"W_h{g}", nn.Parameter(torch.empty(num_hiddens, num_hiddens)))
            self.register_parameter(f"b_{g}", nn.Parameter(torch.empty(num_hiddens)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The seed's init: weights N(0, 0.01²), biases 0."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                p.normal_(0.0, 0.01) if name.startswith("W_") else p.zero_()

    def forward(self, X: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The article's loop, one gate at a time: the readable reference."""
        outputs = []
        for X_t in X:  # X_t: (batch,) ids or (batch, inputs)
            I = torch.sigmoid(project(X_t, self.W_xi) + H @ self.W_hi + self.b_i)  # (batch, hiddens)
            F_ = torch.sigmoid(project(X_t, self.W_xf) + H @ self.W_hf + self.b_f)
            O = torch.sigmoid(project(X_t, self.W_xo) + H @ self.W_ho + self.b_o)
            C_tilde = torch.tanh(project(X_t, self.W_xc) + H @ self.W_hc + self.b_c)
            C = F_ * C + I * C_tilde
            H = O * torch.tanh(C)
            outputs.append(H)
        return torch.stack(outputs), H, C  # (steps, batch, hiddens)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four gates side by side, in the article's order i, f, o, c:
        W_x (inputs, 4·hiddens), W_h (hiddens, 4·hiddens), b (4·hiddens)."""
        W_x = torch.cat([self.W_xi, self.W_xf, self.W_xo, self.W_xc], dim=1)
        W_h = torch.cat([self.W_hi, self.W_hf, self.W_ho, self.W_hc], dim=1)
        b = torch.cat([self.b_i, self.b_f, self.b_o, self.b_c])
        return W_x, W_h, b


def fused_layer(
    X: torch.Tensor, H: torch.Tensor, C: torch.Tensor, W_x: torch.Tensor, W_h: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same equations with the gates stacked: the input projection of every step at once,
    then one (hiddens × 4·hiddens) product per step."""
    XW = project(X, W_x) + b  # (steps, batch, 4·hiddens), all steps in one gather or product
    outputs = []
    for XW_t in XW:
        gates = XW_t + H @ W_h  # (batch, 4·hiddens)
        IFO, C_tilde = gates.split([3 * H.shape[-1], H.shape[-1]], dim=1)
        I, F_, O = torch.sigmoid(IFO).chunk(3, dim=1)
        C = F_ * C + I * torch.tanh(C_tilde)
        H = O * torch.tanh(C)
        outputs.append(H)
    return torch.stack(outputs), H, C


class ScratchLSTM(nn.Module):
    """The article's LSTM, stacked `num_layers` deep with dropout between layers (as nn.LSTM).

    `fused=False` runs the literal per-gate loop; `fused=True` (the default) the stacked form.
    Both compute the same function on the same parameters.
    """

    def __init__(self, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0, fused: bool = True) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.dropout, self.fused = dropout, fused
        self.layers = nn.ModuleList(
            ScratchLSTMLayer(num_inputs if k == 0 else num_hiddens, num_hiddens) for k in range(num_layers)
        )

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        H0, C0 = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, self.layers[0].W_xi)
        Hs, Cs = [], []
        for k, layer in enumerate(self.layers):
            if k > 0 and self.dropout > 0 and self.training:
                X = F.dropout(X, self.dropout, training=True)
            if self.fused:
                X, H, C = fused_layer(X, H0[k], C0[k], *layer.stacked())
            else:
                X, H, C = layer(X, H0[k], C0[k])
            Hs.append(H)
            Cs.append(C)
        return X, (torch.stack(Hs), torch.stack(Cs))


class CudnnLSTM(nn.Module):
    """torch.nn.LSTM (cuDNN on a GPU, oneDNN on a CPU) behind the scratch core's interface."""

    def __init__(self, num_inputs: int, num_hiddens: int, num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_inputs, self.num_hiddens, self.num_layers = num_inputs, num_hiddens, num_layers
        self.lstm = nn.LSTM(num_inputs, num_hiddens, num_layers, dropout=dropout if num_layers > 1 else 0.0)

    def forward(self, X: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        state = check_input(X, state, self.num_inputs, self.num_hiddens, self.num_layers, self.lstm.weight_ih_l0)
        if not X.is_floating_point():  # nn.LSTM multiplies its input: one-hot it (cheap at char vocab sizes)
            X = F.one_hot(X.long(), self.num_inputs).to(self.lstm.weight_ih_l0.dtype)
        outputs, (H, C) = self.lstm(X, state)
        return outputs, (H, C)


def zero_state(num_layers: int, batch_size: int, num_hiddens: int, like: torch.Tensor) -> State:
    shape = (num_layers, batch_size, num_hiddens)
    return torch.zeros(shape, dtype=like.dtype, device=like.device), torch.zeros(shape, dtype=like.dtype, device=like.device)


def check_input(
    X: torch.Tensor, state: State | None, num_inputs: int, num_hiddens: int, num_layers: int, weight: torch.Tensor
) -> State:
    """Refuse what would otherwise broadcast silently or fail deep inside a kernel; return the state."""
    if X.is_floating_point():
        if X.dim() != 3 or X.shape[2] != num_inputs:
            raise ShapeError(f"dense input must be (steps, batch, {num_inputs}), got {tuple(X.shape)}")
    elif X.dtype in (torch.int64, torch.int32):
        if X.dim() != 2:
            raise ShapeError(f"id input must be (steps, batch), got {tuple(X.shape)}")
        if X.device.type == "cpu" and X.numel() and (int(X.min()) < 0 or int(X.max()) >= num_inputs):
            raise ShapeError(f"ids must lie in [0, {num_inputs}), got [{int(X.min())}, {int(X.max())}]")
    else:
        raise ShapeError(f"input must be int64 or int32 ids or floating point, got {X.dtype}")
    batch_size = X.shape[1]
    if state is None:
        return zero_state(num_layers, batch_size, num_hiddens, weight)
    if not isinstance(state, tuple) or len(state) != 2:
        raise ShapeError("state must be a tuple (H, C)")
    expected = (num_layers, batch_size, num_hiddens)
    for name, S in zip("HC", state):
        if tuple(S.shape) != expected:
            raise ShapeError(f"state {name} must be {expected} (layers, batch, hiddens), got {tuple(S.shape)}")
        if not S.is_floating_point():
            raise ShapeError(f"state {name} must be floating point, got {S.dtype}")
    return state
