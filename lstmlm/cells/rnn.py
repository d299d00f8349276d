"""The plain recurrent network, as the d2l book's RNN section writes it (nn.RNN with tanh).

    H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h)

One block (h), nothing gated: the cell that shows why the gated ones were invented. nn.RNN
computes the same function (its two biases add up to b_h).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .base import Cell, State, tanh_gate


class Step(NamedTuple):
    H: torch.Tensor


class RNN(Cell):
    name = "rnn"
    title = "RNN"
    torch_module = nn.RNN  # tanh, its default nonlinearity
    blocks = ("h",)
    init_order = ("h",)
    state = ("H",)
    gates = (tanh_gate("hidden", "H", "hidden state"),)
    default_gate = "hidden"

    def __init__(self) -> None:
        self.kernel = KERNEL

    def step(self, XW: Mapping[str, torch.Tensor], state: State, p: Mapping[str, torch.Tensor]) -> Step:
        (H,) = state
        return Step(torch.tanh(XW["h"] + H @ p["W_hh"] + p["b_h"]))  # (batch, hiddens)

    def rows(self, recurrent: torch.Tensor, inputs: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        return S.copy_(torch.tanh((recurrent + inputs).float())).clone()


KERNEL = r"""
// H_t = tanh(pre-activation); S carries H in fp32, which is all the backward needs: 1 - H_t².
struct RnnCell {
  static constexpr int64_t kBlocks = 1, kSaved = 0;
  static constexpr bool kSumsInput = true, kSplitGrad = false;

  template <typename P>
  static void forward(const lstmlm::Forward<P>& f) {
    const int64_t B = f.batch, m = f.u.size() * B, at = f.u.u0 * B;
    float* __restrict pre = f.work;
    for (int64_t r = 0; r < f.u.size(); ++r) f.x.row(0, r, pre + r * B, f.recurrent + r * B);
    float* __restrict S = f.S + at;
    P* __restrict H = f.H + at;
    LSTMLM_INDEPENDENT
    for (int64_t k = 0; k < m; ++k) {
      const float h = lstmlm::tanh_(pre[k]);
      S[k] = h;
      H[k] = lstmlm::from_float<P>(h);
    }
  }

  // dL/dH_t from above, from step t+1's product, and (at the last step) from the returned state
  // in `carry`; nothing reaches H_{t-1} but through the product.
  template <typename P, bool last>
  static void backward(const lstmlm::Backward<P>& s) {
    constexpr bool mixed = !std::is_same_v<P, float>;
    const int64_t B = s.batch;
    for (int64_t j = s.u.u0; j < s.u.u1; ++j) {
      const int64_t row = j * B, at = j * s.steps * B + s.t * B;
      const P* __restrict prod = last ? nullptr : s.product + (j - s.u.u0) * B;
      float* __restrict d = s.dAx + at;
      P *__restrict c = s.dAx_c + at, *__restrict next = s.next + row;
      LSTMLM_INDEPENDENT
      for (int64_t b = 0; b < B; ++b) {
        const int64_t k = row + b;
        float dh = s.dH_out[k] + s.carry[k];
        if constexpr (!last) dh += lstmlm::to_float(prod[b]);
        s.carry[k] = 0.0f;
        const float h = s.S[k];
        d[b] = dh * (1.0f - h * h);
        next[b] = lstmlm::from_float<P>(d[b]);
        if constexpr (mixed) c[b] = next[b];
      }
    }
  }

  template <typename P>
  static void row(const P* __restrict recurrent, const P* __restrict input, float* __restrict S, P* __restrict H, int64_t hiddens) {
    for (int64_t j = 0; j < hiddens; ++j) {
      const float h = lstmlm::tanh_(lstmlm::to_float(recurrent[j]) + lstmlm::to_float(input[j]));
      S[j] = h;
      H[j] = lstmlm::from_float<P>(h);
    }
  }
};
LSTMLM_CELL(rnn, RnnCell)
"""
