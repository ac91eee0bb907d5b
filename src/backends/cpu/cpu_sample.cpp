// Token sampling, the reference of Backend::sample (the algorithm is spelled out in ops/backend.h).
// Written for clarity first, but it also serves every decode step of the CPU back-end and the host
// Sampler, so it avoids a full sort: top-k runs first (the k largest through a small heap, one pass)
// and e is computed only for its survivors, top-p buckets the mass by the top bits of e and sorts
// only the bucket where the cumulative mass crosses.
#include <algorithm>
#include <bit>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_common.h"
#include "ops/contract.h"

namespace cpinfer {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// SplitMix64's output function (Steele, Lea, Flood 2014).
uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// NaN ranks as -inf; -0 as +0 (so that equal values are equal keys on every back-end).
float canon(float x) { return std::isnan(x) ? kNegInf : (x == 0.0f ? 0.0f : x); }

// The k-th largest of v (counted with multiplicity), 0 < k < v.size(): for small k one pass that
// keeps the k largest so far in a min-heap (most values fail the first comparison), else
// nth_element over a copy.
float kth_largest(const std::vector<float>& v, int64_t k, std::vector<float>& pool) {
  if (k > 4096) {
    pool.assign(v.begin(), v.end());
    std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), std::greater<float>());
    return pool[static_cast<size_t>(k - 1)];
  }
  pool.assign(v.begin(), v.begin() + k);
  std::make_heap(pool.begin(), pool.end(), std::greater<float>());
  for (size_t i = static_cast<size_t>(k); i < v.size(); ++i) {
    if (!(v[i] > pool.front())) continue;
    std::pop_heap(pool.begin(), pool.end(), std::greater<float>());
    pool.back() = v[i];
    std::push_heap(pool.begin(), pool.end(), std::greater<float>());
  }
  return pool.front();
}

}  // namespace

float sample_uniform(uint64_t seed, uint64_t step) {
  // Element `step` of the SplitMix64 stream whose state starts at mix64(seed): a pure function of
  // (seed, step), so any draw can be recomputed without replaying the ones before it.
  const uint64_t bits = mix64(mix64(seed) + (step + 1) * 0x9E3779B97F4A7C15ull);
  return static_cast<float>(bits >> 40) * 0x1p-24f;
}

int32_t sample_reference(std::span<const float> logits, const SampleRow& row, SampleTrace* trace) {
  const int64_t n = static_cast<int64_t>(logits.size());
  CPI_CHECK(n > 0, "sample: empty row of logits");
  CPI_CHECK(n <= std::numeric_limits<int32_t>::max(), "sample: ", n, " logits per row do not fit int32 ids");
  contract::sample_row(row, 0, "sample");
  if (trace) *trace = SampleTrace{};

  // 1. argmax (strict >: the first maximum wins; -inf never wins, so `best` stays -1 without one).
  int32_t best = -1;
  float l_max = kNegInf;
  for (int64_t i = 0; i < n; ++i) {
    const float x = canon(logits[i]);
    if (x > l_max) {
      l_max = x;
      best = static_cast<int32_t>(i);
    }
  }
  if (best < 0 || sample_row_greedy(row)) return best;

  // The survivors of the filters so far, in id order (every later step walks them in that order,
  // so its sums add the same terms in the same order as over the whole row).
  thread_local std::vector<float> lc, e, pool;
  thread_local std::vector<int32_t> surv, order;
  thread_local std::vector<double> bucket_mass;
  lc.resize(n);
  e.resize(n);
  for (int64_t i = 0; i < n; ++i) lc[i] = canon(logits[i]);
  auto keep_if = [&](auto pred) { std::erase_if(surv, [&](int32_t i) { return !pred(i); }); };

  // 3. top-k by (logit desc, id asc): every logit above the k-th largest value, then the ties at
  // it in id order until k are kept. (Before step 2: e is needed only for the survivors.)
  if (row.top_k > 0 && row.top_k < n) {
    const float kv = kth_largest(lc, row.top_k, pool);
    int64_t ties_left = row.top_k;
    for (int64_t i = 0; i < n; ++i) ties_left -= lc[i] > kv;
    surv.clear();
    for (int64_t i = 0; i < n; ++i)
      if (lc[i] > kv || (lc[i] == kv && ties_left-- > 0)) surv.push_back(static_cast<int32_t>(i));
  } else {
    surv.resize(static_cast<size_t>(n));
    std::iota(surv.begin(), surv.end(), 0);
  }

  // 2. unnormalized probabilities e = exp((l - max) / T), e_max = 1, of the survivors.
  const float temp = row.temperature;
  for (const int32_t i : surv) {
    const float x = lc[i];
    const float d = x == l_max ? 0.0f : (x - l_max) / temp;
    e[i] = static_cast<float>(std::exp(static_cast<double>(d)));
  }

  // 4. top-p: the largest τ among the survivors with Σ_{e >= τ} e >= top_p · M_K. The survivors'
  // mass is bucketed by the top bits of e (non-negative floats order like their bits); only the
  // bucket where the cumulative mass crosses is sorted.
  if (row.top_p < 1.0f) {
    constexpr int kShift = 20;  // 4096 buckets, 8 per octave of e
    bucket_mass.assign(size_t{1} << (32 - kShift), 0.0);
    double mass = 0.0;
    for (const int32_t i : surv) {
      mass += e[i];
      bucket_mass[std::bit_cast<uint32_t>(e[i]) >> kShift] += e[i];
    }
    const double target = static_cast<double>(row.top_p) * mass;
    float tau = 0.0f;  // no crossing (rounding only): keep every survivor
    double before_group = 0.0, with_group = mass, cum = 0.0;
    bool found = false;
    for (int64_t b = static_cast<int64_t>(bucket_mass.size()) - 1; b >= 0 && !found; --b) {
      if (bucket_mass[b] == 0.0) continue;
      if (cum + bucket_mass[b] < target) {
        cum += bucket_mass[b];
        continue;
      }
      order.clear();
      for (const int32_t i : surv)
        if (e[i] > 0.0f && (std::bit_cast<uint32_t>(e[i]) >> kShift) == static_cast<uint32_t>(b)) order.push_back(i);
      std::sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return e[x] > e[y]; });
      for (size_t g = 0; g < order.size() && !found;) {
        const float v = e[order[g]];
        const double cum0 = cum;
        for (; g < order.size() && e[order[g]] == v; ++g) cum += e[order[g]];
        if (cum >= target) {
          found = true;
          tau = v;
          before_group = cum0;
          with_group = cum;
        }
      }
      // Not crossed (the bucket's sum rounded differently): go on with the next bucket.
    }
    if (trace && mass > 0.0) trace->top_p_margin = std::min(target - before_group, with_group - target) / mass;
    keep_if([&](int32_t i) { return e[i] >= tau; });
  }

  // 5. min-p relative to the top token (e_max = 1).
  if (row.min_p > 0.0f) keep_if([&](int32_t i) { return e[i] >= row.min_p; });

  // 6. inverse CDF over the kept tokens (e > 0) in id order.
  keep_if([&](int32_t i) { return e[i] > 0.0f; });
  double mass = 0.0;
  for (const int32_t i : surv) mass += e[i];
  const int32_t last = surv.empty() ? best : surv.back();  // the top token always survives every filter
  const int64_t n_kept = static_cast<int64_t>(surv.size());
  const float u = sample_uniform(row.seed, row.step);
  const double target = static_cast<double>(u) * mass;
  int32_t pick = last;
  double cum = 0.0, cum_before = 0.0;
  for (const int32_t i : surv) {
    cum_before = cum;
    cum += e[i];
    if (cum > target) {
      pick = i;
      break;
    }
  }
  if (trace) {
    trace->u = u;
    trace->kept_mass = mass;
    trace->target = target;
    trace->n_kept = n_kept;
    trace->draw_margin = mass > 0.0 ? std::min(target - cum_before, cum - target) / mass : 1.0;
  }
  return pick;
}

// ---- the op

void CpuBackend::sample(const Tensor& logits, const std::vector<SampleRow>& rows, Tensor ids) {
  const char* op = "sample";
  contract::sample(logits, rows, ids);
  cpu::check_host(logits, op, "logits");
  cpu::check_host(ids, op, "ids");
  const int64_t r_count = logits.dim(0), v = logits.dim(1);
  const float* in = logits.ptr<const float>();
  int32_t* out = ids.ptr<int32_t>();
  const cpu::OmpBudget budget;
#pragma omp parallel for schedule(dynamic, 1) \
    num_threads(budget.threads()) if (r_count > 1 && r_count * v > cpu::kParallelMinElems)
  for (int64_t r = 0; r < r_count; ++r)
    out[r] = sample_reference(std::span<const float>(in + r * v, static_cast<size_t>(v)), rows[r]);
}

}  // namespace cpinfer
