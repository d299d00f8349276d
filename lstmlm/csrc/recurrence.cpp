// The scratch LSTM's recurrence on a CPU, compiled: fused.py's forward_steps and backward_steps
// as one C++ call per layer and sequence (see lstmlm/native.py, which builds and loads this
// file, and lstmlm/fused.py, whose Python loop computes the same and is the fallback).
//
// Why C++: at batch 32 a step's elementwise work is a few microseconds, as long as Python takes
// to issue one torch operation, and the Python loop issues a dozen a step; here each step is one
// matrix product (oneDNN's micro-kernel for fp32, torch's product for bf16) and one vectorized
// pass over the gates, cut by hidden units across the cores (below), in one call that holds no
// GIL. Generation's one-character step is here too (the end of the file).
//
// Layouts and meanings are fused.py's, so either half (forward or backward) pairs with the
// other's Python version: feature-major, every per-step tensor (features, batch); the gates
// packed i, f, c̃, o with the candidate's weights doubled, so one sigmoid gives all four and
// C̃ = 2·S - 1 (S is what `gates` keeps in the candidate's block).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

// exp for float, written so that the compiler vectorizes the loops that call it (std::exp is a
// library call per element): Cephes' expf, a degree-5 polynomial on [-ln2/2, ln2/2] times 2^n.
// Within 2 ulp over the range used; NaN stays NaN (every comparison with it is false).
inline float exp_(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                   1.6666665459e-1f) * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline float sigmoid_(float x) { return 1.0f / (1.0f + exp_(-x)); }
inline float tanh_(float x) { return 2.0f * sigmoid_(2.0f * x) - 1.0f; }  // tanh(x) = 2σ(2x) - 1

// bf16 as its 16 bits: c10::BFloat16's conversions check for NaN with a branch, which keeps the
// compiler from vectorizing a loop; these round to nearest even as it does (a NaN stays a NaN,
// but for one whose payload sits only in the low 16 bits).
using bf16 = uint16_t;
inline float to_float(float x) { return x; }
inline float to_float(bf16 h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
template <typename T> inline T from_float(float x);
template <> inline float from_float<float>(float x) { return x; }
template <> inline bf16 from_float<bf16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return static_cast<bf16>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

template <typename T> T* data(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// A @ B, a step's product. torch's fp32 product is MKL's, which on some CPUs (AMD's) runs an
// AVX2 kernel at half the speed of oneDNN's, the library nn.LSTM runs on; so fp32 goes through
// oneDNN's linear (X Wᵀ: here A (Bᵀ)ᵀ) where this torch has it. bf16 products are oneDNN's already.
at::Tensor product_of(const at::Tensor& A, const at::Tensor& B) {
  static const std::optional<c10::OperatorHandle> linear = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!linear || A.scalar_type() != at::kFloat) return at::mm(A, B);
  torch::jit::Stack stack{A, B.t(), c10::IValue(), c10::IValue("none"), c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear->callBoxed(&stack);
  return stack[0].toTensor();
}

// A part's step products, C = A B (+ C where `add`), A (M, K) and B (K, N) with contiguous rows,
// into a buffer of the part's. fp32 takes oneDNN's batch-reduce GEMM micro-kernel (ATen's
// cpublas::brgemm), the kind nn.LSTM's CPU kernel is built from: no allocation and no primitive
// lookup a call, which at these sizes cost as much as the arithmetic (about 220 GFLOP/s a core
// on this project's CPU, against some 150 for a product through ATen). bf16 takes torch's
// product (oneDNN's), whose brgemm kernel needs AMX.
template <typename P>
struct Products {
  at::Tensor C;

  const P* times(const at::Tensor& A, const at::Tensor& B, bool add) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if constexpr (std::is_same_v<P, float>) {
      const int64_t M = A.size(0), N = B.size(1), K = A.size(1);
      if (!C.defined()) C = at::empty({M, N}, A.options());
      at::native::cpublas::brgemm(M, N, K, A.stride(0), B.stride(0), N, add, data<float>(A), data<float>(B), data<float>(C), false);
      return data<float>(C);
    }
#endif
    const at::Tensor product = product_of(A, B);
    C = add ? C.add_(product) : product;
    return data<P>(C);
  }
};

// Whether Products<P> adds a second product into the first in fp32 (so a dense layer's input
// product and its recurrent one are one sum the gates read), or keeps them apart.
template <typename P>
constexpr bool accumulates() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  return std::is_same_v<P, float>;
#else
  return false;
#endif
}

// ---- the hidden units across the cores -------------------------------------------------------
//
// A step's product and elementwise work are cut by hidden units, not by batch rows: part p of
// `parts` computes the four gates of units [u0, u1) for the whole batch, so each thread's
// product keeps the full batch as its narrow dimension (at batch 32 a product of 16 columns
// runs at half the rate of one of 32), and the threads meet once a step (a barrier), when the
// new H (forward) or the new gate gradients (backward) are whole.

constexpr int64_t kMinUnits = 32;  // fewer units a part would not pay for the barrier

struct Units {
  int64_t u0, u1;
  int64_t size() const { return u1 - u0; }
};

Units units_of(int64_t p, int64_t parts, int64_t hiddens) { return {p * hiddens / parts, (p + 1) * hiddens / parts}; }

int64_t parts_for(int64_t threads, int64_t hiddens) { return std::max<int64_t>(1, std::min(threads, hiddens / kMinUnits)); }

// The four gates' rows of units u in a packed (4H, ·) matrix, stacked: (4·|u|, ·).
at::Tensor gate_rows(const at::Tensor& M, Units u, int64_t hiddens) {
  std::vector<at::Tensor> blocks;
  for (int64_t g = 0; g < 4; ++g) blocks.push_back(M.narrow(0, g * hiddens + u.u0, u.size()));
  return at::cat(blocks).contiguous();
}

// Runs step(p, t) for t in `order` on `parts` threads, all threads done with step t before any
// begins the next. An exception in any part ends every part after that step and is rethrown.
template <typename Step>
void in_parts(int64_t parts, int64_t steps, bool backwards, Step step) {
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(parts) if (parts > 1)
  {
    const int64_t p = parts > 1 ? omp_get_thread_num() : 0;
    for (int64_t k = 0; k < steps; ++k) {
      try {
        step(p, backwards ? steps - 1 - k : k);
      } catch (...) {
#pragma omp critical
        if (!failure) failure = std::current_exception();
        failed = true;
      }
#pragma omp barrier
      if (failed) break;
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// ---- forward ----------------------------------------------------------------------------------

// The input term of a step: for ids, the table's columns (X_t W_x + b)ᵀ at the step's ids
// (table (4H, vocab), ids (B,)); for dense input, b plus the product W_xᵀ X_tᵀ (`input`, the
// part's (4·|u|, B) rows).
template <typename P>
struct Input {
  const float* table = nullptr;
  const int64_t* ids = nullptr;
  int64_t vocab = 0;
  const float* bias = nullptr;  // (4H,)
  const P* product = nullptr;  // (4·|u|, B), or null where the step's product holds it already
};

// Units u's gates at one step, in `gates_t` (4H, B): σ(input term + W_hᵀ H_{t-1}ᵀ), the latter
// the part's rows `product` (4·|u|, B). A gather and a sigmoid in one loop vectorize poorly
// together: two passes.
template <typename P>
void activate(float* __restrict gates_t, const P* __restrict product, const Input<P>& x, int64_t hiddens, Units u, int64_t batch) {
  const int64_t n = u.size() * batch;
  for (int64_t g = 0; g < 4; ++g) {
    float* __restrict out = gates_t + (g * hiddens + u.u0) * batch;
    const P* __restrict prod = product + g * n;
    if (x.table != nullptr) {
      const int64_t* __restrict ids = x.ids;
      for (int64_t r = 0; r < u.size(); ++r) {
        const float* __restrict row = x.table + (g * hiddens + u.u0 + r) * x.vocab;
        for (int64_t b = 0; b < batch; ++b) out[r * batch + b] = row[ids[b]] + to_float(prod[r * batch + b]);
      }
    } else if (x.product != nullptr) {
      const P* __restrict in = x.product + g * n;
      for (int64_t r = 0; r < u.size(); ++r) {
        const float bias = x.bias[g * hiddens + u.u0 + r];
        for (int64_t b = 0; b < batch; ++b) out[r * batch + b] = bias + to_float(in[r * batch + b]) + to_float(prod[r * batch + b]);
      }
    } else {  // the input's product is in `product` already
      for (int64_t r = 0; r < u.size(); ++r) {
        const float bias = x.bias[g * hiddens + u.u0 + r];
        for (int64_t b = 0; b < batch; ++b) out[r * batch + b] = bias + to_float(prod[r * batch + b]);
      }
    }
    for (int64_t k = 0; k < n; ++k) out[k] = sigmoid_(out[k]);
  }
}

// C_t = F_t ⊙ C_{t-1} + I_t ⊙ (2 S_t - 1), H_t = O_t ⊙ tanh(C_t), over `count` numbers; the
// gates' blocks `stride` apart.
template <typename P>
void cell(const float* __restrict gates, int64_t stride, const float* __restrict C_prev, float* __restrict C, float* __restrict tanh_C,
          P* __restrict H, int64_t count) {
  const float *__restrict I = gates, *__restrict F = gates + stride, *__restrict S = gates + 2 * stride, *__restrict O = gates + 3 * stride;
  for (int64_t k = 0; k < count; ++k) {
    const float c = F[k] * C_prev[k] + I[k] * (2.0f * S[k] - 1.0f);
    const float tc = tanh_(c);
    C[k] = c;
    tanh_C[k] = tc;
    H[k] = from_float<P>(O[k] * tc);
  }
}

template <typename P>
std::vector<at::Tensor> forward_typed(const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& XT,
                                      const c10::optional<at::Tensor>& W_xT, const c10::optional<at::Tensor>& bias, const at::Tensor& W_hT,
                                      const at::Tensor& H_0, const at::Tensor& C_0, int64_t threads) {
  const int64_t steps = table ? ids->size(0) : XT->size(0), batch = H_0.size(0), rows = W_hT.size(0), hiddens = rows / 4, n = hiddens * batch;
  const auto state = H_0.options().dtype(at::kFloat);
  at::Tensor gates = at::empty({steps, rows, batch}, state);
  at::Tensor Hs = at::empty({steps + 1, hiddens, batch}, W_hT.options());
  at::Tensor Cs = at::empty({steps + 1, hiddens, batch}, state);
  at::Tensor tanh_C = at::empty({steps, hiddens, batch}, state);
  Hs[0].copy_(H_0.t());
  Cs[0].copy_(C_0.t());
  const int64_t parts = parts_for(threads, hiddens);
  std::vector<at::Tensor> Wh_part, Wx_part;  // each part's rows of W_hᵀ (and W_xᵀ)
  for (int64_t p = 0; p < parts; ++p) {
    const Units u = units_of(p, parts, hiddens);
    Wh_part.push_back(parts == 1 ? W_hT : gate_rows(W_hT, u, hiddens));
    if (W_xT) Wx_part.push_back(parts == 1 ? *W_xT : gate_rows(*W_xT, u, hiddens));
  }
  float* G = data<float>(gates);
  float* C = data<float>(Cs);
  float* tC = data<float>(tanh_C);
  P* H = data<P>(Hs);
  std::vector<Products<P>> recurrent(parts), inputs(parts);
  in_parts(parts, steps, false, [&](int64_t p, int64_t t) {
    const Units u = units_of(p, parts, hiddens);
    Input<P> x;
    bool add = false;
    if (table) {
      x.table = data<float>(*table), x.ids = data<int64_t>(*ids) + t * batch, x.vocab = table->size(1);
    } else if (accumulates<P>()) {  // W_xᵀ X_tᵀ first, the recurrent product added to it
      recurrent[p].times(Wx_part[p], (*XT)[t], false);
      x.bias = data<float>(*bias), add = true;
    } else {
      x.bias = data<float>(*bias), x.product = inputs[p].times(Wx_part[p], (*XT)[t], false);
    }
    const P* product = recurrent[p].times(Wh_part[p], Hs[t], add);  // W_hᵀ H_{t-1}ᵀ, the part's rows: its units' four gates in one product
    float* gates_t = G + t * rows * batch;
    activate<P>(gates_t, product, x, hiddens, u, batch);
    const int64_t at = u.u0 * batch;
    cell<P>(gates_t + at, n, C + t * n + at, C + (t + 1) * n + at, tC + t * n + at, H + (t + 1) * n + at, u.size() * batch);
  });
  return {gates, Hs, Cs, tanh_C};
}

// One layer over a sequence. Its input: ids (steps, B) int64 and `table` (4H, vocab) float, the
// columns (X_t W_x + b)ᵀ; or XT (steps, inputs, B) with W_xT (4H, inputs), both in the products'
// dtype, and `bias` (4H,) float. W_hT (4H, H) in the products' dtype; H_0, C_0 (B, H); up to
// `threads` threads. Returns gates (steps, 4H, B) float, Hs (steps + 1, H, B) in W_hT's dtype,
// Cs and tanh_C, float.
std::vector<at::Tensor> forward(const c10::optional<at::Tensor>& table, const c10::optional<at::Tensor>& ids, const c10::optional<at::Tensor>& XT,
                                const c10::optional<at::Tensor>& W_xT, const c10::optional<at::Tensor>& bias, const at::Tensor& W_hT,
                                const at::Tensor& H_0, const at::Tensor& C_0, int64_t threads) {
  TORCH_CHECK(W_hT.is_contiguous() && W_hT.dim() == 2 && W_hT.size(0) == 4 * W_hT.size(1), "W_hT must be contiguous (4H, H)");
  TORCH_CHECK(H_0.dim() == 2 && C_0.sizes() == H_0.sizes() && H_0.size(1) == W_hT.size(1), "H_0 and C_0 must be (B, H)");
  const int64_t rows = W_hT.size(0), batch = H_0.size(0);
  if (table) {
    TORCH_CHECK(ids && !XT && !W_xT && !bias, "either ids and a table, or XT, W_xT and a bias");
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->size(0) == rows, "table must be contiguous float (4H, vocab)");
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->is_contiguous() && ids->dim() == 2 && ids->size(1) == batch, "ids must be contiguous int64 (steps, B)");
  } else {
    TORCH_CHECK(XT && W_xT && bias && !ids, "either ids and a table, or XT, W_xT and a bias");
    TORCH_CHECK(XT->is_contiguous() && XT->dim() == 3 && XT->size(2) == batch && XT->scalar_type() == W_hT.scalar_type(), "XT must be contiguous (steps, inputs, B) in W_hT's dtype");
    TORCH_CHECK(W_xT->is_contiguous() && W_xT->size(0) == rows && W_xT->size(1) == XT->size(1) && W_xT->scalar_type() == W_hT.scalar_type(),
                "W_xT must be contiguous (4H, inputs) in W_hT's dtype");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == rows, "bias must be contiguous float (4H,)");
  }
  at::NoGradGuard no_grad;
  if (W_hT.scalar_type() == at::kBFloat16) return forward_typed<bf16>(table, ids, XT, W_xT, bias, W_hT, H_0, C_0, threads);
  TORCH_CHECK(W_hT.scalar_type() == at::kFloat, "W_hT must be float or bfloat16");
  return forward_typed<float>(table, ids, XT, W_xT, bias, W_hT, H_0, C_0, threads);
}

// ---- backward ---------------------------------------------------------------------------------

// One step back for units u: from dL/dH_t (dH_out, the output's gradient, plus W_h dGates_{t+1}ᵀ
// in `product` (|u|, B), but at the last step) and dL/dC_{t+1} in dC, dL/dC_t into dC and the
// four gates' pre-activation gradients into dGates (4H, steps, B) at step t's columns, into
// its copy dG_c when the products' dtype P is not float, and into `next` (4H, B), contiguous in
// P: the operand of the product that takes them to step t-1. Arrays of a step are (H, B) or
// (4H, B) from their start. `last`: step T, where nothing comes from a later step (a template
// parameter, so that the loop holds no condition and vectorizes).
template <typename P, bool last>
void step_back(int64_t t, int64_t steps, int64_t hiddens, int64_t batch, Units u, const float* __restrict gates, const float* __restrict F_next,
               const float* __restrict C_prev, const float* __restrict tanh_C, const float* __restrict dH_out, const P* __restrict product,
               float* __restrict dC, float* dG, P* dG_c, P* __restrict next) {
  constexpr bool mixed = !std::is_same_v<P, float>;
  const int64_t n = hiddens * batch, block = hiddens * steps * batch;  // a gate's rows in a step's gates; in dGates
  const float *__restrict I = gates, *__restrict F = gates + n, *__restrict S = gates + 2 * n, *__restrict O = gates + 3 * n;
  for (int64_t j = u.u0; j < u.u1; ++j) {
    const int64_t row = j * batch, at = j * steps * batch + t * batch;  // (j, ·) in a step's arrays; (j, t, ·) in dGates
    const P* __restrict prod = product + (j - u.u0) * batch;
    float *__restrict d_i = dG + at, *__restrict d_f = d_i + block, *__restrict d_c = d_f + block, *__restrict d_o = d_c + block;
    P *__restrict c_i = dG_c + at, *__restrict c_f = c_i + block, *__restrict c_c = c_f + block, *__restrict c_o = c_c + block;
    P *__restrict n_i = next + row, *__restrict n_f = n_i + n, *__restrict n_c = n_f + n, *__restrict n_o = n_c + n;
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t k = row + b;
      float dH = dH_out[k];
      if constexpr (!last) dH += to_float(prod[b]);
      const float i = I[k], f = F[k], s = S[k], o = O[k], tc = tanh_C[k];
      // dL/dC_t: through C_{t+1} = F_{t+1} ⊙ C_t + …, and through H_t = O_t ⊙ tanh(C_t)
      float dc = dC[k];
      if constexpr (!last) dc *= F_next[k];
      dc += dH * o * (1.0f - tc * tc);
      dC[k] = dc;
      d_i[b] = dc * (2.0f * s - 1.0f) * i * (1.0f - i);  // C̃ σ'(i)
      d_f[b] = dc * C_prev[k] * f * (1.0f - f);           // C_{t-1} σ'(f)
      d_c[b] = dc * i * 4.0f * s * (1.0f - s);            // I (1 - C̃²), as 1 - C̃² = 4 S (1 - S)
      d_o[b] = dH * tc * o * (1.0f - o);                  // tanh(C_t) σ'(o)
      n_i[b] = from_float<P>(d_i[b]);
      n_f[b] = from_float<P>(d_f[b]);
      n_c[b] = from_float<P>(d_c[b]);
      n_o[b] = from_float<P>(d_o[b]);
      if constexpr (mixed) {
        c_i[b] = n_i[b];
        c_f[b] = n_f[b];
        c_c[b] = n_c[b];
        c_o[b] = n_o[b];
      }
    }
  }
}

template <typename P>
std::vector<at::Tensor> backward_typed(const at::Tensor& dHs, const at::Tensor& dC_T, const at::Tensor& gates, const at::Tensor& Cs,
                                       const at::Tensor& tanh_C, const at::Tensor& W_h, int64_t threads) {
  const int64_t steps = gates.size(0), rows = gates.size(1), batch = gates.size(2), hiddens = rows / 4, n = hiddens * batch;
  const bool mixed = W_h.scalar_type() != at::kFloat;
  at::Tensor dGates = at::empty({rows, steps, batch}, gates.options());
  at::Tensor dGates_c = mixed ? at::empty({rows, steps, batch}, W_h.options()) : dGates;
  // a step's dGates as the next product reads them: two, so that step t-1's product reads one
  // while the parts write the other (the parts meet once a step)
  const at::Tensor next[2] = {at::empty({rows, batch}, W_h.options()), at::empty({rows, batch}, W_h.options())};
  at::Tensor dC = dC_T.defined() ? dC_T.t().to(at::kFloat).contiguous() : at::zeros({hiddens, batch}, gates.options());
  const int64_t parts = parts_for(threads, hiddens);
  const float* G = data<float>(gates);
  const float* C = data<float>(Cs);
  const float* tC = data<float>(tanh_C);
  const float* dH_out = data<float>(dHs);
  float* dc = data<float>(dC);
  float* dG = data<float>(dGates);
  P* dG_c = data<P>(dGates_c);  // dGates itself for float
  std::vector<Products<P>> products(parts);
  in_parts(parts, steps, true, [&](int64_t p, int64_t t) {
    const Units u = units_of(p, parts, hiddens);
    const float* gates_t = G + t * rows * batch;
    P* written = data<P>(next[t % 2]);
    if (t == steps - 1) {
      step_back<P, true>(t, steps, hiddens, batch, u, gates_t, nullptr, C + t * n, tC + t * n, dH_out + t * n, nullptr, dc, dG, dG_c, written);
      return;
    }
    const P* product = products[p].times(W_h.narrow(0, u.u0, u.size()), next[(t + 1) % 2], false);  // W_h dGates_{t+1}ᵀ, the part's units
    step_back<P, false>(t, steps, hiddens, batch, u, gates_t, G + (t + 1) * rows * batch + n, C + t * n, tC + t * n, dH_out + t * n,
                        product, dc, dG, dG_c, written);
  });
  dC.mul_(gates[0].narrow(0, hiddens, hiddens));  // dL/dC_0 = dL/dC_1's part through C_1 = F_1 ⊙ C_0 + …
  return {dGates, dGates_c, dC};
}

// dHs (steps, H, B) float: dL/dH_tᵀ from above; dC_T (B, H) or undefined; gates, Cs, tanh_C as
// forward left them; W_h (H, 4H) contiguous in the products' dtype; up to `threads` threads.
// Returns dGates (4H, steps, B) float, the same in W_h's dtype (the same tensor for float), and
// dL/dC_0ᵀ (H, B).
std::vector<at::Tensor> backward(const at::Tensor& dHs, const c10::optional<at::Tensor>& dC_T, const at::Tensor& gates, const at::Tensor& Cs,
                                 const at::Tensor& tanh_C, const at::Tensor& W_h, int64_t threads) {
  TORCH_CHECK(gates.scalar_type() == at::kFloat && gates.is_contiguous(), "gates must be contiguous float");
  TORCH_CHECK(dHs.scalar_type() == at::kFloat && dHs.is_contiguous() && dHs.size(0) == gates.size(0), "dHs must be contiguous float (steps, H, B)");
  TORCH_CHECK(Cs.is_contiguous() && tanh_C.is_contiguous() && W_h.is_contiguous(), "Cs, tanh_C and W_h must be contiguous");
  at::NoGradGuard no_grad;
  const at::Tensor dC = dC_T ? *dC_T : at::Tensor();
  if (W_h.scalar_type() == at::kBFloat16) return backward_typed<bf16>(dHs, dC, gates, Cs, tanh_C, W_h, threads);
  TORCH_CHECK(W_h.scalar_type() == at::kFloat, "W_h must be float or bfloat16");
  return backward_typed<float>(dHs, dC, gates, Cs, tanh_C, W_h, threads);
}

// ---- generation: one character at a time ------------------------------------------------------
//
// generate.Stepper's step, batch-major, in place on its buffers: per layer k, P[k] (batch, in_k +
// 4H) = [H_t, 1] [[W_in, W_h], [b_in, 0]] holds the reader's input H_t W_in + b_in and this
// layer's next recurrent term H_t W_h side by side (the last layer's reader is the output
// layer: its part of P is the logits). A step adds the layer's input to the recurrent term,
// runs the cell and multiplies [H_t, 1] once. Nothing is allocated but the products' outputs.

// The cell for one row: gates = σ(recurrent + input) (the candidate doubled), C and H in place.
template <typename P>
void cell_row(const P* __restrict recurrent, const P* __restrict input, float* __restrict C, P* __restrict H, int64_t hiddens) {
  const P *__restrict r_i = recurrent, *__restrict r_f = r_i + hiddens, *__restrict r_s = r_f + hiddens, *__restrict r_o = r_s + hiddens;
  const P *__restrict x_i = input, *__restrict x_f = x_i + hiddens, *__restrict x_s = x_f + hiddens, *__restrict x_o = x_s + hiddens;
  for (int64_t j = 0; j < hiddens; ++j) {
    const float i = sigmoid_(to_float(r_i[j]) + to_float(x_i[j])), f = sigmoid_(to_float(r_f[j]) + to_float(x_f[j]));
    const float s = sigmoid_(to_float(r_s[j]) + to_float(x_s[j])), o = sigmoid_(to_float(r_o[j]) + to_float(x_o[j]));
    const float c = f * C[j] + i * (2.0f * s - 1.0f);
    C[j] = c;
    H[j] = from_float<P>(o * tanh_(c));
  }
}

template <typename P>
void step_typed(const int64_t* ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList C) {
  const int64_t batch = H1[0].size(0), hiddens = H1[0].size(1) - 1, gates = 4 * hiddens;
  for (size_t k = 0; k < W.size(); ++k) {
    const int64_t width = Pk[k].size(1), in = width - gates;  // P[k]: the reader's input, then the recurrent term
    at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {  // rows on the cores where there are enough of them
      for (int64_t b = begin; b < end; ++b) {
        const P* input = k == 0 ? data<P>(table) + ids[b] * gates : data<P>(Pk[k - 1]) + b * Pk[k - 1].size(1);
        cell_row<P>(data<P>(Pk[k]) + b * width + in, input, data<float>(C[k]) + b * hiddens, data<P>(H1[k]) + b * (hiddens + 1), hiddens);
      }
    });
    at::mm_out(const_cast<at::Tensor&>(Pk[k]), H1[k], W[k]);  // [H_t, 1] times everything that reads H_t
  }
}

void check_stepper(const at::Tensor& ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList C) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "ids must be contiguous int64 (batch,)");
  TORCH_CHECK(!W.empty() && W.size() == H1.size() && W.size() == Pk.size() && W.size() == C.size(), "one W, H1, P and C a layer");
  TORCH_CHECK(table.is_contiguous() && table.dim() == 2, "table must be contiguous (vocab, 4H)");
  for (size_t k = 0; k < W.size(); ++k) {
    TORCH_CHECK(W[k].scalar_type() == table.scalar_type() && H1[k].scalar_type() == table.scalar_type() && Pk[k].scalar_type() == table.scalar_type(),
                "W, H1, P and the table share one dtype");
    TORCH_CHECK(H1[k].is_contiguous() && Pk[k].is_contiguous() && C[k].is_contiguous() && C[k].scalar_type() == at::kFloat, "contiguous buffers, C in float");
    TORCH_CHECK(H1[k].size(0) == ids.size(0), "one id a row");
  }
}

void dispatch_step(const int64_t* ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList C) {
  if (table.scalar_type() == at::kBFloat16) return step_typed<bf16>(ids, table, W, H1, Pk, C);
  TORCH_CHECK(table.scalar_type() == at::kFloat, "the stepper's dtype must be float or bfloat16");
  step_typed<float>(ids, table, W, H1, Pk, C);
}

// One step: ids (batch,) are the characters read; afterwards the last P holds the next logits.
void step(const at::Tensor& ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList C) {
  check_stepper(ids, table, W, H1, Pk, C);
  at::NoGradGuard no_grad;
  dispatch_step(data<int64_t>(ids), table, W, H1, Pk, C);
}

// `steps` greedy characters after reading ids (batch,): d2l's predict, the argmax fed back.
// Returns them, (steps, batch); the state and the last P are those after the last one read.
at::Tensor greedy(const at::Tensor& ids, int64_t steps, int64_t vocab, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk,
                  at::TensorList C) {
  check_stepper(ids, table, W, H1, Pk, C);
  at::NoGradGuard no_grad;
  const int64_t batch = ids.size(0);
  at::Tensor chosen = at::empty({steps, batch}, ids.options());
  std::vector<int64_t> X(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + batch);
  const at::Tensor& logits = Pk.back();  // (batch, vocab + 4H): the logits first
  for (int64_t t = 0; t < steps; ++t) {
    dispatch_step(X.data(), table, W, H1, Pk, C);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t row = b * logits.size(1);
      int64_t best = 0;
      float top = 0.0f;
      for (int64_t v = 0; v < vocab; ++v) {  // the first of equal maxima, as torch.argmax
        const float x = table.scalar_type() == at::kBFloat16 ? to_float(data<bf16>(logits)[row + v]) : data<float>(logits)[row + v];
        if (v == 0 || x > top) best = v, top = x;
      }
      X[b] = best;
      chosen.data_ptr<int64_t>()[t * batch + b] = best;
    }
  }
  return chosen;
}

}  // namespace

TORCH_LIBRARY(lstmlm_recurrence, m) {
  m.def("forward(Tensor? table, Tensor? ids, Tensor? XT, Tensor? W_xT, Tensor? bias, Tensor W_hT, Tensor H_0, Tensor C_0, int threads) -> Tensor[]");
  m.def("backward(Tensor dHs, Tensor? dC_T, Tensor gates, Tensor Cs, Tensor tanh_C, Tensor W_h, int threads) -> Tensor[]");
  m.def("step(Tensor ids, Tensor table, Tensor[] W, Tensor(a!)[] H1, Tensor(b!)[] P, Tensor(c!)[] C) -> ()");
  m.def("greedy(Tensor ids, int steps, int vocab, Tensor table, Tensor[] W, Tensor(a!)[] H1, Tensor(b!)[] P, Tensor(c!)[] C) -> Tensor");
}

TORCH_LIBRARY_IMPL(lstmlm_recurrence, CPU, m) {
  m.impl("forward", forward);
  m.impl("backward", backward);
  m.impl("step", step);
  m.impl("greedy", greedy);
}
