// Token sampling from a row of logits: greedy, temperature, top-k, top-p, min-p, seeded.
#pragma once
#include <cstdint>
#include <optional>
#include <span>

#include "ops/backend.h"

namespace cpinfer {

struct SamplingParams {
  float temperature = 1.0f;  // 0: greedy
  int top_k = -1;            // <= 0: off
  float top_p = 1.0f;        // 1: off
  float min_p = 0.0f;        // 0: off
  std::optional<uint64_t> seed;
  // Throws cpinfer::Error naming the parameter when a value is out of range.
  void validate() const;
  bool greedy() const { return temperature <= 0.0f || top_k == 1; }
};

// The sampler of one sequence. Draw number `step` (0, 1, 2 ... in the order tokens are drawn) is
// Backend::sample's algorithm (ops/backend.h) keyed by (seed, step), so the same seed gives the same
// tokens on any back-end and whichever process draws them. Without a seed in the parameters the
// sampler takes one from std::random_device, once, at construction.
class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  // Draws the next token from logits [V] (the host reference, backends/cpu) and advances the step.
  // Throws when no logit is above -inf (every one is -inf or NaN).
  int32_t sample(std::span<const float> logits);
  // The parameters of the next draw, for Backend::sample on batched logits; call advance() after.
  SampleRow next_row() const;
  void advance() { ++step_; }
  uint64_t seed() const { return seed_; }
  uint64_t step() const { return step_; }

 private:
  SamplingParams p_;
  uint64_t seed_ = 0;
  uint64_t step_ = 0;
};

// Index of the largest value; ties go to the lowest index (as torch.argmax).
int32_t argmax(std::span<const float> v);

}  // namespace cpinfer
