// Context parallelism on GPUs (NCCL, one thread per GPU): CP=2 on two GPUs against CP=1 on one,
// on the fixtures and on a random-weight model at 16K tokens; a rank that fails makes the others
// fail within the timeout instead of hanging. Skips, saying why, without CUDA, NCCL or 2 GPUs.
#include <gtest/gtest.h>

#include <chrono>
#include <mutex>
#include <random>

#include "engine/engine.h"
#include "engine/launch.h"
#include "engine/sampler.h"
#include "fixtures.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {
struct Out {
  std::vector<float> logits;  // all positions
  std::vector<int32_t> greedy;
};

// Runs every prompt (one after the other) in one launch of `cp` GPU ranks; rank 0's results.
std::vector<Out> run_all(const std::string& model, bool random, int cp, const std::vector<std::vector<int32_t>>& prompts,
                         int greedy_tokens) {
  std::vector<Out> outs;
  std::mutex mu;
  LaunchOptions lo;
  lo.world_size = cp;
  lo.cp_size = cp;
  lo.timeout_s = 120;
  lo.gpu = true;
  launch(lo, [&](ParallelCtx& par) {
    EngineOptions eo;
    eo.device = "cuda";
    eo.quiet = true;
    eo.kv_cache_tokens = 64 + greedy_tokens;
    for (const auto& p : prompts) eo.kv_cache_tokens = std::max<int>(eo.kv_cache_tokens, int(p.size()) + greedy_tokens + 64);
    eo.cp = CpOptions{cp, true, 0};
    if (random) eo.random_weights = model;
    Engine e(model, eo, par);
    for (const auto& ids : prompts) {
      std::vector<int> seqs;
      auto logits = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
      e.release(seqs[0]);
      std::vector<int32_t> g;
      if (greedy_tokens > 0) {
        GenerateOptions go;
        go.max_new_tokens = greedy_tokens;
        go.ignore_eos = true;
        go.sampling.temperature = 0;
        g = e.generate(ids, go).output_ids;
      }
      if (par.world_rank() == 0) {
        std::lock_guard<std::mutex> lock(mu);
        outs.push_back({std::move(logits[0]), std::move(g)});
      }
    }
  });
  return outs;
}

double agreement(const Out& a, const Out& b, int64_t V, size_t n) {
  size_t same = 0;
  for (size_t t = 0; t < n; ++t)
    same += argmax(std::span<const float>(a.logits.data() + t * V, V)) ==
            argmax(std::span<const float>(b.logits.data() + t * V, V));
  return double(same) / double(n);
}
}  // namespace

class GpuCp : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuCp, TwoGpusMatchOne) {
  if (auto why = gpus_unavailable(2); !why.empty()) GTEST_SKIP() << why;
  const std::string name = GetParam();
  auto refs = load_reference(name);
  const int64_t V = load_config(fixture_dir(name)).vocab_size;
  std::vector<std::vector<int32_t>> prompts;
  for (const RefPrompt& r : refs)
    if (r.ids.size() >= 7) prompts.push_back(r.ids);  // shorter ones are not split
  auto ones = run_all(fixture_dir(name), false, 1, prompts, 20);
  auto twos = run_all(fixture_dir(name), false, 2, prompts, 20);
  ASSERT_EQ(ones.size(), prompts.size());
  ASSERT_EQ(twos.size(), prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t>& ids = prompts[i];
    const Out& one = ones[i];
    const Out& two = twos[i];
    double rate = agreement(one, two, V, ids.size());
    size_t last = ids.size() - 1;
    std::printf("[gpu cp %s] %zu tokens: argmax agreement CP=2 vs CP=1 %.4f, greedy equal %s\n", name.c_str(),
                ids.size(), rate, one.greedy == two.greedy ? "yes" : "no");
    EXPECT_GE(rate, 0.99) << name << " " << ids.size();
    EXPECT_EQ(argmax(std::span<const float>(one.logits.data() + last * V, V)),
              argmax(std::span<const float>(two.logits.data() + last * V, V)))
        << name << " last-position top-1, " << ids.size() << " tokens";
    EXPECT_EQ(one.greedy, two.greedy) << name << " greedy continuation, " << ids.size() << " tokens";
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GpuCp, ::testing::ValuesIn(fixture_names()));

TEST(GpuCpLong, RandomWeights16K) {
  if (auto why = gpus_unavailable(2); !why.empty()) GTEST_SKIP() << why;
  const std::string config = fixture_dir("moe_v4_gqa") + "/config.json";
  std::mt19937 rng(16);
  std::vector<int32_t> ids(16384);
  for (auto& t : ids) t = static_cast<int32_t>(rng() % 384);
  Out one = run_all(config, true, 1, {ids}, 0).at(0);
  Out two = run_all(config, true, 2, {ids}, 0).at(0);
  double rate = agreement(one, two, 384, ids.size());
  std::printf("[gpu cp long] 16384 tokens, random weights: argmax agreement CP=2 vs CP=1 %.4f\n", rate);
  EXPECT_GE(rate, 0.99);
  const size_t last = ids.size() - 1;
  EXPECT_EQ(argmax(std::span<const float>(one.logits.data() + last * 384, 384)),
            argmax(std::span<const float>(two.logits.data() + last * 384, 384)));
}

TEST(GpuCpFault, AFailedRankEndsEveryRankWithinTheTimeout) {
  if (auto why = gpus_unavailable(2); !why.empty()) GTEST_SKIP() << why;
  LaunchOptions lo;
  lo.world_size = 2;
  lo.cp_size = 2;
  lo.timeout_s = 3;
  lo.gpu = true;
  std::vector<int32_t> ids(300, 5);
  auto t0 = std::chrono::steady_clock::now();
  std::string what;
  try {
    launch(lo, [&](ParallelCtx& par) {
      EngineOptions eo;
      eo.device = "cuda";
      eo.quiet = true;
      eo.kv_cache_tokens = 512;
      eo.cp = CpOptions{2, true, 0};
      Engine e(fixture_dir("moe_v4_gqa"), eo, par);
      if (par.world_rank() == 1) throw Error("rank 1 dies before the prefill (fault injection)");
      std::vector<int> seqs;
      e.prefill({std::span<const int32_t>(ids)}, seqs);
    });
  } catch (const Error& e) {
    what = e.what();
  }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[gpu cp fault] launch ended after %.1f s: %s\n", s, what.c_str());
  EXPECT_FALSE(what.empty()) << "the job must fail";
  EXPECT_LT(s, 30.0) << "the surviving rank must give up within the timeout, not hang";
}
