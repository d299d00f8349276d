// ---- choosing the next character (choosing.Rows on a CPU) -------------------------------------
//
// Rows.choose's pass, a row at a time: the characters in order of their logits (largest first,
// equal ones in vocabulary order), each weighed by exp((logit - the largest) / T); cut past top-k,
// past the point where the more likely ones hold top-p of the mass, and under min-p times the
// first's weight (which is 1); then the first whose running mass passes u times the mass kept. In
// Python that is fifteen torch operations on a (64, vocab) batch, a quarter of a millisecond a
// step; here it is a few microseconds. Each row reads only its own logits, settings and u, so it
// chooses what it would choose alone, whoever shares its batch.
//
// Every cut keeps a prefix of that order, and a trained model puts most of its mass on a few
// characters, so the order is found lazily: the next character is the largest of those left
// (a selection, vocab comparisons), as many times as the cuts and the draw read, not a whole sort.

namespace lstmlm {

// The characters of one row in order of weight, one at a time: `at(i)` is the i-th's weight.
struct Order {
  std::vector<float>& w;     // the weights, rearranged as they are selected
  std::vector<int64_t>& id;  // which character each is
  int64_t vocab, known = 0;  // the first `known` are in order

  float at(int64_t i) {
    for (; known <= i; ++known) {
      int64_t best = known;  // the largest weight left, the first in vocabulary order among equals
      for (int64_t j = known + 1; j < vocab; ++j)
        if (w[j] > w[best] || (w[j] == w[best] && id[j] < id[best])) best = j;
      std::swap(w[known], w[best]);
      std::swap(id[known], id[best]);
    }
    return w[i];
  }
};

inline int64_t choose_row(const float* x, int64_t vocab, float T, int64_t top_k, float top_p, float min_p, float u, std::vector<int64_t>& id,
                          std::vector<float>& w) {
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t v = 0; v < vocab; ++v) top = x[v] > top ? x[v] : top;  // NaN is never the largest
  float all = 0.0f;
  for (int64_t v = 0; v < vocab; ++v) {
    w[v] = x[v] == x[v] ? exp_((x[v] - top) / T) : 0.0f;  // relative to the largest: never overflows; NaN weighs nothing
    id[v] = v;
    all += w[v];
  }
  Order order{w, id, vocab};
  int64_t kept = top_k > 0 ? std::min(top_k, vocab) : vocab;  // the first `kept` in order survive the cuts
  if (kept < vocab) {
    all = 0.0f;
    for (int64_t i = 0; i < kept; ++i) all += order.at(i);
  }
  if (top_p < 1.0f) {  // cut where the mass before a character reaches top_p of it all (the first stays)
    float before = order.at(0);
    for (int64_t i = 1; i < kept; before += order.at(i), ++i)
      if (before >= top_p * all) {
        kept = i;
        break;
      }
  }
  if (min_p > 0.0f)  // weights fall along the order: those at least min_p are a prefix of it
    for (int64_t i = 1; i < kept; ++i)
      if (order.at(i) < min_p) kept = i;
  float total = all;
  if (kept < vocab || top_k > 0) {
    total = 0.0f;
    for (int64_t i = 0; i < kept; ++i) total += order.at(i);
  }
  const float target = std::min(u * total, std::nextafter(total, 0.0f));  // below the total: u·total can round up to it
  float running = 0.0f;
  int64_t last = 0;
  for (int64_t i = 0; i < kept; ++i) {
    const float weight = order.at(i);
    running += weight;
    if (weight > 0.0f) last = i;
    if (running > target) return id[i];  // the first whose running mass passes it: its weight is above 0
  }
  return id[last];  // the sums' order left the target above the running total (a rounding): the last with weight
}

inline int64_t argmax_row(const float* x, int64_t vocab) {
  int64_t best = 0;
  for (int64_t v = 1; v < vocab; ++v)  // the first of equal maxima, as torch.argmax
    if (x[v] > x[best]) best = v;
  return best;
}

// The settings (batch,) as Rows keeps them, and each row's uniforms (batch, n): row b's draws
// are uniforms[b, used[b]], uniforms[b, used[b] + 1], ..., one a step.
struct Settings {
  const float *T, *top_p, *min_p, *uniforms;
  const int64_t *top_k, *used;
  const bool* greedy;
  int64_t n;

  Settings(int64_t batch, const at::Tensor& temperature, const at::Tensor& top_k_, const at::Tensor& top_p_, const at::Tensor& min_p_,
           const at::Tensor& greedy_, const at::Tensor& uniforms_, const at::Tensor& used_) {
    for (const at::Tensor* t : {&temperature, &top_k_, &top_p_, &min_p_, &greedy_, &used_})
      TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && t->is_contiguous(), "one setting a row");
    TORCH_CHECK(uniforms_.dim() == 2 && uniforms_.size(0) == batch && uniforms_.size(1) > 0 && uniforms_.is_contiguous(), "a block of uniforms a row");
    TORCH_CHECK(temperature.scalar_type() == at::kFloat && top_p_.scalar_type() == at::kFloat && min_p_.scalar_type() == at::kFloat &&
                    uniforms_.scalar_type() == at::kFloat && top_k_.scalar_type() == at::kLong && used_.scalar_type() == at::kLong &&
                    greedy_.scalar_type() == at::kBool,
                "settings as Rows keeps them");
    T = data<float>(temperature), top_p = data<float>(top_p_), min_p = data<float>(min_p_), uniforms = data<float>(uniforms_);
    top_k = data<int64_t>(top_k_), used = data<int64_t>(used_), greedy = data<bool>(greedy_), n = uniforms_.size(1);
  }

  // Row b's choice from its logits x (vocab,) at its t-th draw from now.
  int64_t pick(const float* x, int64_t vocab, int64_t b, int64_t t, std::vector<int64_t>& id, std::vector<float>& w) const {
    if (greedy[b]) return argmax_row(x, vocab);
    const float u = uniforms[b * n + std::clamp<int64_t>(used[b] + t, 0, n - 1)];
    return choose_row(x, vocab, T[b], top_k[b], top_p[b], min_p[b], u, id, w);
  }
};

// logits (batch, vocab), rows contiguous, float or bfloat16; the settings and uniforms as
// `Settings` reads them. Returns the ids (batch,).
at::Tensor choose(const at::Tensor& logits, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& greedy, const at::Tensor& uniforms, const at::Tensor& used) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1, "logits must be (batch, vocab) with contiguous rows");
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "no characters to choose from");
  const Settings rows(batch, temperature, top_k, top_p, min_p, greedy, uniforms, used);
  const at::Tensor x = logits.scalar_type() == at::kFloat ? logits : logits.to(at::kFloat);
  at::Tensor chosen = at::empty({batch}, top_k.options());
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {  // rows on the cores where there are enough of them
    std::vector<int64_t> id(vocab);
    std::vector<float> w(vocab);
    for (int64_t b = begin; b < end; ++b) data<int64_t>(chosen)[b] = rows.pick(data<float>(x) + b * x.stride(0), vocab, b, 0, id, w);
  });
  return chosen;
}

// `steps` characters after reading ids (batch,), each row's chosen as `choose` chooses it and fed
// back: a chunk of a sampled generation in one call, where a step and a choice a character cost
// two calls and the Python between them (and, in the server, two waits for the interpreter's
// lock behind the thread that writes the streams). Row b draws uniforms[b, used[b] + t] at step t:
// the caller keeps `steps` of them ahead of `used` and moves `used` on. Returns (steps, batch).
template <typename Cell>
at::Tensor sample(const at::Tensor& ids, int64_t steps, int64_t vocab, const at::Tensor& table, at::TensorList W, at::TensorList H1, at::TensorList Pk,
                  at::TensorList S, const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p, const at::Tensor& min_p,
                  const at::Tensor& greedy, const at::Tensor& uniforms, const at::Tensor& used) {
  check_stepper(Cell::kBlocks, ids, table, W, H1, Pk, S);
  const int64_t batch = ids.size(0);
  const Settings rows(batch, temperature, top_k, top_p, min_p, greedy, uniforms, used);
  TORCH_CHECK(steps >= 0 && vocab > 0 && vocab <= Pk.back().size(1), "steps must be at least 0, vocab within the last P");
  for (int64_t b = 0; b < batch; ++b) TORCH_CHECK(rows.greedy[b] || rows.used[b] + steps <= rows.n, "a sampling row needs a uniform a step");
  at::NoGradGuard no_grad;
  at::Tensor chosen = at::empty({steps, batch}, ids.options());
  std::vector<int64_t> X(data<int64_t>(ids), data<int64_t>(ids) + batch);
  const at::Tensor& logits = Pk.back();  // (batch, vocab + blocks·H): the logits first
  const bool wide = logits.scalar_type() == at::kFloat;
  const int64_t stride = logits.size(1);
  for (int64_t t = 0; t < steps; ++t) {
    dispatch_step<Cell>(X.data(), table, W, H1, Pk, S);
    at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {  // rows on the cores where there are enough of them
      std::vector<int64_t> id(vocab);
      std::vector<float> w(vocab), x(vocab);
      const float* f32 = wide ? data<float>(logits) : nullptr;
      const bf16* b16 = wide ? nullptr : data<bf16>(logits);
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t v = 0; v < vocab; ++v) x[v] = wide ? f32[b * stride + v] : to_float(b16[b * stride + v]);
        X[b] = rows.pick(x.data(), vocab, b, t, id, w);
        data<int64_t>(chosen)[t * batch + b] = X[b];
      }
    });
  }
  return chosen;
}

}  // namespace lstmlm

TORCH_LIBRARY_FRAGMENT(lstmlm_recurrence, m) {
  m.def("choose(Tensor logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor greedy, Tensor uniforms, Tensor used) -> Tensor");
}
TORCH_LIBRARY_IMPL(lstmlm_recurrence, CPU, m) { m.impl("choose", lstmlm::choose); }
