// The prefix cache over real engines: requests that share a cached prefix give the same greedy
// tokens as without the cache and prefill only the uncached rest, at CP size 1, 2 and 3 (the rest
// zigzag-split over the ranks, the shared pages replicated on every rank by the replayed cache ops),
// with chunked prefill, and with preemption forced by a small KV cache. With sharded KV
// (--kv-shard) at CP size 2, 3 and 4 the cached prefix stays in each rank's shard and the rest is
// a later forward over it: the same tokens, the same hits, no block leaked on any rank.
#include <gtest/gtest.h>

#include <functional>

#include "engine_harness.h"

namespace cpinfer::server::test {
namespace {

std::vector<int32_t> cat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

struct Served {
  std::vector<std::vector<int32_t>> outputs;  // per request, in submission order over all waves
  uint64_t prefilled = 0, queried = 0, hit = 0, preempted = 0, evicted = 0;
  int cached_blocks = 0;         // held by the prefix cache at the end (all ranks)
  std::vector<int> used_blocks;  // per rank, at the end (before the cache is cleared)
};

using Wave = std::function<std::vector<std::vector<int32_t>>(const std::vector<std::vector<int32_t>>& outputs)>;

// Serves waves of prompts (greedy, max_tokens each; a wave starts when the previous one finished)
// on `cp` thread ranks (kv_shard: --kv-shard, kv_tokens per rank). At the end it clears the prefix
// cache and checks that every block of every rank is free again.
Served serve(int cp, int kv_tokens, int chunk, bool radix, int max_tokens, const std::vector<Wave>& waves,
             bool kv_shard = false) {
  Served res;
  Metrics metrics;
  auto all_free = [](Engine& engine) {
    const KvCache& cache = engine.cache();
    const int ranks = cache.sharded() ? cache.shard_size() : 1;
    for (int r = 0; r < ranks; ++r)  // every rank keeps every rank's allocator: all must agree
      EXPECT_EQ(cache.n_free_blocks_on(r), cache.n_blocks()) << "rank " << engine.rank() << "'s view of rank " << r;
  };
  auto body = [&](Scheduler& sched, EngineRunner& runner) {
    for (const Wave& wave : waves) {
      int done = 0;
      const auto prompts = wave(res.outputs);
      for (const auto& p : prompts) {
        const size_t i = res.outputs.size();
        res.outputs.emplace_back();
        auto r = std::make_shared<SchedRequest>();
        r->prompt = p;
        r->max_tokens = max_tokens;
        r->sampling.temperature = 0;
        r->on_token = [&res, i](int32_t t) {
          res.outputs[i].push_back(t);
          return true;
        };
        r->on_finish = [&done](const FinishInfo& f) {
          EXPECT_EQ(f.reason, "length");
          ++done;
        };
        sched.submit(r);
      }
      for (int step = 0; done < static_cast<int>(prompts.size()) && step < 10000; ++step)
        if (!sched.step()) runner.idle();
      EXPECT_EQ(done, static_cast<int>(prompts.size()));
    }
    const Gauges g = sched.gauges();
    // Every block in use is the prefix cache's (once per rank that holds it).
    int used = 0;
    for (int r = 0; r < runner.kv_ranks(); ++r) {
      res.used_blocks.push_back(runner.n_blocks() - runner.n_free_blocks_on(r));
      used += res.used_blocks.back();
    }
    EXPECT_EQ(used, g.prefix_cached_blocks);
    EXPECT_EQ(runner.kv_ranks(), kv_shard ? cp : 1);
    if (!radix) EXPECT_EQ(g.prefix_cached_blocks, 0);
    res.cached_blocks = g.prefix_cached_blocks;
    res.prefilled = metrics.prompt_tokens();
    res.queried = g.prefix_query_tokens;
    res.hit = g.prefix_hit_tokens;
    res.preempted = sched.n_preempted();
    res.evicted = g.prefix_evicted_blocks;
    sched.clear_prefix_cache();
    EXPECT_EQ(sched.gauges().prefix_cached_blocks, 0);
  };
  with_scheduler(cp, kv_tokens, chunk, radix, &metrics, body, DecodeGraphMode::On, nullptr, kv_shard, all_free);
  return res;
}

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
  size_t n = 0;
  while (n < a.size() && n < b.size() && a[n] == b[n]) ++n;
  return n;
}

// Wave 1: A = S + a. Wave 2, together: B = S + b (diverges inside a page: S is not page-aligned),
// C = A (a full hit: its last token is still prefilled), D = A + A's answer + more (a second turn:
// the cached pages include A's output).
std::vector<Wave> turns(int system_len) {
  const auto sys = ids(system_len, 1);
  const auto a = cat(sys, ids(11, 2));
  return {[a](const auto&) { return std::vector<std::vector<int32_t>>{a}; },
          [a, sys](const auto& out) {
            return std::vector<std::vector<int32_t>>{cat(sys, ids(9, 3)), a, cat(cat(a, out[0]), ids(5, 4))};
          }};
}

TEST(PrefixCache, SharedPrefixGivesTheSameTokensAndPrefillsOnlyTheRest) {
  const int max_tokens = 24;
  const auto waves = turns(77);
  const Served ref = serve(1, 2048, 2048, false, max_tokens, waves);
  ASSERT_EQ(ref.outputs.size(), 4u);
  EXPECT_EQ(ref.hit, 0u);
  EXPECT_EQ(ref.outputs[2], ref.outputs[0]);  // C repeats A

  // A's cached tokens: its prompt and output but the last, in whole pages.
  auto prompts = waves[0](ref.outputs);
  for (const auto& p : waves[1](ref.outputs)) prompts.push_back(p);
  auto a_kv = cat(prompts[0], ref.outputs[0]);
  a_kv.resize((a_kv.size() - 1) / kBlock * kBlock);
  uint64_t want_hit = 0, total = 0;
  for (size_t i = 1; i < prompts.size(); ++i) {
    const auto& p = prompts[i];
    const size_t n = std::min(common_prefix(a_kv, p), p.size() - 1);
    want_hit += n / kBlock * kBlock;
  }
  for (const auto& p : prompts) total += p.size();
  ASSERT_EQ(want_hit, 64u + 80u + 96u);  // B: 4 of S's 5 pages; C: 87 tokens of A; D: A's 6 pages

  struct Case {
    int cp, chunk;
  };
  for (Case c : {Case{1, 2048}, Case{1, 32}, Case{2, 2048}, Case{3, 48}}) {
    SCOPED_TRACE("cp " + std::to_string(c.cp) + " chunk " + std::to_string(c.chunk));
    const Served got = serve(c.cp, 2048, c.chunk, true, max_tokens, waves);
    EXPECT_EQ(got.outputs, ref.outputs);
    EXPECT_EQ(got.hit, want_hit);
    EXPECT_EQ(got.queried, total);
    EXPECT_EQ(got.prefilled, total - want_hit);  // the cached pages were not prefilled again
    EXPECT_EQ(ref.prefilled, total);
  }
}

TEST(PrefixCache, SameTokensWhenPreemptionAndEvictionRunTheSmallCache) {
  // 10 blocks of 16: the second wave (~240 positions) preempts, and admission must evict A's pages.
  const int max_tokens = 24;
  const auto waves = turns(37);
  const Served ref = serve(1, 2048, 2048, false, max_tokens, waves);
  for (int cp : {1, 2}) {
    SCOPED_TRACE("cp " + std::to_string(cp));
    const Served got = serve(cp, 160, 32, true, max_tokens, waves);
    EXPECT_EQ(got.outputs, ref.outputs);
    EXPECT_GT(got.preempted, 0u) << "the test meant to exercise preemption";
    EXPECT_GT(got.hit, 0u);
    EXPECT_GT(got.evicted, 0u) << "the test meant to exercise eviction";
  }
}

// Two conversations of `n_turns` turns that share a system prompt (45 tokens: it ends inside a
// page); turn k + 1's prompt is turn k's prompt + its answer + new text. Wave k holds turn k of
// both.
std::vector<Wave> conversations(int n_turns) {
  const auto sys = ids(45, 7);
  std::vector<Wave> waves;
  for (int t = 0; t < n_turns; ++t)
    waves.push_back([sys, t](const std::vector<std::vector<int32_t>>& out) {
      std::vector<std::vector<int32_t>> prompts;
      for (uint32_t c = 0; c < 2; ++c) {
        auto p = cat(sys, ids(9 + 4 * static_cast<int>(c), 100 + c));
        for (int k = 0; k < t; ++k)  // earlier turns: answer, then the next user text
          p = cat(cat(p, out[size_t(2 * k) + c]), ids(6 + k, 200 + 10 * static_cast<uint32_t>(k) + c));
        prompts.push_back(p);
      }
      return prompts;
    });
  return waves;
}

// Sharded KV: the cached prefix stays in each rank's shard (full pages shared, the partly filled
// last page of each rank copied) and the new request prefills only the rest, as a later forward
// over the shards. Same greedy tokens as one rank and as sharded KV without the cache, the same
// hits as the replicated cache, at CP 2, 3 and 4, one prefill forward or chunked.
TEST(PrefixCache, ShardedKvSharesCachedPrefixesAndPrefillsOnlyTheRest) {
  const int max_tokens = 20;
  for (const auto& [name, waves] : {std::pair{"turns", turns(77)}, std::pair{"conversations", conversations(3)}}) {
    SCOPED_TRACE(name);
    const Served ref = serve(1, 4096, 2048, false, max_tokens, waves);
    const Served replicated = serve(1, 4096, 2048, true, max_tokens, waves);
    ASSERT_EQ(replicated.outputs, ref.outputs);
    ASSERT_GT(replicated.hit, 0u);
    EXPECT_EQ(replicated.prefilled, ref.prefilled - replicated.hit);
    for (int cp : {2, 3, 4}) {
      for (int chunk : {2048, 40}) {
        SCOPED_TRACE("cp " + std::to_string(cp) + " chunk " + std::to_string(chunk));
        const Served got = serve(cp, 1024, chunk, true, max_tokens, waves, true);
        EXPECT_EQ(got.outputs, ref.outputs);
        EXPECT_EQ(got.hit, replicated.hit);
        EXPECT_EQ(got.queried, replicated.queried);
        EXPECT_EQ(got.prefilled, ref.prefilled - got.hit) << "the cached pages were prefilled again";
        // Each rank holds about 1/C of the replicated cache's pages, plus partly filled pages: at most
        // two per request that inserted pages (the one its new pages start in, and its last).
        const int n_requests = static_cast<int>(got.outputs.size());
        for (int used : got.used_blocks) EXPECT_LE(used, (replicated.cached_blocks + cp - 1) / cp + 2 * n_requests);
      }
      const Served plain = serve(cp, 1024, 2048, false, max_tokens, waves, true);
      EXPECT_EQ(plain.outputs, ref.outputs) << "sharded KV without the prefix cache, cp " << cp;
      EXPECT_EQ(plain.hit, 0u);
    }
  }
}

// Sharded KV with small per-rank caches: decoding preempts requests (their pages go to the cache
// and come back by a hit), and admission evicts cached pages.
TEST(PrefixCache, ShardedKvSameTokensWhenPreemptionAndEvictionRunTheSmallCache) {
  const int max_tokens = 24;
  const auto waves = turns(37);
  const Served ref = serve(1, 2048, 2048, false, max_tokens, waves);
  for (auto [cp, kv_tokens] : {std::pair{2, 96}, std::pair{3, 80}, std::pair{4, 64}}) {
    SCOPED_TRACE("cp " + std::to_string(cp) + ", " + std::to_string(kv_tokens) + " positions per rank");
    const Served got = serve(cp, kv_tokens, 32, true, max_tokens, waves, true);
    EXPECT_EQ(got.outputs, ref.outputs);
    EXPECT_GT(got.preempted, 0u) << "the test meant to exercise preemption";
    EXPECT_GT(got.hit, 0u);
    EXPECT_GT(got.evicted, 0u) << "the test meant to exercise eviction";
  }
}

}  // namespace
}  // namespace cpinfer::server::test
