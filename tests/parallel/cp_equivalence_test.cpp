// Context-parallel prefill equals the single-rank prefill: logits at every position, the whole KV
// cache, and the greedy continuation afterwards, for every fixture, C in {2,3,4,5,8} and awkward
// lengths; also a batch of mixed lengths, some below the CP threshold.
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <numeric>
#include <random>

#include "../model/fixtures.h"
#include "comm/communicator.h"
#include "engine/engine.h"
#include "engine/launch.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

struct RunResult {
  std::vector<std::vector<float>> logits;           // per prompt, all positions
  std::vector<std::vector<std::vector<float>>> kv;  // per prompt, per layer: K then V
  std::vector<std::vector<int32_t>> greedy;         // per prompt (only when asked)
  int kv_heads = 0;                                 // kv heads in rank 0's cache (fewer with attention TP)
  int64_t head_dim = 0;
};

// Runs a prefill of `prompts` on `cp` local ranks (cp = 1: a single rank without threads) and
// returns rank 0's view; with greedy_tokens > 0 each prompt is then continued greedily.
struct RunOptions {
  KvOverlap overlap = KvOverlap::Auto;
  int ep_size = 0;
  int moe_chunks = 0;
};

RunResult run(const std::string& model, int cp, const std::vector<std::vector<int32_t>>& prompts, int min_tokens,
              int greedy_tokens, int world = 0, bool random_weights = false, RunOptions ro = {}) {
  RunResult out;
  std::mutex mu;
  auto body = [&](ParallelCtx& par) {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 0;
    for (auto& p : prompts) eo.kv_cache_tokens += int(p.size()) + greedy_tokens + 16;
    eo.block_size = 16;
    eo.cp = CpOptions{cp, true, min_tokens};
    if (random_weights) eo.random_weights = model;
    eo.model.kv_overlap = ro.overlap;
    eo.model.moe_chunks = ro.moe_chunks;
    Engine engine(model, eo, par);
    std::vector<std::span<const int32_t>> spans(prompts.begin(), prompts.end());
    std::vector<int> seqs;
    auto logits = engine.prefill(spans, seqs, LogitsWanted::All);
    RunResult r;
    r.logits = logits;
    r.kv_heads = engine.cache().shape().n_kv_heads;
    r.head_dim = engine.cache().shape().head_dim;
    for (int s : seqs) {
      std::vector<std::vector<float>> layers;
      for (int l = 0; l < engine.config().num_hidden_layers; ++l) {
        layers.push_back(engine.cache().read(s, l, false));
        auto v = engine.cache().read(s, l, true);
        layers.back().insert(layers.back().end(), v.begin(), v.end());
      }
      r.kv.push_back(std::move(layers));
    }
    for (int s : seqs) engine.release(s);
    if (greedy_tokens > 0) {
      for (const auto& p : prompts) {
        GenerateOptions g;
        g.max_new_tokens = greedy_tokens;
        g.ignore_eos = true;
        g.sampling.temperature = 0;
        r.greedy.push_back(engine.generate(p, g).output_ids);
      }
    }
    if (par.world_rank() == 0) {
      std::lock_guard<std::mutex> lock(mu);
      out = std::move(r);
    }
  };
  LaunchOptions lo;
  lo.comm = "local";
  lo.world_size = world;
  lo.cp_size = cp;
  lo.timeout_s = 120;
  lo.ep_size = ro.ep_size;
  launch(lo, body);
  return out;
}

// The first n_heads kv heads of a [rows, all_heads, D] cache dump (rank 0 of an attention-TP group
// holds kv heads [0, n_heads)).
std::vector<float> first_heads(const std::vector<float>& kv, int all_heads, int n_heads, int64_t D) {
  if (n_heads == all_heads) return kv;
  const size_t row = size_t(all_heads) * size_t(D), part = size_t(n_heads) * size_t(D);
  std::vector<float> out;
  for (size_t r = 0; r + row <= kv.size(); r += row)
    out.insert(out.end(), kv.begin() + long(r), kv.begin() + long(r + part));
  return out;
}

// a (any world) against b (one rank): with attention TP, a's cache holds rank 0's kv heads only.
void expect_same(const RunResult& a, const RunResult& b, const std::string& what, double* worst) {
  ASSERT_EQ(a.logits.size(), b.logits.size()) << what;
  for (size_t s = 0; s < a.logits.size(); ++s) {
    ASSERT_EQ(a.logits[s].size(), b.logits[s].size()) << what;
    double e = rel_max_err(a.logits[s].data(), b.logits[s].data(), a.logits[s].size());
    *worst = std::max(*worst, e);
    EXPECT_LE(e, 1e-5) << what << " logits of prompt " << s;
    ASSERT_EQ(a.kv[s].size(), b.kv[s].size());
    for (size_t l = 0; l < a.kv[s].size(); ++l) {
      const std::vector<float> want = first_heads(b.kv[s][l], b.kv_heads, a.kv_heads, b.head_dim);
      ASSERT_EQ(a.kv[s][l].size(), want.size()) << what << " KV length, layer " << l;
      double k = rel_max_err(a.kv[s][l].data(), want.data(), want.size());
      *worst = std::max(*worst, k);
      EXPECT_LE(k, 1e-5) << what << " KV cache of prompt " << s << " layer " << l;
    }
  }
  EXPECT_EQ(a.greedy, b.greedy) << what << " greedy continuation";
}

class CpEquivalence : public ::testing::TestWithParam<std::string> {};

}  // namespace

TEST_P(CpEquivalence, EveryCpSizeAndAwkwardLengthMatchesOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  ASSERT_TRUE(std::filesystem::exists(dir + "/config.json")) << "missing fixture " << dir;
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  double worst = 0;
  std::map<int, RunResult> single;
  for (int cp : {2, 3, 4, 5, 8}) {
    for (int len : {1, 2 * cp - 1, 2 * cp + 1, 1009, 4096}) {
      std::vector<std::vector<int32_t>> prompts{random_ids(len, vocab, 1000 + len)};
      const int greedy = (len == 2 * cp + 1 || len == 1009) ? 20 : 0;
      const int key = len * 100 + greedy;
      if (!single.count(key)) single[key] = run(dir, 1, prompts, 0, greedy);
      RunResult r = run(dir, cp, prompts, 0, greedy);
      expect_same(r, single[key], name + " cp=" + std::to_string(cp) + " len=" + std::to_string(len), &worst);
    }
  }
  std::printf("[cp %s] worst relative difference CP vs one rank (logits and KV): %.3g\n", name.c_str(), worst);
}

TEST_P(CpEquivalence, MixedBatchWithShortPromptsBelowTheThreshold) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  std::vector<std::vector<int32_t>> prompts;
  int seed = 7;
  for (int len : {1, 700, 5, 63, 64, 1031, 2}) prompts.push_back(random_ids(len, vocab, seed++));
  RunResult ref = run(dir, 1, prompts, 64, 0);
  // Each prompt alone on one rank gives the same as the batch.
  for (size_t i = 0; i < prompts.size(); ++i) {
    RunResult one = run(dir, 1, {prompts[i]}, 64, 0);
    EXPECT_LE(rel_max_err(one.logits[0].data(), ref.logits[i].data(), one.logits[0].size()), 1e-5) << i;
  }
  double worst = 0;
  for (int cp : {2, 3, 6}) {
    RunResult r = run(dir, cp, prompts, 64, 0);
    expect_same(r, ref, name + " mixed batch cp=" + std::to_string(cp), &worst);
  }
  std::printf("[cp %s] mixed batch worst relative difference: %.3g\n", name.c_str(), worst);
}

// Experts sharded over any world size, also one that does not divide the expert count (3, 5, 6),
// with CP groups smaller than the world: the W / C groups form attention-TP groups (T = 2 or 4 for
// the fixtures' 4 q heads; 3 cannot split them, attn_tp_test checks the refusal) and the MoE sums
// over the world.
TEST_P(CpEquivalence, ExpertShardingOverAnyWorldSize) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  std::vector<std::vector<int32_t>> prompts{random_ids(301, vocab, 11), random_ids(9, vocab, 12)};
  RunResult ref = run(dir, 1, prompts, 0, 5);
  double worst = 0;
  for (auto [world, cp] : std::vector<std::pair<int, int>>{{2, 1}, {4, 1}, {3, 3}, {4, 2}, {5, 5}, {6, 3}, {8, 2}}) {
    RunResult r = run(dir, cp, prompts, 0, 5, world);
    expect_same(r, ref, name + " world=" + std::to_string(world) + " cp=" + std::to_string(cp), &worst);
  }
  std::printf("[ep %s] worst relative difference with experts sharded: %.3g\n", name.c_str(), worst);
}

// The overlapped K/V exchange (the GPU default: own keys stored first, diagonal attention during
// the exchange, prefix after, merged by log-sum-exp) forced on the host communicators: the same
// logits, cache and continuations as one rank, also for a mixed batch with unsplit prompts.
TEST_P(CpEquivalence, OverlappedExchangeMatchesOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  double worst = 0;
  const RunOptions on{KvOverlap::On, 0};
  for (int cp : {2, 3, 4}) {
    for (int len : {2 * cp + 1, 1009}) {
      std::vector<std::vector<int32_t>> prompts{random_ids(len, vocab, 2000 + len)};
      RunResult ref = run(dir, 1, prompts, 0, 8);
      RunResult r = run(dir, cp, prompts, 0, 8, 0, false, on);
      expect_same(r, ref, name + " overlapped cp=" + std::to_string(cp) + " len=" + std::to_string(len), &worst);
    }
  }
  std::vector<std::vector<int32_t>> mixed;
  int seed = 70;
  for (int len : {700, 5, 64, 1031}) mixed.push_back(random_ids(len, vocab, seed++));
  RunResult ref = run(dir, 1, mixed, 64, 0);
  RunResult r = run(dir, 3, mixed, 64, 0, 0, false, on);
  expect_same(r, ref, name + " overlapped mixed batch cp=3", &worst);
  std::printf("[cp %s] overlapped exchange worst relative difference: %.3g\n", name.c_str(), worst);
}

// The pipelined sharded-expert MoE (the GPU default for long prompts: the CP group's rows in
// chunks, gather / experts / reduce-scatter overlapped) forced on the host communicators, with
// chunks that leave some rank empty-handed (3 chunks of a 5-token share) and uneven splits.
TEST_P(CpEquivalence, PipelinedMoeMatchesOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  double worst = 0;
  for (auto [cp, chunks, len] :
       std::vector<std::tuple<int, int, int>>{{2, 2, 1009}, {3, 3, 701}, {2, 3, 9}, {4, 4, 300}}) {
    std::vector<std::vector<int32_t>> prompts{random_ids(len, vocab, 3000 + len)};
    RunResult ref = run(dir, 1, prompts, 0, 6);
    RunResult r = run(dir, cp, prompts, 0, 6, 0, false, RunOptions{KvOverlap::On, 0, chunks});
    expect_same(r, ref, name + " pipelined MoE cp=" + std::to_string(cp) + " chunks=" + std::to_string(chunks), &worst);
  }
  std::printf("[ep %s] pipelined MoE worst relative difference: %.3g\n", name.c_str(), worst);
}

// --ep-size 1: every rank holds all experts and the MoE needs no communication.
TEST_P(CpEquivalence, ReplicatedExpertsMatchOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  std::vector<std::vector<int32_t>> prompts{random_ids(301, vocab, 21), random_ids(9, vocab, 22)};
  RunResult ref = run(dir, 1, prompts, 0, 5);
  double worst = 0;
  for (auto [world, cp] : std::vector<std::pair<int, int>>{{2, 2}, {4, 4}, {4, 2}}) {
    RunResult r = run(dir, cp, prompts, 0, 5, world, false, RunOptions{KvOverlap::Auto, 1});
    expect_same(r, ref, name + " replicated experts world=" + std::to_string(world) + " cp=" + std::to_string(cp),
                &worst);
  }
  std::printf("[ep %s] replicated experts worst relative difference: %.3g\n", name.c_str(), worst);
}

TEST(Launch, EpSizeOtherThanOneOrTheWorldIsRefused) {
  LaunchOptions lo;
  lo.world_size = 4;
  lo.cp_size = 4;
  lo.ep_size = 2;
  try {
    launch(lo, [](ParallelCtx&) {});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("--ep-size 2 is not supported with 4 ranks", 0), 0u)
        << "refused before any rank starts: " << e.what();
  }
}

// Random weights (benchmarks) build the same model whatever the world size and rank: each rank
// makes only its experts and its attention-TP slices (world 4, cp 2: T = 2), and a tensor's values
// depend only on its id.
TEST(RandomWeights, SameModelOnEveryWorldSize) {
  const std::string config = fixture_dir("moe_v4_gqa") + "/config.json";
  std::vector<std::vector<int32_t>> prompts{random_ids(200, 384, 3)};
  RunResult ref = run(config, 1, prompts, 0, 0, 0, true);
  double worst = 0;
  for (auto [world, cp] : std::vector<std::pair<int, int>>{{3, 3}, {4, 2}}) {
    RunResult r = run(config, cp, prompts, 0, 0, world, true);
    expect_same(r, ref, "random weights world=" + std::to_string(world), &worst);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, CpEquivalence, ::testing::ValuesIn(fixture_names()));
