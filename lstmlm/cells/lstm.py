"""The article's LSTM: its equations, its layout, its compiled elementwise part.

    I_t = σ(X_t W_xi + H_{t-1} W_hi + b_i)        input gate
    F_t = σ(X_t W_xf + H_{t-1} W_hf + b_f)        forget gate
    O_t = σ(X_t W_xo + H_{t-1} W_ho + b_o)        output gate
    C̃_t = tanh(X_t W_xc + H_{t-1} W_hc + b_c)     candidate memory cell
    C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t
    H_t = O_t ⊙ tanh(C_t)

The packed blocks follow nn.LSTM: i, f, g (= c̃), o. nn.LSTM computes the same function (its
two biases add up to b). The fast paths double the candidate's rows, so that one sigmoid covers
all four gates of a step, the candidate through tanh(x) = 2σ(2x) - 1: on a CPU a sigmoid costs a
sixth of a tanh, and one operation over a step's whole gates costs less than three. So the
kernels keep S = σ(2·c̃'s pre-activation) and C̃ = 2S - 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .base import Cell, Gate, Stacked, State, sigmoid_gate, tanh_gate


def fused_path(layer: Any, X: torch.Tensor, state: State, dtype: torch.dtype, W_h: torch.Tensor) -> tuple[torch.Tensor, State]:
    """The LSTM's Python fast path (`fused.py`), imported when first run."""
    from ..fused import run_layer

    return run_layer(layer, X, state, dtype, W_h)


class Step(NamedTuple):
    """Every quantity of one step of the equations."""

    I: torch.Tensor
    F: torch.Tensor
    O: torch.Tensor
    C_tilde: torch.Tensor
    C: torch.Tensor
    H: torch.Tensor


class LSTM(Cell):
    name = "lstm"
    title = "LSTM"
    torch_module = nn.LSTM
    blocks = ("i", "f", "c", "o")
    init_order = ("i", "f", "o", "c")  # the article draws W_xi, W_hi, b_i, then f, o, c
    state = ("H", "C")
    gates = (
        sigmoid_gate("input", "I", "input gate"),
        sigmoid_gate("forget", "F", "forget gate"),
        sigmoid_gate("output", "O", "output gate"),
        tanh_gate("candidate", "C_tilde", "candidate memory cell C̃"),
        tanh_gate("hidden", "H", "hidden state"),
        Gate("cell", "C", None, None, "memory cell"),  # unbounded; the page shows tanh(C), what the output gate reads
    )
    default_gate = "cell"

    def __init__(self) -> None:
        self.fused = fused_path

    def step(self, XW: Mapping[str, torch.Tensor], state: State, p: Mapping[str, torch.Tensor]) -> Step:
        H, C = state
        I = torch.sigmoid(XW["i"] + H @ p["W_hi"] + p["b_i"])  # (batch, hiddens)
        F = torch.sigmoid(XW["f"] + H @ p["W_hf"] + p["b_f"])
        O = torch.sigmoid(XW["o"] + H @ p["W_ho"] + p["b_o"])
        C_tilde = torch.tanh(XW["c"] + H @ p["W_hc"] + p["b_c"])
        C = F * C + I * C_tilde
        H = O * torch.tanh(C)
        return Step(I, F, O, C_tilde, C, H)

    def rows(self, recurrent: torch.Tensor, inputs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        I, F, S_, O = (recurrent + inputs).float().sigmoid_().chunk(4, dim=1)  # the candidate doubled: C̃ = 2 S_ - 1
        C = S.mul_(F).addcmul_(I, S_, value=2).sub_(I)  # C_t = F_t ⊙ C_{t-1} + I_t ⊙ C̃_t, in place
        return O * torch.tanh(C)

    def prepared(self, weights: Stacked) -> Stacked:
        """The candidate's rows doubled (exact), as the kernels' one sigmoid for four gates wants."""
        c = self.block("c", weights.W_hT.shape[1])
        for M in (weights.W_hT, weights.W_xT, weights.b, weights.table):
            if M is not None:
                M[c] *= 2
        return weights

    kernel = r"""
// C_t = F_t ⊙ C_{t-1} + I_t ⊙ (2 S_t - 1), H_t = O_t ⊙ tanh(C_t); S carries C. `saved` keeps I, F,
// S, O and tanh(C_t) a step.
struct LstmCell {
  static constexpr int64_t kBlocks = 4, kSaved = 5;
  static constexpr bool kSumsInput = true, kSplitGrad = false;

  // σ of every block's pre-activations (a gather and a sigmoid in one loop vectorize poorly
  // together: two passes), then the cell.
  template <typename P>
  static void forward(const lstmlm::Forward<P>& f) {
    const int64_t B = f.batch, n = f.hiddens * B, m = f.u.size() * B, at = f.u.u0 * B;
    for (int64_t g = 0; g < 4; ++g) {
      float* __restrict out = f.saved + g * n + at;
      for (int64_t r = 0; r < f.u.size(); ++r) f.x.row(g, r, out + r * B, f.recurrent + g * m + r * B);
      for (int64_t k = 0; k < m; ++k) out[k] = lstmlm::sigmoid_(out[k]);
    }
    const float *__restrict I = f.saved + at, *__restrict F = I + n, *__restrict S = F + n, *__restrict O = S + n;
    const float* __restrict C_prev = f.S_prev + at;
    float *__restrict C = f.S + at, *__restrict tanh_C = f.saved + 4 * n + at;
    P* __restrict H = f.H + at;
    LSTMLM_INDEPENDENT
    for (int64_t k = 0; k < m; ++k) {
      const float c = F[k] * C_prev[k] + I[k] * (2.0f * S[k] - 1.0f);
      const float tc = lstmlm::tanh_(c);
      C[k] = c;
      tanh_C[k] = tc;
      H[k] = lstmlm::from_float<P>(O[k] * tc);
    }
  }

  // dL/dH_t from above and from step t+1 (`product`); dL/dC_t from C_{t+1} in `carry` (dL/dC_{t+1}
  // ⊙ F_{t+1}; at the last step, dL/dC_T), left there for step t-1 as dL/dC_t ⊙ F_t. σ' = σ (1 - σ)
  // in terms of the gate's value, and 1 - C̃² = 4 S (1 - S).
  template <typename P, bool last>
  static void backward(const lstmlm::Backward<P>& s) {
    constexpr bool mixed = !std::is_same_v<P, float>;
    const int64_t B = s.batch, n = s.hiddens * B, block = s.hiddens * s.steps * B;
    const float *__restrict I = s.saved, *__restrict F = I + n, *__restrict S = F + n, *__restrict O = S + n, *__restrict TC = O + n;
    for (int64_t j = s.u.u0; j < s.u.u1; ++j) {
      const int64_t row = j * B, at = j * s.steps * B + s.t * B;  // (j, ·) in a step's arrays; (j, t, ·) in dAx
      const P* __restrict prod = last ? nullptr : s.product + (j - s.u.u0) * B;
      float *__restrict d_i = s.dAx + at, *__restrict d_f = d_i + block, *__restrict d_c = d_f + block, *__restrict d_o = d_c + block;
      P *__restrict c_i = s.dAx_c + at, *__restrict c_f = c_i + block, *__restrict c_c = c_f + block, *__restrict c_o = c_c + block;
      P *__restrict n_i = s.next + row, *__restrict n_f = n_i + n, *__restrict n_c = n_f + n, *__restrict n_o = n_c + n;
      LSTMLM_INDEPENDENT
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k = row + b;
        float dH = s.dH_out[k];
        if constexpr (!last) dH += lstmlm::to_float(prod[b]);
        const float i = I[k], f = F[k], sv = S[k], o = O[k], tc = TC[k];
        const float dc = s.carry[k] + dH * o * (1.0f - tc * tc);  // through C_{t+1}, and through H_t = O_t ⊙ tanh(C_t)
        s.carry[k] = dc * f;
        d_i[b] = dc * (2.0f * sv - 1.0f) * i * (1.0f - i);  // C̃ σ'(i)
        d_f[b] = dc * s.S_prev[k] * f * (1.0f - f);         // C_{t-1} σ'(f)
        d_c[b] = dc * i * 4.0f * sv * (1.0f - sv);          // I (1 - C̃²)
        d_o[b] = dH * tc * o * (1.0f - o);                  // tanh(C_t) σ'(o)
        n_i[b] = lstmlm::from_float<P>(d_i[b]);
        n_f[b] = lstmlm::from_float<P>(d_f[b]);
        n_c[b] = lstmlm::from_float<P>(d_c[b]);
        n_o[b] = lstmlm::from_float<P>(d_o[b]);
        if constexpr (mixed) {
          c_i[b] = n_i[b];
          c_f[b] = n_f[b];
          c_c[b] = n_c[b];
          c_o[b] = n_o[b];
        }
      }
    }
  }

  // Generation, one batch row: gates = σ(recurrent + input) (the candidate doubled), C and H in place.
  template <typename P>
  static void row(const P* __restrict recurrent, const P* __restrict input, float* __restrict C, P* __restrict H, int64_t hiddens) {
    const P *__restrict r_i = recurrent, *__restrict r_f = r_i + hiddens, *__restrict r_s = r_f + hiddens, *__restrict r_o = r_s + hiddens;
    const P *__restrict x_i = input, *__restrict x_f = x_i + hiddens, *__restrict x_s = x_f + hiddens, *__restrict x_o = x_s + hiddens;
    for (int64_t j = 0; j < hiddens; ++j) {
      using lstmlm::sigmoid_, lstmlm::to_float;
      const float i = sigmoid_(to_float(r_i[j]) + to_float(x_i[j])), f = sigmoid_(to_float(r_f[j]) + to_float(x_f[j]));
      const float s = sigmoid_(to_float(r_s[j]) + to_float(x_s[j])), o = sigmoid_(to_float(r_o[j]) + to_float(x_o[j]));
      const float c = f * C[j] + i * (2.0f * s - 1.0f);
      C[j] = c;
      H[j] = lstmlm::from_float<P>(o * lstmlm::tanh_(c));
    }
  }
};
LSTMLM_CELL(lstm, LstmCell)
"""
