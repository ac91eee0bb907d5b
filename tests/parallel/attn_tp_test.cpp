// Attention tensor parallelism (world W = C x T: CP groups of C ranks, TP groups of T = W / C ranks
// that split the heads) equals one rank: logits of every prompt position and of greedy decode steps
// at 1e-5 relative, the same greedy tokens, each rank's KV cache is exactly its kv heads' slice of
// the one-rank cache (kv heads replicated when T > Hkv) in 1/T of the bytes (1/Hkv when
// replicated), sharded KV on top, and layouts that cannot be split are refused with the sizes.
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <random>

#include "../loader/loader_test_util.h"
#include "../model/fixtures.h"
#include "engine/engine.h"
#include "engine/launch.h"
#include "layers/linear.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

constexpr int kPage = 16;

struct RankView {
  int tp_rank = 0, tp_size = 1, cp_rank = 0;
  size_t kv_bytes = 0;                 // the rank's whole KV cache
  int kv_heads = 0;                    // kv heads its cache holds
  std::vector<std::vector<float>> kv;  // per prompt: layer-major K then V, [length, kv_heads, D]
};

struct Result {
  std::vector<std::vector<float>> logits;  // per prompt: prompt positions, then every decode step
  std::vector<std::vector<int32_t>> tokens;
  std::map<int, RankView> ranks;  // by world rank
};

struct Config {
  int world = 1, cp = 1;
  bool kv_shard = false;
  bool split = true;  // --enable-prefill-cp
};

// Prefills `prompts` (one forward, every logit), then decodes `decode` greedy steps of all of them
// in one batch, on `c.world` local ranks.
Result run(const std::string& dir, Config c, const std::vector<std::vector<int32_t>>& prompts, int decode) {
  Result out;
  std::mutex mu;
  LaunchOptions lo{.comm = "local", .world_size = c.world, .cp_size = c.cp, .timeout_s = 120};
  launch(lo, [&](ParallelCtx& par) {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 0;
    for (auto& p : prompts) eo.kv_cache_tokens += int(p.size()) + decode + 4 * kPage;
    eo.block_size = kPage;
    eo.cp = CpOptions{c.cp, c.split, 0, c.kv_shard, 1};
    Engine engine(dir, eo, par);
    const int V = int(engine.config().vocab_size), L = int(engine.config().num_hidden_layers);
    std::vector<std::span<const int32_t>> spans(prompts.begin(), prompts.end());
    std::vector<int> seqs;
    std::vector<std::vector<float>> logits = engine.prefill(spans, seqs, LogitsWanted::All);
    std::vector<int32_t> next(prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) next[i] = argmax_in(logits[i], logits[i].size() - size_t(V), size_t(V));
    std::vector<std::vector<int32_t>> tokens(prompts.size());
    for (int step = 0; step < decode; ++step) {
      for (size_t i = 0; i < seqs.size(); ++i) tokens[i].push_back(next[i]);
      auto l = engine.decode(seqs, next);
      for (size_t i = 0; i < seqs.size(); ++i) {
        logits[i].insert(logits[i].end(), l[i].begin(), l[i].end());
        next[i] = argmax_in(l[i], 0, size_t(V));
      }
    }
    RankView view;
    view.tp_rank = par.attn_tp_rank();
    view.tp_size = par.attn_tp_size();
    view.cp_rank = par.cp_rank();
    view.kv_bytes = engine.cache().shape().bytes();
    view.kv_heads = engine.cache().shape().n_kv_heads;
    if (!engine.cache().sharded()) {
      for (int s : seqs) {
        std::vector<float> all;
        for (int l = 0; l < L; ++l)
          for (bool values : {false, true}) {
            auto x = engine.cache().read(s, l, values);
            all.insert(all.end(), x.begin(), x.end());
          }
        view.kv.push_back(std::move(all));
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    out.ranks[par.world_rank()] = std::move(view);
    if (par.world_rank() == 0) {
      out.logits = std::move(logits);
      out.tokens = std::move(tokens);
    }
  });
  return out;
}

// The rows of kv heads [first, first + count) out of a [rows, n_heads, D] cache dump.
std::vector<float> head_slice(const std::vector<float>& full, int n_heads, int first, int count, int64_t D) {
  const size_t row = size_t(n_heads) * size_t(D), rows = full.size() / row;
  std::vector<float> out;
  out.reserve(rows * size_t(count) * size_t(D));
  for (size_t r = 0; r < rows; ++r)
    out.insert(out.end(), full.begin() + long(r * row + size_t(first) * size_t(D)),
               full.begin() + long(r * row + size_t(first + count) * size_t(D)));
  return out;
}

// `r` against the one-rank result `one`: logits, tokens, every rank's cache slice and its bytes.
void expect_matches(const Result& r, const Result& one, const ModelConfig& cfg, Config c, const std::string& what,
                    double* worst) {
  ASSERT_EQ(r.logits.size(), one.logits.size()) << what;
  EXPECT_EQ(r.tokens, one.tokens) << what << ": greedy tokens";
  for (size_t s = 0; s < r.logits.size(); ++s) {
    ASSERT_EQ(r.logits[s].size(), one.logits[s].size()) << what;
    const double e = rel_max_err(r.logits[s].data(), one.logits[s].data(), r.logits[s].size());
    *worst = std::max(*worst, e);
    EXPECT_LE(e, 1e-5) << what << ": logits of prompt " << s;
  }
  const int T = c.world / c.cp, Hkv = int(cfg.num_key_value_heads);
  ASSERT_EQ(int(r.ranks.size()), c.world) << what;
  const RankView& base = one.ranks.at(0);
  for (const auto& [rank, v] : r.ranks) {
    const std::string w = what + " rank " + std::to_string(rank);
    EXPECT_EQ(v.tp_size, T) << w;
    EXPECT_EQ(v.tp_rank, rank / c.cp) << w << ": TP groups are the ranks with the same CP rank";
    EXPECT_EQ(v.cp_rank, rank % c.cp) << w;
    const AttnHeadShard h = attn_head_shard(cfg.num_attention_heads, Hkv, TpShard{v.tp_rank, T});
    ASSERT_EQ(v.kv_heads, h.kv_count) << w;
    // KV memory: 1/T of one rank's, or one kv head's share when the heads are replicated.
    EXPECT_EQ(v.kv_bytes * size_t(Hkv), base.kv_bytes * size_t(h.kv_count)) << w;
    if (T <= Hkv) EXPECT_EQ(v.kv_bytes * size_t(T), base.kv_bytes) << w << ": KV bytes fall by T";
    if (c.kv_shard) continue;
    ASSERT_EQ(v.kv.size(), base.kv.size()) << w;
    for (size_t s = 0; s < v.kv.size(); ++s) {
      const std::vector<float> want = head_slice(base.kv[s], Hkv, int(h.kv_first), int(h.kv_count), cfg.head_dim);
      ASSERT_EQ(v.kv[s].size(), want.size()) << w << ": KV of prompt " << s;
      const double e = rel_max_err(v.kv[s].data(), want.data(), want.size());
      *worst = std::max(*worst, e);
      EXPECT_LE(e, 1e-5) << w << ": KV of prompt " << s << " equals its kv heads of the one-rank cache";
    }
  }
}

class AttnTp : public ::testing::TestWithParam<std::string> {};

}  // namespace

// TP = 2 and 4 alone (C = 1) and with CP (W = 4, C = 2: TP 2 x CP 2; W = 8, C = 2: TP 4 x CP 2):
// prefill of a long and a short prompt, then 12 decode steps, on every fixture (4 q heads; kv
// heads 1, 2 or 4, so T = 4 replicates kv heads on most of them and T = 2 on the MQA one).
TEST_P(AttnTp, TpAndTpTimesCpMatchOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const ModelConfig cfg = load_config(dir);
  const int vocab = static_cast<int>(cfg.vocab_size);
  const std::vector<std::vector<int32_t>> prompts{random_ids(301, vocab, 31), random_ids(7, vocab, 32)};
  const Result one = run(dir, Config{}, prompts, 12);
  double worst = 0;
  for (Config c : {Config{2, 1}, Config{4, 1}, Config{4, 2}, Config{8, 2}}) {
    const std::string what = name + " world=" + std::to_string(c.world) + " cp=" + std::to_string(c.cp);
    expect_matches(run(dir, c, prompts, 12), one, cfg, c, what, &worst);
  }
  std::printf("[attn-tp %s] worst relative difference TP vs one rank (logits and KV): %.3g\n", name.c_str(), worst);
}

// Sharded KV inside each CP group, with TP groups across them (W = 4, C = 2 and W = 8, C = 4).
TEST_P(AttnTp, ShardedKvWithTpMatchesOneRank) {
  const std::string name = GetParam();
  const std::string dir = fixture_dir(name);
  const ModelConfig cfg = load_config(dir);
  const std::vector<std::vector<int32_t>> prompts{random_ids(97, int(cfg.vocab_size), 41)};
  const Result one = run(dir, Config{}, prompts, 10);
  double worst = 0;
  for (Config c : {Config{4, 2, true}, Config{8, 4, true}}) {
    const std::string what = name + " kv-shard world=" + std::to_string(c.world) + " cp=" + std::to_string(c.cp);
    expect_matches(run(dir, c, prompts, 10), one, cfg, c, what, &worst);
  }
  std::printf("[attn-tp %s] sharded KV worst relative difference: %.3g\n", name.c_str(), worst);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, AttnTp, ::testing::ValuesIn(fixture_names()),
                         [](const auto& info) { return info.param; });

// Head layouts: which splits exist, which heads a rank gets, and the refusals naming the sizes.
TEST(AttnTpHeads, ShardsAndReplicatesHeadsAndRefusesWhatCannotBeSplit) {
  const AttnHeadShard a = attn_head_shard(32, 4, TpShard{3, 4});  // Qwen3-30B-A3B over 4 ranks
  EXPECT_EQ(a.q_first, 24);
  EXPECT_EQ(a.q_count, 8);
  EXPECT_EQ(a.kv_first, 3);
  EXPECT_EQ(a.kv_count, 1);
  EXPECT_EQ(a.kv_replicas, 1);
  const AttnHeadShard b = attn_head_shard(32, 4, TpShard{5, 8});  // 8 ranks: each kv head on 2
  EXPECT_EQ(b.q_first, 20);
  EXPECT_EQ(b.q_count, 4);
  EXPECT_EQ(b.kv_first, 2);
  EXPECT_EQ(b.kv_count, 1);
  EXPECT_EQ(b.kv_replicas, 2);
  const AttnHeadShard m = attn_head_shard(4, 1, TpShard{3, 4});  // MQA
  EXPECT_EQ(m.q_first, 3);
  EXPECT_EQ(m.kv_first, 0);
  EXPECT_EQ(m.kv_replicas, 4);
  EXPECT_ERROR_HAS(attn_head_shard(4, 2, TpShard{0, 3}), "num_attention_heads divisible by 3", "4 q heads");
  EXPECT_ERROR_HAS(attn_head_shard(12, 6, TpShard{0, 4}), "num_key_value_heads divisible by 4", "6 kv heads");
  EXPECT_ERROR_HAS(attn_head_shard(24, 4, TpShard{0, 6}), "multiple of 4", "replicated");
}

// Through the engine: a world that gives 4 heads a TP size of 3 is refused with the sizes.
TEST(AttnTpHeads, EngineRefusesATpSizeTheHeadsCannotTake) {
  const std::string dir = fixture_dir("moe_v4_gqa");
  EXPECT_ERROR_HAS(run(dir, Config{3, 1}, {{1, 2, 3}}, 0), "num_attention_heads divisible by 3");
  EXPECT_ERROR_HAS(run(dir, Config{6, 2}, {{1, 2, 3}}, 0), "num_attention_heads divisible by 3");
}
