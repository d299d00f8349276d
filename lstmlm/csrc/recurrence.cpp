// The scratch cores' recurrence on a CPU, compiled: one C++ call per layer and sequence for any
// recurrent cell (see lstmlm/native.py, which builds this file with every cell's kernel appended,
// and lstmlm/cells/, where each cell's kernel is written beside its equations).
//
// Why C++: at batch 32 a step's elementwise work is a few microseconds, as long as Python takes
// to issue one torch operation, and a Python loop issues a dozen a step; here each step is one
// matrix product (oneDNN's micro-kernel for fp32, torch's product for bf16) and one vectorized
// pass over the gates, cut by hidden units across the cores (below), in one call that holds no
// GIL. Generation's one-character step is here too (the end of the file).
//
// This file is the part every cell shares: the products, the input term, the threads, the
// buffers. A cell is a struct (its kernel, in lstmlm/cells/<cell>.py) with
//
//   kBlocks     blocks of its packed weights: the products give kBlocks·H rows a step
//   kSaved      blocks of `saved` a step keeps for the backward pass, (kSaved·H, B) each step
//   kSumsInput  whether its input term may be added into the recurrent product before the cell
//               reads it (a cell that reads them apart, as the GRU's candidate does, says false)
//   kSplitGrad  whether the gradient that reaches W_h differs from the one that reaches W_x
//   forward(Forward<P, In>&), backward<last>(Backward<P>&): one step for units [u0, u1)
//   row(recurrent, input, rbias, S, H, hiddens): generation's step for one batch row
//
// Layouts: feature-major, every per-step tensor (features, batch). Besides H (in the products'
// dtype P), each cell carries one fp32 state S: the LSTM its memory cell C, the GRU and the RNN
// their H itself (so the arithmetic that carries it forward is never rounded to bf16).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <omp.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// Before a cell's elementwise loop over k: its iterations are independent, each reading and
// writing only element k of arrays that never overlap. GCC drops `__restrict` on local
// pointers once the cell's step is inlined into the threads' lambda, and a loop that reads six
// arrays and writes four needs more overlap checks than it will emit (10), so it stayed scalar:
// vectorized, the d2l model's forward over 35 steps took 7.7 ms instead of 9.2, its backward
// 14.7 instead of 18.0 (AMD EPYC, AVX2). Only the loop's schedule changes, not an element's
// arithmetic.
#if defined(__clang__)
#define LSTMLM_INDEPENDENT _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define LSTMLM_INDEPENDENT _Pragma("GCC ivdep")
#else
#define LSTMLM_INDEPENDENT
#endif

namespace lstmlm {

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
template <typename T> T* data_or_null(const at::Tensor& t) { return t.defined() && t.numel() ? data<T>(t) : nullptr; }

// A @ B, a step's product. torch's fp32 product is MKL's, which on some CPUs (AMD's) runs an
// AVX2 kernel at half the speed of oneDNN's, the library nn.LSTM runs on; so fp32 goes through
// oneDNN's linear (X Wᵀ: here A (Bᵀ)ᵀ) where this torch has it. bf16 products are oneDNN's already.
inline at::Tensor product_of(const at::Tensor& A, const at::Tensor& B) {
  static const std::optional<c10::OperatorHandle> linear = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  if (!linear || A.scalar_type() != at::kFloat) return at::mm(A, B);
  torch::jit::Stack stack{A, B.t(), c10::IValue(), c10::IValue("none"), c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  linear->callBoxed(&stack);
  return stack[0].toTensor();
}

// A part's step products, C = A B (+ C where `add`), A (M, K) and B (K, N) with contiguous rows,
// into a buffer of the part's. fp32 takes oneDNN's batch-reduce GEMM micro-kernel (ATen's
// cpublas::brgemm), the kind nn.LSTM's CPU kernel is built from: no allocation and no primitive
// lookup a call, which at these sizes cost as much as the arithmetic. bf16 takes torch's product
// (oneDNN's), whose brgemm kernel needs AMX.
// brgemm keeps its rows of B in cache across the whole of A only where they fit: past that, every
// block of A's rows reads B again from further out. The backward product's B is a step's gate
// gradients, (blocks·H, batch): 1 MiB at 1024 units and batch 64, twice a 512 KiB L2. So K is cut
// into chunks of B of kChunkBytes, their products summed into C. Measured on a 2-core AMD EPYC
// (AVX2, 512 KiB L2 a core), a training step of one layer 1024 wide, batch 64 × 35
// (benchmarks/profile_train.py --config w1024-b64 --core scratch): 533–554 ms whole, 413–446 in
// chunks of 128 KiB; 64 and 32 KiB within that spread, 256 and 512 KiB 462–477.
constexpr int64_t kChunkBytes = 128 * 1024;

inline int64_t k_chunk(int64_t N) { return std::max<int64_t>(64, kChunkBytes / (N * int64_t{sizeof(float)})); }

template <typename P>
struct Products {
  at::Tensor C;

  const P* times(const at::Tensor& A, const at::Tensor& B, bool add) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
    if constexpr (std::is_same_v<P, float>) {
      const int64_t M = A.size(0), N = B.size(1), K = A.size(1), chunk = k_chunk(N);
      if (!C.defined()) C = at::empty({M, N}, A.options());
      for (int64_t k = 0; k < K; k += chunk) {
        at::native::cpublas::brgemm(M, N, std::min(chunk, K - k), A.stride(0), B.stride(0), N, add || k > 0, data<float>(A) + k,
                                    data<float>(B) + k * B.stride(0), data<float>(C), false);
      }
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
// `parts` computes every block of units [u0, u1) for the whole batch, so each thread's product
// keeps the full batch as its narrow dimension (at batch 32 a product of 16 columns runs at half
// the rate of one of 32), and the threads meet once a step (a barrier), when the new H (forward)
// or the new gate gradients (backward) are whole.

constexpr int64_t kMinUnits = 32;  // fewer units a part would not pay for the barrier

struct Units {
  int64_t u0, u1;
  int64_t size() const { return u1 - u0; }
};

inline Units units_of(int64_t p, int64_t parts, int64_t hiddens) { return {p * hiddens / parts, (p + 1) * hiddens / parts}; }

inline int64_t parts_for(int64_t threads, int64_t hiddens) { return std::max<int64_t>(1, std::min(threads, hiddens / kMinUnits)); }

// Every block's rows of units u in a packed (blocks·H, ·) matrix, stacked: (blocks·|u|, ·).
inline at::Tensor block_rows(const at::Tensor& M, Units u, int64_t hiddens, int64_t blocks) {
  std::vector<at::Tensor> rows;
  for (int64_t g = 0; g < blocks; ++g) rows.push_back(M.narrow(0, g * hiddens + u.u0, u.size()));
  return at::cat(rows).contiguous();
}

// Runs step(p, t) for t in `order` on `parts` threads, all threads done with step t before any
// begins the next. An exception in any part ends every part after that step and is rethrown.
template <typename Step>
void in_parts(int64_t parts, int64_t steps, bool backwards, Step step) {
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(parts) if (parts > 1)
  {
    // OpenMP may grant fewer threads than parts (OMP_THREAD_LIMIT, OMP_DYNAMIC on a busy
    // machine): a thread then takes every team-th part, so no part is left undone.
    const int64_t first = parts > 1 ? omp_get_thread_num() : 0, team = parts > 1 ? omp_get_num_threads() : 1;
    for (int64_t k = 0; k < steps; ++k) {
      try {
        for (int64_t p = first; p < parts; p += team) step(p, backwards ? steps - 1 - k : k);
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

// ---- what a cell's step reads and writes -------------------------------------------------------

// The input term of a step for units u: for ids, the table's columns (X_t W_x + b)ᵀ at the
// step's ids (table (blocks·H, vocab)); for dense input, b plus the part's rows of W_xᵀ X_tᵀ
// (`product`, (blocks·|u|, B)), or b alone where the recurrent product holds the input's already.
template <typename P>
struct Input {
  const float* table = nullptr;
  const int64_t* ids = nullptr;
  int64_t vocab = 0;
  const float* bias = nullptr;  // (blocks·H,)
  const P* product = nullptr;
  int64_t hiddens = 0, u0 = 0, units = 0, batch = 0;

  // Block g's input term for unit u0 + r into out[0 .. batch), plus `add` (the product's row) where given.
  template <typename Q>
  inline void row(int64_t g, int64_t r, float* __restrict out, const Q* __restrict add) const {
    const int64_t global = g * hiddens + u0 + r;
    if (table != nullptr) {
      const float* __restrict column = table + global * vocab;
      const int64_t* __restrict id = ids;
      if (add != nullptr) {
        for (int64_t b = 0; b < batch; ++b) out[b] = column[id[b]] + to_float(add[b]);
      } else {
        for (int64_t b = 0; b < batch; ++b) out[b] = column[id[b]];
      }
      return;
    }
    const float bias_ = bias[global];
    if (product != nullptr) {
      const P* __restrict in = product + (g * units + r) * batch;
      if (add != nullptr) {
        for (int64_t b = 0; b < batch; ++b) out[b] = bias_ + to_float(in[b]) + to_float(add[b]);
      } else {
        for (int64_t b = 0; b < batch; ++b) out[b] = bias_ + to_float(in[b]);
      }
      return;
    }
    if (add != nullptr) {
      for (int64_t b = 0; b < batch; ++b) out[b] = bias_ + to_float(add[b]);
    } else {
      for (int64_t b = 0; b < batch; ++b) out[b] = bias_;
    }
  }
};

// One forward step for units u: the products' rows are the part's, (blocks·|u|, B), block g at
// g·|u|·B; `saved` (kSaved·H, B), S and H (H, B) are whole, so a unit j's row is j·B.
template <typename P>
struct Forward {
  int64_t hiddens, batch;
  Units u;
  Input<P> x;
  const P* recurrent;  // W_hᵀ H_{t-1}ᵀ for the part's rows (the input's product added where kSumsInput and it accumulates)
  const float* rbias;  // (blocks·H,): a bias inside the recurrence (the GRU's b_hh), or null
  float* saved;        // this step's (kSaved·H, B)
  const float* S_prev;  // S_{t-1} (H, B)
  float* S;            // S_t (H, B)
  P* H;                // H_t (H, B)
  float* work;         // the part's scratch, (blocks·|u|, B) floats
};

// One backward step for units u. dAx and dAh are (blocks·H, steps, B): a row's step t at
// (row·steps + t)·B; `next` (blocks·H, B) receives this step's dAh in P, which the product of the
// step before reads. `carry` (H, B) goes from step t+1 to step t: whatever of dL/dS_t (or, for a
// cell whose S is H, of dL/dH_t) does not pass through the product.
template <typename P>
struct Backward {
  int64_t hiddens, batch, steps, t;
  Units u;
  const float* saved;   // step t's (kSaved·H, B)
  const float* S_prev;  // S_{t-1}
  const float* S;       // S_t
  const float* dH_out;  // dL/dH_t from above (H, B)
  const P* product;     // W_h dAh_{t+1}ᵀ for the part's units (|u|, B); null at the last step
  float* carry;
  float* dAx;
  P* dAx_c;  // dAx in P (dAx itself when P is float)
  float* dAh;
  P* dAh_c;
  P* next;
};

// ---- forward ----------------------------------------------------------------------------------

template <typename Cell, typename P>
std::vector<at::Tensor> forward_typed(const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& XT,
                                      const std::optional<at::Tensor>& W_xT, const std::optional<at::Tensor>& bias, const at::Tensor& W_hT,
                                      const std::optional<at::Tensor>& rbias, const at::Tensor& H_0, const at::Tensor& S_0, int64_t threads) {
  constexpr int64_t G = Cell::kBlocks;
  const int64_t steps = table ? ids->size(0) : XT->size(0), batch = H_0.size(0), rows = W_hT.size(0), hiddens = rows / G, n = hiddens * batch;
  const auto state = H_0.options().dtype(at::kFloat);
  at::Tensor saved = at::empty({steps, Cell::kSaved * hiddens, batch}, state);
  at::Tensor Hs = at::empty({steps + 1, hiddens, batch}, W_hT.options());
  at::Tensor Ss = at::empty({steps + 1, hiddens, batch}, state);
  Hs[0].copy_(H_0.t());
  Ss[0].copy_(S_0.t());
  const int64_t parts = parts_for(threads, hiddens);
  std::vector<at::Tensor> Wh_part, Wx_part;  // each part's rows of W_hᵀ (and W_xᵀ)
  for (int64_t p = 0; p < parts; ++p) {
    const Units u = units_of(p, parts, hiddens);
    Wh_part.push_back(parts == 1 ? W_hT : block_rows(W_hT, u, hiddens, G));
    if (W_xT) Wx_part.push_back(parts == 1 ? *W_xT : block_rows(*W_xT, u, hiddens, G));
  }
  std::vector<at::Tensor> work;
  for (int64_t p = 0; p < parts; ++p) work.push_back(at::empty({G * units_of(p, parts, hiddens).size(), batch}, state));
  float* saved_ = data<float>(saved);
  float* S = data<float>(Ss);
  P* H = data<P>(Hs);
  const float* rb = rbias ? data<float>(*rbias) : nullptr;
  std::vector<Products<P>> recurrent(parts), inputs(parts);
  in_parts(parts, steps, false, [&](int64_t p, int64_t t) {
    const Units u = units_of(p, parts, hiddens);
    Input<P> x;
    x.hiddens = hiddens, x.u0 = u.u0, x.units = u.size(), x.batch = batch;
    bool add = false;
    if (table) {
      x.table = data<float>(*table), x.ids = data<int64_t>(*ids) + t * batch, x.vocab = table->size(1);
    } else if (Cell::kSumsInput && accumulates<P>()) {  // W_xᵀ X_tᵀ first, the recurrent product added to it
      recurrent[p].times(Wx_part[p], (*XT)[t], false);
      x.bias = data<float>(*bias), add = true;
    } else {
      x.bias = data<float>(*bias), x.product = inputs[p].times(Wx_part[p], (*XT)[t], false);
    }
    const P* product = recurrent[p].times(Wh_part[p], Hs[t], add);  // W_hᵀ H_{t-1}ᵀ, the part's rows: its units' blocks in one product
    Forward<P> f{hiddens, batch, u, x, product, rb, saved_ + t * Cell::kSaved * n, S + t * n, S + (t + 1) * n, H + (t + 1) * n, data<float>(work[p])};
    Cell::forward(f);
  });
  return {saved, Hs, Ss};
}

// One layer over a sequence. Its input: ids (steps, B) int64 and `table` (blocks·H, vocab) float,
// the columns (X_t W_x + b)ᵀ; or XT (steps, inputs, B) with W_xT (blocks·H, inputs), both in the
// products' dtype, and `bias` (blocks·H,) float. W_hT (blocks·H, H) in the products' dtype;
// `rbias` (blocks·H,) float or none; H_0 (B, H), S_0 (B, H) float; up to `threads` threads.
// Returns saved (steps, kSaved·H, B) float, Hs (steps + 1, H, B) in W_hT's dtype, Ss (steps + 1, H, B) float.
template <typename Cell>
std::vector<at::Tensor> forward(const std::optional<at::Tensor>& table, const std::optional<at::Tensor>& ids, const std::optional<at::Tensor>& XT,
                                const std::optional<at::Tensor>& W_xT, const std::optional<at::Tensor>& bias, const at::Tensor& W_hT,
                                const std::optional<at::Tensor>& rbias, const at::Tensor& H_0, const at::Tensor& S_0, int64_t threads) {
  constexpr int64_t G = Cell::kBlocks;
  TORCH_CHECK(W_hT.is_contiguous() && W_hT.dim() == 2 && W_hT.size(0) == G * W_hT.size(1), "W_hT must be contiguous (blocks·H, H)");
  TORCH_CHECK(H_0.dim() == 2 && S_0.sizes() == H_0.sizes() && H_0.size(1) == W_hT.size(1), "H_0 and S_0 must be (B, H)");
  TORCH_CHECK(S_0.scalar_type() == at::kFloat, "S_0 must be float");
  const int64_t rows = W_hT.size(0), batch = H_0.size(0);
  TORCH_CHECK(!rbias || (rbias->scalar_type() == at::kFloat && rbias->is_contiguous() && rbias->numel() == rows), "rbias must be contiguous float (blocks·H,)");
  if (table) {
    TORCH_CHECK(ids && !XT && !W_xT && !bias, "either ids and a table, or XT, W_xT and a bias");
    TORCH_CHECK(table->scalar_type() == at::kFloat && table->is_contiguous() && table->size(0) == rows, "table must be contiguous float (blocks·H, vocab)");
    TORCH_CHECK(ids->scalar_type() == at::kLong && ids->is_contiguous() && ids->dim() == 2 && ids->size(1) == batch, "ids must be contiguous int64 (steps, B)");
  } else {
    TORCH_CHECK(XT && W_xT && bias && !ids, "either ids and a table, or XT, W_xT and a bias");
    TORCH_CHECK(XT->is_contiguous() && XT->dim() == 3 && XT->size(2) == batch && XT->scalar_type() == W_hT.scalar_type(), "XT must be contiguous (steps, inputs, B) in W_hT's dtype");
    TORCH_CHECK(W_xT->is_contiguous() && W_xT->size(0) == rows && W_xT->size(1) == XT->size(1) && W_xT->scalar_type() == W_hT.scalar_type(),
                "W_xT must be contiguous (blocks·H, inputs) in W_hT's dtype");
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == rows, "bias must be contiguous float (blocks·H,)");
  }
  at::NoGradGuard no_grad;
  if (W_hT.scalar_type() == at::kBFloat16) return forward_typed<Cell, bf16>(table, ids, XT, W_xT, bias, W_hT, rbias, H_0, S_0, threads);
  TORCH_CHECK(W_hT.scalar_type() == at::kFloat, "W_hT must be float or bfloat16");
  return forward_typed<Cell, float>(table, ids, XT, W_xT, bias, W_hT, rbias, H_0, S_0, threads);
}

// ---- backward ---------------------------------------------------------------------------------

template <typename Cell, typename P>
std::vector<at::Tensor> backward_typed(const at::Tensor& dHs, const at::Tensor& dS_T, const at::Tensor& saved, const at::Tensor& Ss, const at::Tensor& W_h,
                                       int64_t threads) {
  constexpr int64_t G = Cell::kBlocks;
  const int64_t steps = dHs.size(0), hiddens = dHs.size(1), batch = dHs.size(2), rows = G * hiddens, n = hiddens * batch;
  const bool mixed = W_h.scalar_type() != at::kFloat;
  const auto fp32 = dHs.options();
  at::Tensor dAx = at::empty({rows, steps, batch}, fp32);
  at::Tensor dAx_c = mixed ? at::empty({rows, steps, batch}, W_h.options()) : dAx;
  at::Tensor dAh = Cell::kSplitGrad ? at::empty({rows, steps, batch}, fp32) : dAx;
  at::Tensor dAh_c = !Cell::kSplitGrad ? dAx_c : mixed ? at::empty({rows, steps, batch}, W_h.options()) : dAh;
  // a step's dAh as the next product reads them: two, so that step t-1's product reads one
  // while the parts write the other (the parts meet once a step)
  const at::Tensor next[2] = {at::empty({rows, batch}, W_h.options()), at::empty({rows, batch}, W_h.options())};
  at::Tensor carry = dS_T.defined() ? dS_T.t().to(at::kFloat).contiguous() : at::zeros({hiddens, batch}, fp32);
  const int64_t parts = parts_for(threads, hiddens);
  const float* saved_ = data<float>(saved);
  const float* S = data<float>(Ss);
  const float* dH_out = data<float>(dHs);
  std::vector<Products<P>> products(parts);
  in_parts(parts, steps, true, [&](int64_t p, int64_t t) {
    const Units u = units_of(p, parts, hiddens);
    Backward<P> b{hiddens, batch, steps, t, u, saved_ + t * Cell::kSaved * n, S + t * n, S + (t + 1) * n, dH_out + t * n, nullptr,
                  data<float>(carry), data<float>(dAx), data<P>(dAx_c), data<float>(dAh), data<P>(dAh_c), data<P>(next[t % 2])};
    if (t == steps - 1) {
      Cell::template backward<P, true>(b);
      return;
    }
    b.product = products[p].times(W_h.narrow(0, u.u0, u.size()), next[(t + 1) % 2], false);  // W_h dAh_{t+1}ᵀ, the part's units
    Cell::template backward<P, false>(b);
  });
  return {dAx, dAx_c, dAh, dAh_c, carry};
}

// dHs (steps, H, B) float: dL/dH_tᵀ from above; dS_T (B, H) or undefined: dL/dS_T; saved and Ss
// as forward left them; W_h (H, blocks·H) contiguous in the products' dtype; up to `threads`
// threads. Returns dAx (blocks·H, steps, B) float: dL/d(the input's pre-activations), the same in
// W_h's dtype, dAh and its copy (what reaches W_h; dAx itself but for a kSplitGrad cell), and the
// carry left at step 0 (H, B): the part of dL/dS_0 that did not go through the product.
template <typename Cell>
std::vector<at::Tensor> backward(const at::Tensor& dHs, const std::optional<at::Tensor>& dS_T, const at::Tensor& saved, const at::Tensor& Ss,
                                 const at::Tensor& W_h, int64_t threads) {
  TORCH_CHECK(saved.scalar_type() == at::kFloat && saved.is_contiguous(), "saved must be contiguous float");
  TORCH_CHECK(dHs.scalar_type() == at::kFloat && dHs.is_contiguous() && dHs.size(0) == saved.size(0), "dHs must be contiguous float (steps, H, B)");
  TORCH_CHECK(Ss.is_contiguous() && Ss.scalar_type() == at::kFloat && W_h.is_contiguous(), "Ss must be contiguous float, W_h contiguous");
  TORCH_CHECK(W_h.size(1) == Cell::kBlocks * W_h.size(0) && W_h.size(0) == dHs.size(1), "W_h must be (H, blocks·H)");
  at::NoGradGuard no_grad;
  const at::Tensor dS = dS_T ? *dS_T : at::Tensor();
  if (W_h.scalar_type() == at::kBFloat16) return backward_typed<Cell, bf16>(dHs, dS, saved, Ss, W_h, threads);
  TORCH_CHECK(W_h.scalar_type() == at::kFloat, "W_h must be float or bfloat16");
  return backward_typed<Cell, float>(dHs, dS, saved, Ss, W_h, threads);
}

// ---- generation: one character at a time ------------------------------------------------------
//
// generate.Stepper's step, batch-major, in place on its buffers: per layer k, P[k] (batch, in_k +
// blocks·H) = [H_t, 1] [[W_in, W_h], [b_in, b_h]] holds the reader's input H_t W_in + b_in and
// this layer's next recurrent term H_t W_h + b_h side by side (the last layer's reader is the
// output layer: its part of P is the logits). A step runs the cell on the layer's input and its
// recurrent term, and multiplies [H_t, 1] once. Nothing is allocated but the products' outputs.

// C = A W for a step, A (batch, K) in fp32, W (K, N) packed in panels (below), C (batch, N), in P; each
// element one chain of fused multiply-adds over k in order, from 0, in fp32. So a row's result is
// the same bits whatever the batch around it: a stream that joins or leaves a batch (the server's
// continuous batching) writes the characters it would write alone. torch's product is not: its
// kernel, and so its order of sums, changes with the batch's size (measured: batch 1, 2, 3, 5, 6,
// 7 differ from 64 in the last bits, and a near tie then picks another character). The tiles
// below choose only which sums share the registers, never a sum's order: free to fit the machine.
//
// W comes packed once (generate.Stepper): panel j holds columns [j·kCols, (j+1)·kCols), the last
// padded with zeros, as strips of kSub columns one after the other, each a contiguous (K, kSub)
// block. A tile of several rows reads one strip: one stream of memory, a line a k, where W's own
// rows put each piece a whole row of N apart (at d2l's size more than a page, where the
// hardware's prefetcher stops following), and panels stored (K, kCols) put a strip's lines
// kCols apart, a new page every few k (strips made the Shakespeare 1×768 step of 32 rows on one
// core 1.07× as fast again, one row's 1.03×). A single row's tile reads a panel's strips side by
// side.
//
// Batch 1 is a product of a vector, bound by reading W: a 1 × kCols tile keeps kCols / lanes
// independent chains, enough to hide a multiply-add's latency. A larger batch is bound by the
// arithmetic: kRows × kSub tiles, two vectors wide, keep 2·kRows chains in registers, where
// rows × kCols would spill them (16 vector registers in AVX2).
constexpr int64_t kCols = 64, kRows = 6;

// The vector unit the tiles are written for: its width in floats, and a load that widens a pair
// of vectors' worth of bf16.
#if defined(__AVX512F__)
struct Lanes {
  using V = __m512;
  static constexpr int64_t n = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V broadcast(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void load_pair(const bf16* p, V& low, V& high) {  // 2n bf16 stored as `pack` interleaves them
    const __m512i x = _mm512_loadu_si512(p);
    low = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    high = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void store(bf16* p, V v) {  // rounded as from_float<bf16> rounds each
    const __m512i x = _mm512_castps_si512(v), odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
  }
};
#define LSTMLM_LANES 1
#elif defined(__AVX2__) && defined(__FMA__)
struct Lanes {
  using V = __m256;
  static constexpr int64_t n = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V broadcast(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void load_pair(const bf16* p, V& low, V& high) {  // 2n bf16 stored as `pack` interleaves them
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    low = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
    high = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void store(bf16* p, V v) {  // rounded as from_float<bf16> rounds each
    const __m256i x = _mm256_castps_si256(v), odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));  // each under 2^16: exact
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), halves);
  }
};
#define LSTMLM_LANES 1
#else
struct Lanes {
  static constexpr int64_t n = 4;  // no vector unit named: plain fmaf, the compiler's to vectorize
};
#endif
constexpr int64_t kSub = 2 * Lanes::n;

// Rows [0, R) of A times columns [0, C) of a panel from its strip at W (each strip K rows of kSub,
// the next K·kSub further on), into out (row stride N), of which the first n columns are kept.
template <typename P, int64_t R, int64_t C>
inline void tile(const float* A, int64_t K, const P* W, P* out, int64_t N, int64_t n) {
  float sums[R][C];
#ifdef LSTMLM_LANES
  constexpr int64_t V = C / Lanes::n;
  typename Lanes::V acc[R][V];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) acc[r][v] = Lanes::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename Lanes::V w[V];
    // A strip's next lines, asked for 8 k ahead: the prefetcher does not cross a page. With
    // panels stored (K, kCols), a strip's lines kCols apart, this made the Shakespeare 1×768
    // step of 32 rows on one core 1.19× as fast; with strips contiguous, 1.02× (a single row's
    // tile ran slower with it, so it does not).
    if constexpr (R > 1) __builtin_prefetch(W + (k + 8) * kSub);
    if constexpr (std::is_same_v<P, bf16>) {
      for (int64_t v = 0; v < V; v += 2) Lanes::load_pair(W + v / 2 * K * kSub + k * kSub, w[v], w[v + 1]);
    } else {
      for (int64_t v = 0; v < V; ++v) w[v] = Lanes::load(W + v / 2 * K * kSub + k * kSub + v % 2 * Lanes::n);
    }
    for (int64_t r = 0; r < R; ++r) {
      const typename Lanes::V a = Lanes::broadcast(A[r * K + k]);
      for (int64_t v = 0; v < V; ++v) acc[r][v] = Lanes::fma(a, w[v], acc[r][v]);
    }
  }
  if (n >= C) {  // a whole tile: straight from the registers to its place (a pass through `sums` cost a tenth of the step)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) Lanes::store(out + r * N + v * Lanes::n, acc[r][v]);
    return;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t v = 0; v < V; ++v) Lanes::store(sums[r] + v * Lanes::n, acc[r][v]);
#else
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < C; ++j) sums[r][j] = 0.0f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < R; ++r) {
      const float a = A[r * K + k];
      for (int64_t j = 0; j < C; ++j) sums[r][j] = __builtin_fmaf(a, to_float(W[j / kSub * K * kSub + k * kSub + j % kSub]), sums[r][j]);
    }
#endif
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < std::min(C, n); ++j) out[r * N + j] = from_float<P>(sums[r][j]);
}

// Rows [0, R) of A times a panel's strips [s0, s1) of kSub columns.
template <typename P, int64_t R>
inline void panel_rows(const float* A, int64_t K, const P* W, P* out, int64_t N, int64_t n, int64_t s0, int64_t s1) {
  for (int64_t s = s0 * kSub; s < std::min(n, s1 * kSub); s += kSub) tile<P, R, kSub>(A, K, W + s * K, out + s, N, n - s);
}

// A single row's product is bound by reading W: the cores share it by panels, each one wide
// tile (kCols / lanes chains of multiply-adds). A batch's is bound by the arithmetic: the cores
// share its columns by strips of kSub, so that each gets as many (by panels, d2l's 1,052
// columns, 17 panels the last of 28, split 576 and 476, and the core with more set the pace).
template <typename P>
void rows_times(const float* a, int64_t batch, int64_t K, const at::Tensor& W, const at::Tensor& C) {
  const int64_t N = C.size(1);
  const P* w = data<P>(W);
  P* c = data<P>(C);
  if (batch == 1) {
    at::parallel_for(0, W.size(0), 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) tile<P, 1, kCols>(a, K, w + j * K * kCols, c + j * kCols, N, std::min(kCols, N - j * kCols));
    });
    return;
  }
  constexpr int64_t per_panel = kCols / kSub;
  // The rows in blocks of as even a size as kRows allows (32: 6, 6, 5, 5, 5, 5, not five of 6
  // and one of 2): a block of few rows has too few chains of multiply-adds to hide their latency.
  const int64_t blocks = (batch + kRows - 1) / kRows, fewer = batch / std::max(blocks, int64_t{1}), more = batch % std::max(blocks, int64_t{1});
  const auto rows_in = [&](int64_t block) { return fewer + (block < more); };
  at::parallel_for(0, (N + kSub - 1) / kSub, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t j = u0 / per_panel; j * per_panel < u1; ++j) {
      const int64_t s0 = std::max(u0 - j * per_panel, int64_t{0}), s1 = std::min(u1 - j * per_panel, per_panel);  // this core's strips of panel j
      const int64_t n0 = j * kCols, n = std::min(kCols, N - n0);
      const P* panel = w + j * K * kCols;
      for (int64_t block = 0, r0 = 0; block < blocks; r0 += rows_in(block), ++block) {
        const float* ar = a + r0 * K;
        P* out = c + r0 * N + n0;
        switch (rows_in(block)) {
          case 1: panel_rows<P, 1>(ar, K, panel, out, N, n, s0, s1); break;
          case 2: panel_rows<P, 2>(ar, K, panel, out, N, n, s0, s1); break;
          case 3: panel_rows<P, 3>(ar, K, panel, out, N, n, s0, s1); break;
          case 4: panel_rows<P, 4>(ar, K, panel, out, N, n, s0, s1); break;
          case 5: panel_rows<P, 5>(ar, K, panel, out, N, n, s0, s1); break;
          default: panel_rows<P, 6>(ar, K, panel, out, N, n, s0, s1);
        }
      }
    }
  });
}

// W (K, N) as the step reads it (see above): shaped (⌈N / kCols⌉, K, kCols), panel j holding
// columns [j·kCols, (j+1)·kCols), the last padded with zeros, in memory as its kCols / kSub
// strips, each (K, kSub), one after the other. In bf16 each strip's kSub columns are stored
// interleaved, column i at 2i and column n + i at 2i + 1 (n: the lanes of a vector), so that one
// load, a shift and a mask widen two vectors of them (`Lanes::load_pair`); widening each half
// took a shuffle, which the vector unit does one a cycle, and a step of one row then ran slower
// in bf16 than in fp32. Only the order in memory changes: every sum is the same.
at::Tensor pack(const at::Tensor& W) {
  TORCH_CHECK(W.dim() == 2 && (W.scalar_type() == at::kFloat || W.scalar_type() == at::kBFloat16), "W must be (K, N), float or bfloat16");
  const int64_t K = W.size(0), N = W.size(1), panels = (N + kCols - 1) / kCols;
  constexpr int64_t strips = kCols / kSub;
  at::Tensor packed = at::constant_pad_nd(W, {0, panels * kCols - N}).reshape({K, panels, strips, kSub}).permute({1, 2, 0, 3});  // (panels, strips, K, kSub)
#ifdef LSTMLM_LANES
  if (W.scalar_type() == at::kBFloat16) packed = packed.reshape({panels, strips, K, 2, Lanes::n}).transpose(3, 4);
#endif
  return packed.contiguous().reshape({panels, K, kCols});
}

// C = A W by the step's product, A (batch, K) float, W packed, C (batch, N) contiguous in W's
// dtype: the stepper's first product, from a given state (generate.Stepper), so that a row primed
// with others starts from the bits it starts from alone, as every step after keeps it. torch's
// product rounds otherwise at another batch (fp32 at 7 rows and more against 1, in the last bit).
void times(const at::Tensor& A, const at::Tensor& W, const at::Tensor& C) {
  TORCH_CHECK(A.scalar_type() == at::kFloat && A.is_contiguous() && A.dim() == 2, "A must be contiguous float (batch, K)");
  TORCH_CHECK(C.is_contiguous() && C.dim() == 2 && C.size(0) == A.size(0) && C.scalar_type() == W.scalar_type(), "C must be contiguous (batch, N) in W's dtype");
  TORCH_CHECK(W.is_contiguous() && W.dim() == 3 && W.size(1) == A.size(1) && W.size(2) == kCols && W.size(0) == (C.size(1) + kCols - 1) / kCols,
              "W must be packed: contiguous (panels, K, 64)");
  at::NoGradGuard no_grad;
  if (W.scalar_type() == at::kBFloat16) return rows_times<bf16>(data<float>(A), A.size(0), A.size(1), W, C);
  TORCH_CHECK(W.scalar_type() == at::kFloat, "W must be float or bfloat16");
  rows_times<float>(data<float>(A), A.size(0), A.size(1), W, C);
}

template <typename Cell, typename P>
void step_typed(const int64_t* ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList S) {
  const int64_t batch = H1[0].size(0), hiddens = H1[0].size(1) - 1, K = hiddens + 1, rows = Cell::kBlocks * hiddens;
  // In bf16 the product reads [H_t, 1] widened to fp32 (exactly), each row by the thread that
  // wrote it: a tile then broadcasts each element with one load, where widening it there took
  // four instructions for every row of every tile, and the d2l step of 64 rows ran at half fp32's rate.
  thread_local std::vector<float> widened;
  if constexpr (!std::is_same_v<P, float>) widened.resize(batch * K);
  float* wide = widened.data();  // this thread's buffer: in the lambda below `widened` would be each worker's own
  for (size_t k = 0; k < W.size(); ++k) {
    const int64_t width = Pk[k].size(1), in = width - rows;  // P[k]: the reader's input, then the recurrent term
    const int64_t below = k == 0 ? rows : Pk[k - 1].size(1);  // a row's stride in what the layer reads
    const P* reads = k == 0 ? data<P>(table) : data<P>(Pk[k - 1]);
    P *const products = data<P>(Pk[k]), *const H1k = data<P>(H1[k]);
    float* const Sk = data<float>(S[k]);
    at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {  // rows on the cores where there are enough of them
      for (int64_t b = begin; b < end; ++b) {
        const P* input = reads + (k == 0 ? ids[b] : b) * below;
        P* H = H1k + b * K;
        Cell::row(products + b * width + in, input, Sk + b * hiddens, H, hiddens);
        if constexpr (!std::is_same_v<P, float>)
          for (int64_t j = 0; j < K; ++j) wide[b * K + j] = to_float(H[j]);
      }
    });
    const float* A = std::is_same_v<P, float> ? reinterpret_cast<const float*>(data<P>(H1[k])) : wide;
    rows_times<P>(A, batch, K, W[k], Pk[k]);  // [H_t, 1] times everything that reads H_t
  }
}

inline void check_stepper(int64_t blocks, const at::Tensor& ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk,
                          at::TensorList S) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.dim() == 1, "ids must be contiguous int64 (batch,)");
  TORCH_CHECK(!W.empty() && W.size() == H1.size() && W.size() == Pk.size() && W.size() == S.size(), "one W, H1, P and S a layer");
  TORCH_CHECK(table.is_contiguous() && table.dim() == 2 && table.size(1) == blocks * (H1[0].size(1) - 1), "table must be contiguous (vocab, blocks·H)");
  for (size_t k = 0; k < W.size(); ++k) {
    TORCH_CHECK(W[k].scalar_type() == table.scalar_type() && H1[k].scalar_type() == table.scalar_type() && Pk[k].scalar_type() == table.scalar_type(),
                "W, H1, P and the table share one dtype");
    TORCH_CHECK(H1[k].is_contiguous() && Pk[k].is_contiguous() && S[k].is_contiguous() && S[k].scalar_type() == at::kFloat, "contiguous buffers, S in float");
    TORCH_CHECK(H1[k].size(0) == ids.size(0), "one id a row");
    TORCH_CHECK(W[k].is_contiguous() && W[k].dim() == 3 && W[k].size(1) == H1[k].size(1) && W[k].size(2) == kCols &&
                    W[k].size(0) == (Pk[k].size(1) + kCols - 1) / kCols,
                "W must be packed: contiguous (panels, H + 1, 64)");
  }
}

template <typename Cell>
void dispatch_step(const int64_t* ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList S) {
  if (table.scalar_type() == at::kBFloat16) return step_typed<Cell, bf16>(ids, table, W, H1, Pk, S);
  TORCH_CHECK(table.scalar_type() == at::kFloat, "the stepper's dtype must be float or bfloat16");
  step_typed<Cell, float>(ids, table, W, H1, Pk, S);
}

// One step: ids (batch,) are the characters read; afterwards the last P holds the next logits.
template <typename Cell>
void step(const at::Tensor& ids, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk, at::TensorList S) {
  check_stepper(Cell::kBlocks, ids, table, W, H1, Pk, S);
  at::NoGradGuard no_grad;
  dispatch_step<Cell>(data<int64_t>(ids), table, W, H1, Pk, S);
}

// `steps` greedy characters after reading ids (batch,): d2l's predict, the argmax fed back.
// Returns them, (steps, batch); the state and the last P are those after the last one read.
template <typename Cell>
at::Tensor greedy(const at::Tensor& ids, int64_t steps, int64_t vocab, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk,
                  at::TensorList S) {
  check_stepper(Cell::kBlocks, ids, table, W, H1, Pk, S);
  at::NoGradGuard no_grad;
  const int64_t batch = ids.size(0);
  at::Tensor chosen = at::empty({steps, batch}, ids.options());
  std::vector<int64_t> X(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + batch);
  const at::Tensor& logits = Pk.back();  // (batch, vocab + blocks·H): the logits first
  for (int64_t t = 0; t < steps; ++t) {
    dispatch_step<Cell>(X.data(), table, W, H1, Pk, S);
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

// `steps` characters after reading ids (batch,), each row's chosen by its own sampling settings
// and fed back: Rows.choose a step at a time, in one call (csrc/choosing.cpp, after the cells).
template <typename Cell>
at::Tensor sample(const at::Tensor& ids, int64_t steps, int64_t vocab, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk,
                  at::TensorList S, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& greedy, const at::Tensor& uniforms, const at::Tensor& used);

}  // namespace lstmlm

namespace lstmlm {

// dW_x of a layer that reads ids: X_t is one-hot, so dW_x is no product, only sums. dA (rows, N)
// float or bfloat16, the gradient of the input's pre-activations at each of N positions; ids (N,)
// in [0, vocab). Returns (vocab, rows) float: row v sums dA's columns at the positions of id v, in
// their order. A row of dA at a time, its sums in a few registers' worth of floats: torch's
// index_add along dA's columns reads each column with a stride of N (0.7-1.0 ms at d2l's size on
// an AMD EPYC, AVX2, where this takes a fraction of it).
template <typename T, int64_t R>
inline void sum_rows(const T* a, int64_t N, int64_t n, const int64_t* id, float* sums) {
  if (n == R) {
    for (int64_t j = 0; j < N; ++j) {
      float* s = sums + id[j] * R;
      for (int64_t k = 0; k < R; ++k) s[k] += to_float(a[k * N + j]);
    }
  } else {
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < n; ++k) sums[id[j] * R + k] += to_float(a[k * N + j]);
  }
}

at::Tensor sum_by_id(const at::Tensor& dA, const at::Tensor& ids, int64_t vocab) {
  TORCH_CHECK(dA.dim() == 2 && dA.is_contiguous() && (dA.scalar_type() == at::kFloat || dA.scalar_type() == at::kBFloat16), "dA must be contiguous (rows, N) float or bfloat16");
  TORCH_CHECK(ids.dim() == 1 && ids.is_contiguous() && ids.scalar_type() == at::kLong && ids.size(0) == dA.size(1), "ids must be contiguous int64 (N,)");
  const int64_t rows = dA.size(0), N = dA.size(1);
  const int64_t* id = data<int64_t>(ids);
  for (int64_t j = 0; j < N; ++j) TORCH_CHECK(id[j] >= 0 && id[j] < vocab, "ids must lie in [0, vocab)");
  at::Tensor out = at::zeros({vocab, rows}, dA.options().dtype(at::kFloat));
  float* o = data<float>(out);
  constexpr int64_t R = 16;  // rows summed side by side: sixteen independent chains of adds, each in its row's order
  at::parallel_for(0, (rows + R - 1) / R, 2, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(vocab * R);  // sums[v·R + k]: row r0 + k's sum for id v
    for (int64_t r0 = begin * R; r0 < std::min(rows, end * R); r0 += R) {
      const int64_t n = std::min(R, rows - r0);
      std::fill(sums.begin(), sums.end(), 0.0f);
      if (dA.scalar_type() == at::kFloat)
        sum_rows<float, R>(data<float>(dA) + r0 * N, N, n, id, sums.data());
      else
        sum_rows<bf16, R>(data<bf16>(dA) + r0 * N, N, n, id, sums.data());
      for (int64_t v = 0; v < vocab; ++v)
        for (int64_t k = 0; k < n; ++k) o[v * rows + r0 + k] = sums[v * R + k];
    }
  });
  return out;
}

}  // namespace lstmlm

TORCH_LIBRARY_FRAGMENT(lstmlm_recurrence, m) {
  m.def("sum_by_id(Tensor dA, Tensor ids, int vocab) -> Tensor");
  m.def("pack(Tensor W) -> Tensor");
  m.def("times(Tensor A, Tensor W, Tensor(a!) C) -> ()");
}
TORCH_LIBRARY_IMPL(lstmlm_recurrence, CPU, m) {
  m.impl("sum_by_id", lstmlm::sum_by_id);
  m.impl("pack", lstmlm::pack);
  m.impl("times", lstmlm::times);
}

// A cell's five operations under its name: forward_lstm, backward_lstm, step_lstm, greedy_lstm, sample_lstm.
#define LSTMLM_CELL(NAME, CELL)                                                                                                                   \
  TORCH_LIBRARY_FRAGMENT(lstmlm_recurrence, m) {                                                                                                  \
    m.def("forward_" #NAME "(Tensor? table, Tensor? ids, Tensor? XT, Tensor? W_xT, Tensor? bias, Tensor W_hT, Tensor? rbias, Tensor H_0, "       \
          "Tensor S_0, int threads) -> Tensor[]");                                                                                               \
    m.def("backward_" #NAME "(Tensor dHs, Tensor? dS_T, Tensor saved, Tensor Ss, Tensor W_h, int threads) -> Tensor[]");                          \
    m.def("step_" #NAME "(Tensor ids, Tensor table, Tensor[] W, Tensor(a!)[] H1, Tensor(b!)[] P, Tensor(c!)[] S) -> ()");                         \
    m.def("greedy_" #NAME "(Tensor ids, int steps, int vocab, Tensor table, Tensor[] W, Tensor(a!)[] H1, Tensor(b!)[] P, Tensor(c!)[] S) -> Tensor"); \
    m.def("sample_" #NAME "(Tensor ids, int steps, int vocab, Tensor table, Tensor[] W, Tensor(a!)[] H1, Tensor(b!)[] P, Tensor(c!)[] S, "         \
          "Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor greedy, Tensor uniforms, Tensor used) -> Tensor");              \
  }                                                                                                                                               \
  TORCH_LIBRARY_IMPL(lstmlm_recurrence, CPU, m) {                                                                                                 \
    m.impl("forward_" #NAME, lstmlm::forward<CELL>);                                                                                             \
    m.impl("backward_" #NAME, lstmlm::backward<CELL>);                                                                                           \
    m.impl("step_" #NAME, lstmlm::step<CELL>);                                                                                                   \
    m.impl("greedy_" #NAME, lstmlm::greedy<CELL>);                                                                                               \
    m.impl("sample_" #NAME, lstmlm::sample<CELL>);                                                                                               \
  }

// Each cell's kernel follows, appended by lstmlm/native.py from lstmlm/cells/*.py.
