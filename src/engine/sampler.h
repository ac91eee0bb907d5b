// Token sampling from a row of logits: greedy, temperature, top-k, top-p, min-p, seeded.
#pragma once
#include <cstdint>
#include <optional>
#include <random>
#include <span>

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

class Sampler {
 public:
  explicit Sampler(const SamplingParams& p);
  int32_t sample(std::span<const float> logits);

 private:
  SamplingParams p_;
  std::mt19937_64 rng_;
};

// Index of the largest value; ties go to the lowest index (as torch.argmax).
int32_t argmax(std::span<const float> v);

}  // namespace cpinfer
