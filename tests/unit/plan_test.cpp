#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "parallel/plan.h"

using namespace cpinfer;

namespace {
struct Fixture {
  std::unique_ptr<Backend> be = make_cpu_backend();
  KvCache cache{*be, KvCacheShape{1, 1, 2, 4, 4096, DType::F32}};
};
}  // namespace

TEST(Zigzag, BoundsSpreadTheRemainderOverTheFirstBlocks) {
  auto b = zigzag_bounds(11, 2);  // 4 blocks: 3, 3, 3, 2
  EXPECT_EQ(b, (std::vector<int32_t>{0, 3, 6, 9, 11}));
  b = zigzag_bounds(3, 4);  // 8 blocks: 1, 1, 1, 0, ...
  EXPECT_EQ(b.back(), 3);
  EXPECT_EQ(b[3], 3);
  for (int n : {1, 7, 8, 9, 1009, 4096})
    for (int c : {1, 2, 3, 5, 8, 12}) {
      auto bb = zigzag_bounds(n, c);
      ASSERT_EQ(bb.size(), size_t(2 * c + 1));
      EXPECT_EQ(bb.back(), n);
      for (int i = 0; i < 2 * c; ++i) {
        int len = bb[i + 1] - bb[i];
        EXPECT_TRUE(len == n / (2 * c) || len == n / (2 * c) + 1);
      }
    }
}

TEST(Zigzag, CanCpSplitHonoursTheThreshold) {
  CpOptions o{4, true, 0};
  EXPECT_FALSE(can_cp_split(7, o));  // default threshold 2C = 8
  EXPECT_TRUE(can_cp_split(8, o));
  o.min_tokens = 100;
  EXPECT_FALSE(can_cp_split(99, o));
  EXPECT_TRUE(can_cp_split(100, o));
  o.enable_prefill_cp = false;
  EXPECT_FALSE(can_cp_split(1000, o));
  EXPECT_FALSE(can_cp_split(1000, CpOptions{1, true, 0}));
}

// Every token of every sequence is computed by exactly one rank, at its global position, and the
// slot list (the K/V exchange order) is the same on every rank.
TEST(Plan, EveryTokenOwnedOnceAndRankZeroHoldsTheLastToken) {
  for (int cp : {1, 2, 3, 5, 8}) {
    Fixture f;
    std::vector<std::vector<int32_t>> prompts = {std::vector<int32_t>(37), std::vector<int32_t>(1),
                                                 std::vector<int32_t>(2 * cp + 1), std::vector<int32_t>(5)};
    std::vector<SeqWork> work;
    int cached = 3;
    for (size_t s = 0; s < prompts.size(); ++s) {
      std::iota(prompts[s].begin(), prompts[s].end(), int32_t(100 * s));
      int seq = f.cache.add_sequence();
      int pre = s == 0 ? cached : 0;
      f.cache.reserve(seq, pre + int(prompts[s].size()));
      f.cache.set_length(seq, pre);
      work.push_back(SeqWork{seq, pre, prompts[s], s == 1 ? LogitsWanted::All : LogitsWanted::Last});
    }
    CpOptions opt{cp, true, 0};
    std::vector<ForwardPlan> plans;
    for (int r = 0; r < cp; ++r) plans.push_back(make_plan(work, f.cache, r, opt));
    std::vector<std::vector<int>> seen(prompts.size());
    for (size_t s = 0; s < prompts.size(); ++s) seen[s].assign(prompts[s].size(), 0);
    for (int r = 0; r < cp; ++r) {
      EXPECT_EQ(plans[r].slots_all, plans[0].slots_all);
      EXPECT_EQ(plans[r].rows_per_rank, plans[0].rows_per_rank);
      ASSERT_EQ(plans[r].n_local(), plans[0].rows_per_rank[r]);
      for (const AttnBlock& a : plans[r].attn) {
        for (int i = 0; i < a.q_len; ++i) {
          int pos = a.pos_begin + i;
          const SeqWork& w = work[a.seq];
          int src = pos - w.n_cached;
          ASSERT_GE(src, 0);
          seen[a.seq][src]++;
          EXPECT_EQ(plans[r].tokens[a.q_begin + i], prompts[a.seq][src]);
          EXPECT_EQ(plans[r].positions[a.q_begin + i], pos);
        }
      }
    }
    for (auto& v : seen)
      for (int c : v) EXPECT_EQ(c, 1);
    // Logit rows: last token of sequences 0, 2, 3 and every token of sequence 1.
    EXPECT_EQ(plans[0].logit_rows_all.size(), 3u + prompts[1].size());
    // A zigzag-split prompt's last token sits in block 2C-1, which rank 0 owns.
    if (cp > 1) {
      bool rank0_has_last = false;
      for (const AttnBlock& a : plans[0].attn)
        if (a.seq == 0 && a.pos_begin + a.q_len == cached + 37) rank0_has_last = true;
      EXPECT_TRUE(rank0_has_last) << "cp=" << cp;
    }
  }
}

TEST(Plan, ZigzagBalancesCausalWork) {
  Fixture f;
  std::vector<int32_t> p(4000, 1);
  int seq = f.cache.add_sequence();
  f.cache.reserve(seq, 4000);
  std::vector<SeqWork> work{{seq, 0, p, LogitsWanted::Last}};
  const int cp = 4;
  std::vector<double> work_per_rank;
  for (int r = 0; r < cp; ++r) {
    auto plan = make_plan(work, f.cache, r, CpOptions{cp, true, 0});
    double w = 0;
    for (auto& a : plan.attn) w += double(a.q_len) * (a.pos_begin + a.q_len / 2.0);
    work_per_rank.push_back(w);
  }
  double mx = *std::max_element(work_per_rank.begin(), work_per_rank.end());
  double mn = *std::min_element(work_per_rank.begin(), work_per_rank.end());
  EXPECT_LT((mx - mn) / mx, 0.01);
}

TEST(Plan, RejectsAStaleCacheLength) {
  Fixture f;
  std::vector<int32_t> p(10, 1);
  int seq = f.cache.add_sequence();
  f.cache.reserve(seq, 10);
  std::vector<SeqWork> work{{seq, 4, p, LogitsWanted::Last}};
  EXPECT_THROW(make_plan(work, f.cache, 0, CpOptions{}), Error);
}
