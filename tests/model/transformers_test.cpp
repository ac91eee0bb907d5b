// The CPU reference against Hugging Face transformers' fp32 forward of the same bf16 weights.
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "fixtures.h"

using namespace cpinfer;
using namespace cpinfer::test;

class Transformers : public ::testing::TestWithParam<std::string> {};

TEST_P(Transformers, LogitsArgmaxAndGreedyMatch) {
  const std::string name = GetParam();
  auto refs = load_reference(name);
  ASSERT_FALSE(refs.empty()) << "missing fixture " << fixture_dir(name) << " (tools/make_fixtures.py makes it)";
  EngineOptions eo;
  eo.kv_cache_tokens = 2048;
  eo.quiet = true;
  Engine engine(fixture_dir(name), eo);
  const int64_t V = engine.config().vocab_size;
  size_t agree = 0, total = 0;
  double worst = 0;
  for (const RefPrompt& r : refs) {
    std::vector<int> seqs;
    auto logits = engine.prefill({std::span<const int32_t>(r.ids)}, seqs, LogitsWanted::All);
    engine.release(seqs[0]);
    ASSERT_EQ(logits[0].size(), r.ids.size() * V);
    for (size_t t = 0; t < r.ids.size(); ++t) {
      agree += argmax(std::span<const float>(logits[0].data() + t * V, V)) == r.argmax_fp32[t];
      ++total;
    }
    ASSERT_EQ(r.last_logits_fp32.size(), size_t(V));
    double err = rel_max_err(logits[0].data() + (r.ids.size() - 1) * V, r.last_logits_fp32.data(), V);
    worst = std::max(worst, err);
    EXPECT_LE(err, 1e-4) << name << " prompt of " << r.ids.size() << " tokens";

    GenerateOptions g;
    g.max_new_tokens = static_cast<int>(r.greedy_fp32.size());
    g.ignore_eos = true;
    g.sampling.temperature = 0;
    auto res = engine.generate(r.ids, g);
    EXPECT_EQ(res.output_ids, r.greedy_fp32) << name << " greedy continuation of " << r.ids.size() << " tokens";
  }
  double rate = double(agree) / double(total);
  std::printf("[fixture %s] %zu prompts, argmax agreement %.4f over %zu positions, worst last-logit rel err %.3g\n",
              name.c_str(), refs.size(), rate, total, worst);
  EXPECT_GE(rate, 0.995) << name;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Transformers, ::testing::ValuesIn(fixture_names()));
