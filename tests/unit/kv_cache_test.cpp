#include <gtest/gtest.h>

#include <memory>
#include <random>

#include "kv/kv_cache.h"
#include "parallel/plan.h"

using namespace cpinfer;

TEST(KvCache, AllocatesBlocksAndFreesThem) {
  auto be = make_cpu_backend();
  KvCache c(*be, KvCacheShape{2, 2, 4, 16, 10, DType::F32});
  int a = c.add_sequence();
  c.reserve(a, 17);  // 2 blocks
  EXPECT_EQ(c.blocks(a).size(), 2u);
  EXPECT_EQ(c.n_free_blocks(), 8);
  int b = c.add_sequence();
  EXPECT_FALSE(c.can_reserve(b, 16 * 9));
  EXPECT_THROW(c.reserve(b, 16 * 9), Error);
  EXPECT_EQ(c.n_free_blocks(), 8);  // a failed reserve takes nothing
  c.reserve(b, 16 * 8);
  EXPECT_EQ(c.n_free_blocks(), 0);
  EXPECT_NEAR(c.usage(), 1.0, 1e-9);
  // Slots follow the page table.
  EXPECT_EQ(c.slot(a, 17), c.blocks(a)[1] * 16 + 1);
  EXPECT_THROW(c.slot(a, 40), Error);
  c.free_sequence(a);
  c.free_sequence(b);
  EXPECT_EQ(c.n_free_blocks(), 10);
  EXPECT_EQ(c.add_sequence(), 0);  // ids are reused
  EXPECT_THROW(c.free_sequence(5), Error);
}

TEST(KvCache, ReadReturnsWhatKvStoreWrote) {
  auto be = make_cpu_backend();
  KvCache c(*be, KvCacheShape{1, 2, 4, 4, 8, DType::F32});
  int s = c.add_sequence();
  c.reserve(s, 6);
  std::vector<float> k(6 * 8), v(6 * 8);
  for (size_t i = 0; i < k.size(); ++i) k[i] = float(i), v[i] = -float(i);
  std::vector<int32_t> slots;
  for (int p = 0; p < 6; ++p) slots.push_back(c.slot(s, p));
  be->kv_store(Tensor(k.data(), DType::F32, {6, 2, 4}), Tensor(v.data(), DType::F32, {6, 2, 4}),
               Tensor(slots.data(), DType::I32, {6}), c.layer(0));
  c.set_length(s, 6);
  EXPECT_EQ(c.read(s, 0, false), k);
  EXPECT_EQ(c.read(s, 0, true), v);
}

// Sharded KV: every rank's cache keeps the same count of every rank's blocks, so the free blocks
// (the fewest any rank has) and a failed reserve agree on all ranks; and the blocks a rank holds
// for a sequence stay within KvCache::shard_positions_bound — the bound the server's admission
// counts on — through random chunked prefills and decode steps planned as the engine plans them.
TEST(KvCache, ShardedAccountingAgreesOnEveryRankAndStaysWithinTheBound) {
  auto be = make_cpu_backend();
  for (int C : {2, 3, 4}) {
    for (int I : {1, 3}) {
      constexpr int kBs = 4, kBlocks = 400;
      std::vector<std::unique_ptr<KvCache>> caches;
      for (int r = 0; r < C; ++r) {
        caches.push_back(std::make_unique<KvCache>(*be, KvCacheShape{1, 1, 4, kBs, kBlocks, DType::F32}));
        caches.back()->enable_shard(r, C, I);
      }
      CpOptions opt;
      opt.cp_size = C;
      opt.enable_prefill_cp = true;
      opt.kv_shard = true;
      opt.kv_interleave = I;
      std::mt19937 rng(static_cast<uint32_t>(C * 10 + I));
      std::vector<int32_t> tokens(64, 7);
      for (int trial = 0; trial < 6; ++trial) {
        std::vector<int> seqs;
        for (auto& c : caches) seqs.push_back(c->add_sequence());
        int length = 0, prefill_forwards = 0;
        for (int step = 0; step < 40; ++step) {
          const bool prefill = step < 8 && rng() % 2 == 0;
          const int n = prefill ? 1 + static_cast<int>(rng() % 60) : 1;
          prefill_forwards += prefill;
          for (int r = 0; r < C; ++r) caches[r]->reserve(seqs[r], length + n);
          for (int r = 1; r < C; ++r) ASSERT_EQ(caches[r]->n_free_blocks(), caches[0]->n_free_blocks());
          const std::vector<SeqWork> work = {SeqWork{seqs[0], length, std::span<const int32_t>(tokens.data(), n)}};
          for (int r = 0; r < C; ++r) {
            std::vector<SeqWork> w = work;
            w[0].kv_seq = seqs[r];
            const ForwardPlan plan = make_plan(w, *caches[r], r, opt);
            record_shard(plan, w, *caches[r]);
            caches[r]->set_length(seqs[r], length + n);
          }
          length += n;
          const int64_t bound = caches[0]->positions_bound(length, std::max(1, prefill_forwards));
          for (int r = 0; r < C; ++r) {
            EXPECT_LE(caches[0]->owned(seqs[0], r), bound) << "C " << C << " I " << I << " rank " << r;
            EXPECT_LE(int64_t(caches[r]->blocks(seqs[r]).size()) * kBs, bound + kBs - 1)
                << "C " << C << " I " << I << " rank " << r << " length " << length;
          }
        }
        // Too much for any rank: refused on every rank alike, nothing taken.
        const int free = caches[0]->n_free_blocks();
        for (int r = 0; r < C; ++r) {
          EXPECT_FALSE(caches[r]->can_reserve(seqs[r], length + 10 * kBlocks * kBs));
          EXPECT_THROW(caches[r]->reserve(seqs[r], length + 10 * kBlocks * kBs), Error);
          EXPECT_EQ(caches[r]->n_free_blocks(), free);
        }
        for (int r = 0; r < C; ++r) caches[r]->free_sequence(seqs[r]);
        for (int r = 0; r < C; ++r) EXPECT_EQ(caches[r]->n_free_blocks(), kBlocks);
      }
      // A fresh sequence's first forward and the room for growth follow the same per-rank rule.
      KvCache& c = *caches[0];
      EXPECT_EQ(c.blocks_needed_new(100), ((100 + C - 1) / C + I - 1 + kBs - 1) / kBs);
      const int s = c.add_sequence();
      const int room = c.room_tokens(s, 3);
      EXPECT_LE(c.blocks_needed(s, room), 3);
      EXPECT_GT(c.blocks_needed(s, room + C), 3);
      c.free_sequence(s);
    }
  }
}
