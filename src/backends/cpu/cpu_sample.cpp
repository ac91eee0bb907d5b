// Token sampling, the reference of Backend::sample (the algorithm is spelled out in ops/backend.h).
// Written for clarity first, but it also serves every decode step of the host Sampler, so it
// avoids a full sort: top-k is one nth_element over the values, top-p buckets the mass by the top
// bits of e and sorts only the bucket where the cumulative mass crosses (~2 ms for 152K tokens).
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

  // 2. unnormalized probabilities e = exp((l - max) / T), e_max = 1.
  thread_local std::vector<float> lc, e, pool;
  thread_local std::vector<uint8_t> kept;
  thread_local std::vector<int32_t> order;
  thread_local std::vector<double> bucket_mass;
  lc.resize(n);
  e.resize(n);
  kept.assign(n, 1);
  const float temp = row.temperature;
  for (int64_t i = 0; i < n; ++i) {
    const float x = lc[i] = canon(logits[i]);
    const float d = x == l_max ? 0.0f : (x - l_max) / temp;
    e[i] = static_cast<float>(std::exp(static_cast<double>(d)));
  }

  // 3. top-k by (logit desc, id asc): every logit above the k-th largest value, then the ties at
  // it in id order until k are kept.
  if (row.top_k > 0 && row.top_k < n) {
    pool.assign(lc.begin(), lc.end());
    std::nth_element(pool.begin(), pool.begin() + (row.top_k - 1), pool.end(), std::greater<float>());
    const float kv = pool[row.top_k - 1];
    int64_t ties_left = row.top_k;
    for (int64_t i = 0; i < n; ++i) ties_left -= lc[i] > kv;
    for (int64_t i = 0; i < n; ++i) {
      const bool tie = lc[i] == kv && ties_left > 0;
      ties_left -= tie;
      kept[i] = lc[i] > kv || tie;
    }
  }

  // 4. top-p: the largest τ among the survivors with Σ_{e >= τ} e >= top_p · M_K. The survivors'
  // mass is bucketed by the top bits of e (non-negative floats order like their bits); only the
  // bucket where the cumulative mass crosses is sorted.
  if (row.top_p < 1.0f) {
    constexpr int kShift = 20;  // 4096 buckets, 8 per octave of e
    bucket_mass.assign(size_t{1} << (32 - kShift), 0.0);
    double mass = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (!kept[i]) continue;
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
      for (int64_t i = 0; i < n; ++i)
        if (kept[i] && e[i] > 0.0f && (std::bit_cast<uint32_t>(e[i]) >> kShift) == static_cast<uint32_t>(b))
          order.push_back(static_cast<int32_t>(i));
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
    for (int64_t i = 0; i < n; ++i) kept[i] = kept[i] && e[i] >= tau;
  }

  // 5. min-p relative to the top token (e_max = 1).
  if (row.min_p > 0.0f)
    for (int64_t i = 0; i < n; ++i) kept[i] = kept[i] && e[i] >= row.min_p;

  // 6. inverse CDF over the kept tokens in id order.
  double mass = 0.0;
  int32_t last = best;  // the top token always survives every filter
  int64_t n_kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!kept[i] || e[i] == 0.0f) continue;
    mass += e[i];
    last = static_cast<int32_t>(i);
    ++n_kept;
  }
  const float u = sample_uniform(row.seed, row.step);
  const double target = static_cast<double>(u) * mass;
  int32_t pick = last;
  double cum = 0.0, cum_before = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!kept[i] || e[i] == 0.0f) continue;
    cum_before = cum;
    cum += e[i];
    if (cum > target) {
      pick = static_cast<int32_t>(i);
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
