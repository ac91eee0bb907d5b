// The CUDA back-end end to end on the transformers fixtures: argmax agreement with transformers'
// bf16 forward, the last position's top-1, and greedy continuations equal to the CPU reference.
// Skips, saying why, when the build has no CUDA or the machine no GPU.
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "fixtures.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {
std::string cuda_unavailable() {
#ifndef CPINFER_HAVE_CUDA
  return "this build has no CUDA back-end";
#else
  try {
    make_backend("cuda", 0);
    return "";
  } catch (const std::exception& e) {
    return std::string("no usable CUDA device: ") + e.what();
  }
#endif
}

EngineOptions opts(const std::string& device) {
  EngineOptions eo;
  eo.device = device;
  eo.quiet = true;
  eo.kv_cache_tokens = 2048;
  return eo;
}
}  // namespace

class GpuFixtures : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuFixtures, MatchesTransformersBf16AndTheCpuPath) {
  if (auto why = cuda_unavailable(); !why.empty()) GTEST_SKIP() << why;
  const std::string name = GetParam();
  auto refs = load_reference(name);
  ASSERT_FALSE(refs.empty());
  Engine gpu(fixture_dir(name), opts("cuda"));
  Engine cpu(fixture_dir(name), opts("cpu"));
  const int64_t V = gpu.config().vocab_size;
  size_t agree = 0, total = 0, agree_fp32 = 0, greedy_same = 0;
  for (const RefPrompt& r : refs) {
    ASSERT_FALSE(r.argmax_bf16.empty()) << "fixture lacks bf16 reference";
    std::vector<int> seqs;
    auto logits = gpu.prefill({std::span<const int32_t>(r.ids)}, seqs, LogitsWanted::All);
    gpu.release(seqs[0]);
    for (size_t t = 0; t < r.ids.size(); ++t) {
      int32_t a = argmax(std::span<const float>(logits[0].data() + t * V, V));
      agree += a == r.argmax_bf16[t];
      agree_fp32 += a == r.argmax_fp32[t];
      ++total;
    }
    int32_t last = argmax(std::span<const float>(logits[0].data() + (r.ids.size() - 1) * V, V));
    EXPECT_EQ(last, r.argmax_bf16.back()) << name << ": last-position top-1, prompt of " << r.ids.size();
    GenerateOptions g;
    g.max_new_tokens = 20;
    g.ignore_eos = true;
    g.sampling.temperature = 0;
    auto a = gpu.generate(r.ids, g).output_ids;
    auto b = cpu.generate(r.ids, g).output_ids;
    greedy_same += a == b;
    EXPECT_EQ(a, b) << name << ": greedy continuation on CUDA vs CPU, prompt of " << r.ids.size();
  }
  double rate = double(agree) / double(total);
  std::printf("[gpu %s] argmax agreement vs transformers bf16 %.4f (vs fp32 %.4f) over %zu positions; greedy "
              "equal to CPU %zu/%zu\n",
              name.c_str(), rate, double(agree_fp32) / double(total), total, greedy_same, refs.size());
  EXPECT_GE(rate, 0.99) << name;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuFixtures, ::testing::ValuesIn(fixture_names()));
