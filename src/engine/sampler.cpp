#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/check.h"

namespace cpinfer {

void SamplingParams::validate() const {
  CPI_CHECK(std::isfinite(temperature) && temperature >= 0.0f, "temperature must be >= 0, got ", temperature);
  CPI_CHECK(std::isfinite(top_p) && top_p > 0.0f && top_p <= 1.0f, "top_p must be in (0, 1], got ", top_p);
  CPI_CHECK(std::isfinite(min_p) && min_p >= 0.0f && min_p <= 1.0f, "min_p must be in [0, 1], got ", min_p);
  CPI_CHECK(top_k >= -1, "top_k must be -1 (off) or >= 1, got ", top_k);
}

int32_t argmax(std::span<const float> v) {
  CPI_CHECK(!v.empty(), "argmax of an empty row");
  size_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[best]) best = i;
  return static_cast<int32_t>(best);
}

Sampler::Sampler(const SamplingParams& p) : p_(p), rng_(p.seed ? *p.seed : std::random_device{}()) { p_.validate(); }

int32_t Sampler::sample(std::span<const float> logits) {
  if (p_.greedy()) return argmax(logits);
  const size_t n = logits.size();
  const double inv_t = 1.0 / p_.temperature;
  // Without top-k or top-p no ordering is needed: one pass for the softmax (min-p is a threshold on
  // it), one for the draw. Sorting 150K logits per token costs more than the rest of a decode step
  // of a small model.
  if (p_.top_k <= 0 && p_.top_p >= 1.0f) {
    const double mx = logits[argmax(logits)];
    std::vector<double> prob(n);
    double sum = 0;
    for (size_t i = 0; i < n; ++i) sum += prob[i] = std::exp((logits[i] - mx) * inv_t);
    const double thr = p_.min_p > 0.0f ? p_.min_p * (1.0 / sum) : 0.0;  // the top token's probability is 1/sum
    double mass = 0;
    for (size_t i = 0; i < n; ++i) {
      if (prob[i] / sum < thr) prob[i] = 0;
      mass += prob[i];
    }
    double r = std::uniform_real_distribution<double>(0.0, mass)(rng_);
    size_t last = 0;
    for (size_t i = 0; i < n; ++i) {
      if (prob[i] == 0) continue;
      last = i;
      r -= prob[i];
      if (r < 0) return static_cast<int32_t>(i);
    }
    return static_cast<int32_t>(last);
  }
  // Candidates sorted by logit, descending (ties: lower id first, for determinism).
  std::vector<int32_t> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  size_t keep = n;
  if (p_.top_k > 0) keep = std::min<size_t>(keep, static_cast<size_t>(p_.top_k));
  auto cmp = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (keep < n) {
    std::partial_sort(idx.begin(), idx.begin() + keep, idx.end(), cmp);
    idx.resize(keep);
  } else {
    std::sort(idx.begin(), idx.end(), cmp);
  }
  // Softmax with temperature over the kept candidates, in double.
  const double mx = logits[idx[0]];
  std::vector<double> prob(idx.size());
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i) sum += prob[i] = std::exp((logits[idx[i]] - mx) * inv_t);
  for (double& q : prob) q /= sum;
  // min-p: drop tokens below min_p times the top probability.
  size_t cut = prob.size();
  if (p_.min_p > 0.0f) {
    double thr = p_.min_p * prob[0];
    cut = 1;
    while (cut < prob.size() && prob[cut] >= thr) ++cut;
  }
  // top-p: the smallest prefix whose mass reaches top_p.
  if (p_.top_p < 1.0f) {
    double acc = 0;
    size_t i = 0;
    for (; i < cut; ++i) {
      acc += prob[i];
      if (acc >= p_.top_p) {
        ++i;
        break;
      }
    }
    cut = std::max<size_t>(1, std::min(cut, i));
  }
  double mass = std::accumulate(prob.begin(), prob.begin() + cut, 0.0);
  double r = std::uniform_real_distribution<double>(0.0, mass)(rng_);
  for (size_t i = 0; i < cut; ++i) {
    r -= prob[i];
    if (r < 0) return idx[i];
  }
  return idx[cut - 1];
}

}  // namespace cpinfer
