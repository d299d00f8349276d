"""The gated recurrent unit (Cho et al. 2014), as the d2l book's GRU section writes it, in two forms.

    R_t = σ(X_t W_xr + H_{t-1} W_hr + b_r)                          reset gate
    Z_t = σ(X_t W_xz + H_{t-1} W_hz + b_z)                          update gate
    H̃_t = tanh(X_t W_xh + b_h + R_t ⊙ (H_{t-1} W_hh + b_hh))        candidate (cudnn: nn.GRU's and cuDNN's)
    H̃_t = tanh(X_t W_xh + (R_t ⊙ H_{t-1}) W_hh + b_h)              candidate (d2l: the book's)
    H_t = Z_t ⊙ H_{t-1} + (1 - Z_t) ⊙ H̃_t

The two forms differ only in where the reset gate sits: after the recurrent product, with a bias
of its own inside (nn.GRU's b_hn), or before it. The cudnn form is the default, and provably
equal to nn.GRU; its product H_{t-1} W_h is one product for all three blocks, which is what lets
it run compiled. The d2l form needs R_t before its product, so it runs the loop, and has no
torch module: it trains with the scratch core only.

The packed blocks follow nn.GRU: r, z, n (= h̃, the candidate).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from ..errors import ConfigError
from . import GRU_FORMS
from .base import Cell, State, sigmoid_gate, tanh_gate

FORMS = GRU_FORMS


class Step(NamedTuple):
    """Every quantity of one step of the equations."""

    R: torch.Tensor
    Z: torch.Tensor
    H_tilde: torch.Tensor
    H: torch.Tensor


class GRU(Cell):
    name = "gru"
    title = "GRU"
    torch_module = nn.GRU
    blocks = ("r", "z", "h")
    init_order = ("z", "r", "h")  # the book draws W_xz, W_hz, b_z, then r, then the candidate's
    state = ("H",)
    gates = (
        sigmoid_gate("reset", "R", "reset gate"),
        sigmoid_gate("update", "Z", "update gate"),
        tanh_gate("candidate", "H_tilde", "candidate hidden state H̃"),
        tanh_gate("hidden", "H", "hidden state"),
    )
    default_gate = "hidden"

    def __init__(self, form: str = "cudnn") -> None:
        if form not in FORMS:
            raise ConfigError(f"unknown GRU form '{form}' (choose from {', '.join(FORMS)})")
        self.form = form
        self.recurrent_bias = form == "cudnn"
        self.torch_equivalent = form == "cudnn"
        self.kernel = KERNEL if form == "cudnn" else None

    @classmethod
    def variant(cls, form: str) -> GRU:
        return cls(form)

    def step(self, XW: Mapping[str, torch.Tensor], state: State, p: Mapping[str, torch.Tensor]) -> Step:
        (H,) = state
        R = torch.sigmoid(XW["r"] + H @ p["W_hr"] + p["b_r"])  # (batch, hiddens)
        Z = torch.sigmoid(XW["z"] + H @ p["W_hz"] + p["b_z"])
        if self.form == "cudnn":
            H_tilde = torch.tanh(XW["h"] + p["b_h"] + R * (H @ p["W_hh"] + p["b_hh"]))
        else:
            H_tilde = torch.tanh(XW["h"] + (R * H) @ p["W_hh"] + p["b_h"])
        H = Z * H + (1 - Z) * H_tilde
        return Step(R, Z, H_tilde, H)

    def rows(self, recurrent: torch.Tensor, inputs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        hiddens = S.shape[1]
        R, Z = (recurrent[:, : 2 * hiddens] + inputs[:, : 2 * hiddens]).float().sigmoid_().chunk(2, dim=1)
        H_tilde = torch.tanh(inputs[:, 2 * hiddens :].float() + R * recurrent[:, 2 * hiddens :].float())  # b_hh is in the recurrent term
        return S.copy_(H_tilde + Z * (S - H_tilde)).clone()


KERNEL = r"""
// The cudnn form. S carries H in fp32; `saved` keeps R, Z, H̃ and G = H_{t-1} W_hh + b_hh a step
// (G: what the reset gate multiplies, which its gradient needs).
struct GruCell {
  static constexpr int64_t kBlocks = 3, kSaved = 4;
  static constexpr bool kSumsInput = false, kSplitGrad = true;  // the candidate reads its two terms apart

  template <typename P>
  static void forward(const lstmlm::Forward<P>& f) {
    const int64_t B = f.batch, n = f.hiddens * B, m = f.u.size() * B, at = f.u.u0 * B;
    for (int64_t g = 0; g < 2; ++g) {  // R and Z: σ of the input term plus the recurrent one
      float* __restrict out = f.saved + g * n + at;
      for (int64_t r = 0; r < f.u.size(); ++r) f.x.row(g, r, out + r * B, f.recurrent + g * m + r * B);
      for (int64_t k = 0; k < m; ++k) out[k] = lstmlm::sigmoid_(out[k]);
    }
    float *__restrict N = f.saved + 2 * n + at, *__restrict G = f.saved + 3 * n + at;
    const P* __restrict rec = f.recurrent + 2 * m;
    for (int64_t r = 0; r < f.u.size(); ++r) {
      f.x.row(2, r, N + r * B, static_cast<const P*>(nullptr));  // X_t W_xh + b_h
      const float bias = f.rbias != nullptr ? f.rbias[2 * f.hiddens + f.u.u0 + r] : 0.0f;
      for (int64_t b = 0; b < B; ++b) G[r * B + b] = lstmlm::to_float(rec[r * B + b]) + bias;
    }
    const float *__restrict R = f.saved + at, *__restrict Z = R + n, *__restrict H_prev = f.S_prev + at;
    float* __restrict S = f.S + at;
    P* __restrict H = f.H + at;
    LSTMLM_INDEPENDENT
    for (int64_t k = 0; k < m; ++k) {
      const float c = lstmlm::tanh_(N[k] + R[k] * G[k]);
      const float h = c + Z[k] * (H_prev[k] - c);  // Z ⊙ H_{t-1} + (1 - Z) ⊙ H̃
      N[k] = c;
      S[k] = h;
      H[k] = lstmlm::from_float<P>(h);
    }
  }

  // dL/dH_t: from above, from step t+1's product, and straight from H_{t+1} = Z ⊙ H_t + … in
  // `carry`, which receives dL/dH_t ⊙ Z_t for step t-1. What reaches W_x and b differs from what
  // reaches W_h in the candidate's block: dL/d(its pre-activation), and that times R (and b_hh's).
  template <typename P, bool last>
  static void backward(const lstmlm::Backward<P>& s) {
    constexpr bool mixed = !std::is_same_v<P, float>;
    const int64_t B = s.batch, n = s.hiddens * B, block = s.hiddens * s.steps * B;
    const float *__restrict R = s.saved, *__restrict Z = R + n, *__restrict N = Z + n, *__restrict G = N + n;
    for (int64_t j = s.u.u0; j < s.u.u1; ++j) {
      const int64_t row = j * B, at = j * s.steps * B + s.t * B;
      const P* __restrict prod = last ? nullptr : s.product + (j - s.u.u0) * B;
      float *__restrict x_r = s.dAx + at, *__restrict x_z = x_r + block, *__restrict x_n = x_z + block;
      float *__restrict h_r = s.dAh + at, *__restrict h_z = h_r + block, *__restrict h_n = h_z + block;
      P *__restrict cx_r = s.dAx_c + at, *__restrict cx_z = cx_r + block, *__restrict cx_n = cx_z + block;
      P *__restrict ch_r = s.dAh_c + at, *__restrict ch_z = ch_r + block, *__restrict ch_n = ch_z + block;
      P *__restrict n_r = s.next + row, *__restrict n_z = n_r + n, *__restrict n_n = n_z + n;
      LSTMLM_INDEPENDENT
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k = row + b;
        float dh = s.dH_out[k] + s.carry[k];
        if constexpr (!last) dh += lstmlm::to_float(prod[b]);
        const float r = R[k], z = Z[k], c = N[k], g = G[k];
        s.carry[k] = dh * z;
        const float da_n = dh * (1.0f - z) * (1.0f - c * c);  // through H̃ = tanh(·)
        const float da_r = da_n * g * r * (1.0f - r);
        const float da_z = dh * (s.S_prev[k] - c) * z * (1.0f - z);
        const float dg = da_n * r;  // the recurrent term inside the reset, and b_hh
        x_r[b] = da_r, x_z[b] = da_z, x_n[b] = da_n;
        h_r[b] = da_r, h_z[b] = da_z, h_n[b] = dg;
        n_r[b] = lstmlm::from_float<P>(da_r);
        n_z[b] = lstmlm::from_float<P>(da_z);
        n_n[b] = lstmlm::from_float<P>(dg);
        if constexpr (mixed) {
          cx_r[b] = n_r[b], cx_z[b] = n_z[b], cx_n[b] = lstmlm::from_float<P>(da_n);
          ch_r[b] = n_r[b], ch_z[b] = n_z[b], ch_n[b] = n_n[b];
        }
      }
    }
  }

  // Generation, one batch row: the recurrent term holds H W_h + b_hh (its bias row), the input
  // term X W_x + b; S (H in fp32) and H in place.
  template <typename P>
  static void row(const P* __restrict recurrent, const P* __restrict input, float* __restrict S, P* __restrict H, int64_t hiddens) {
    using lstmlm::sigmoid_, lstmlm::to_float;
    const P *__restrict g_r = recurrent, *__restrict g_z = g_r + hiddens, *__restrict g_n = g_z + hiddens;
    const P *__restrict x_r = input, *__restrict x_z = x_r + hiddens, *__restrict x_n = x_z + hiddens;
    for (int64_t j = 0; j < hiddens; ++j) {
      const float r = sigmoid_(to_float(g_r[j]) + to_float(x_r[j])), z = sigmoid_(to_float(g_z[j]) + to_float(x_z[j]));
      const float c = lstmlm::tanh_(to_float(x_n[j]) + r * to_float(g_n[j]));
      const float h = c + z * (S[j] - c);
      S[j] = h;
      H[j] = lstmlm::from_float<P>(h);
    }
  }
};
LSTMLM_CELL(gru, GruCell)
"""
