// The prefix cache over real engines: requests that share a cached prefix give the same greedy
// tokens as without the cache and prefill only the uncached rest, at CP size 1, 2 and 3 (the rest
// zigzag-split over the ranks, the shared pages replicated on every rank by the replayed cache ops),
// with chunked prefill, and with preemption forced by a small KV cache.
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
};

using Wave = std::function<std::vector<std::vector<int32_t>>(const std::vector<std::vector<int32_t>>& outputs)>;

// Serves waves of prompts (greedy, max_tokens each; a wave starts when the previous one finished)
// on `cp` thread ranks.
Served serve(int cp, int kv_tokens, int chunk, bool radix, int max_tokens, const std::vector<Wave>& waves) {
  Served res;
  Metrics metrics;
  with_scheduler(cp, kv_tokens, chunk, radix, &metrics, [&](Scheduler& sched, EngineRunner& runner) {
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
    EXPECT_EQ(runner.n_free_blocks() + g.prefix_cached_blocks, runner.n_blocks());
    if (!radix) EXPECT_EQ(g.prefix_cached_blocks, 0);
    res.prefilled = metrics.prompt_tokens();
    res.queried = g.prefix_query_tokens;
    res.hit = g.prefix_hit_tokens;
    res.preempted = sched.n_preempted();
    res.evicted = g.prefix_evicted_blocks;
  });
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

}  // namespace
}  // namespace cpinfer::server::test
