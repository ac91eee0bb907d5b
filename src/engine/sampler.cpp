#include "engine/sampler.h"

#include <cmath>
#include <random>

#include "backends/cpu/cpu_backend.h"
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

namespace {

uint64_t fresh_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

}  // namespace

Sampler::Sampler(const SamplingParams& p) : p_(p) {
  p_.validate();
  seed_ = p_.seed ? *p_.seed : fresh_seed();
}

SampleRow Sampler::next_row() const {
  SampleRow r;
  r.temperature = p_.temperature;
  r.top_k = p_.top_k;
  r.top_p = p_.top_p;
  r.min_p = p_.min_p;
  r.seed = seed_;
  r.step = step_;
  return r;
}

int32_t Sampler::sample(std::span<const float> logits) {
  CPI_CHECK(!logits.empty(), "sampling from an empty row of logits");
  const int32_t id = sample_reference(logits, next_row());
  CPI_CHECK(id >= 0, "sampling: every one of the ", logits.size(),
            " logits is -inf or NaN (the model produced no usable distribution)");
  advance();
  return id;
}

}  // namespace cpinfer
