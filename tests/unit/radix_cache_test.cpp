// The prefix cache's radix tree (pages of 4 tokens here) and the KV cache's shared blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>

#include "kv/kv_cache.h"
#include "kv/radix_cache.h"

using namespace cpinfer;

namespace {
std::vector<int32_t> seq(int n, int32_t start = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}
std::vector<int32_t> sorted(std::vector<int32_t> v) {
  std::sort(v.begin(), v.end());
  return v;
}
}  // namespace

TEST(RadixCache, MatchesWholePagesOnlyAndNonAlignedEndsStopAtTheLastWholePage) {
  RadixCache t(4);
  const auto a = seq(10);  // pages [0..3], [4..7]; tokens 8, 9 are a partial page
  EXPECT_EQ(t.insert(a, std::vector<int32_t>{100, 101, 102}), (std::vector<int32_t>{100, 101}));
  EXPECT_EQ(t.n_cached_blocks(), 2);
  EXPECT_EQ(t.match(a).blocks, (std::vector<int32_t>{100, 101}));
  EXPECT_EQ(t.match(seq(7)).blocks, (std::vector<int32_t>{100}));  // the prefix ends inside page 2
  EXPECT_EQ(t.match(seq(3)).n_pages(), 0);
  EXPECT_EQ(t.match(seq(3)).last, nullptr);
  auto b = seq(12);
  b[5] = 99;  // differs inside the second page
  EXPECT_EQ(t.match(b).blocks, (std::vector<int32_t>{100}));
  EXPECT_EQ(t.match(seq(8, 1)).n_pages(), 0);  // same tokens shifted: no match
}

TEST(RadixCache, InsertBranchesInsideACachedPathAndKeepsExistingBlocks) {
  RadixCache t(4);
  t.insert(seq(12), std::vector<int32_t>{1, 2, 3});
  auto b = seq(16);
  b[9] = 77;  // shares pages 0 and 1, then branches: a split of the cached path after page 1
  // Pages 0 and 1 are cached already: the tree keeps blocks 1 and 2 and takes only 13 and 14.
  EXPECT_EQ(t.insert(b, std::vector<int32_t>{11, 12, 13, 14}), (std::vector<int32_t>{13, 14}));
  EXPECT_EQ(t.n_cached_blocks(), 5);
  EXPECT_EQ(t.match(b).blocks, (std::vector<int32_t>{1, 2, 13, 14}));
  EXPECT_EQ(t.match(seq(12)).blocks, (std::vector<int32_t>{1, 2, 3}));
  // Inserting the same tokens again takes nothing.
  EXPECT_TRUE(t.insert(seq(12), std::vector<int32_t>{21, 22, 23}).empty());
  EXPECT_THROW(t.insert(seq(8), std::vector<int32_t>{1}), Error);  // fewer blocks than pages
}

TEST(RadixCache, EvictsLeastRecentlyUsedLeavesFirstAndNeverAPinnedPage) {
  RadixCache t(4);
  t.insert(seq(8, 0), std::vector<int32_t>{1, 2});    // path A: 1 -> 2
  t.insert(seq(8, 100), std::vector<int32_t>{3, 4});  // path B: 3 -> 4
  t.insert(seq(8, 200), std::vector<int32_t>{5, 6});  // path C: 5 -> 6
  t.match(seq(8, 0));                                 // A is now the most recently used
  auto pinned = t.match(seq(8, 100));                 // B is pinned (a running request)
  t.pin(pinned.last);
  EXPECT_EQ(t.n_evictable_blocks(), 4);
  // LRU order: C (oldest, leaf first then its parent), then A; B never.
  EXPECT_EQ(t.evict(1), (std::vector<int32_t>{6}));
  EXPECT_EQ(t.evict(2), (std::vector<int32_t>{5, 2}));
  EXPECT_EQ(t.evict(10), (std::vector<int32_t>{1}));
  EXPECT_EQ(t.n_cached_blocks(), 2);
  EXPECT_EQ(t.n_evictable_blocks(), 0);
  EXPECT_EQ(t.match(seq(8, 100)).blocks, (std::vector<int32_t>{3, 4}));
  // Pinning a prefix pins its ancestors only: a longer unpinned branch below stays evictable.
  t.unpin(pinned.last);
  auto half = t.match(seq(4, 100));
  t.pin(half.last);
  EXPECT_EQ(t.evict(10), (std::vector<int32_t>{4}));
  t.unpin(half.last);
  EXPECT_THROW(t.unpin(half.last), Error);
  EXPECT_EQ(t.clear(), (std::vector<int32_t>{3}));
  EXPECT_EQ(t.n_cached_blocks(), 0);
}

TEST(RadixCache, InteriorNodesWaitForTheirChildren) {
  RadixCache t(2);
  t.insert(seq(6), std::vector<int32_t>{1, 2, 3});
  t.insert(seq(2), std::vector<int32_t>{9});  // touches node 1 only: it is newer, but interior
  EXPECT_EQ(t.evict(1), (std::vector<int32_t>{3}));
  EXPECT_EQ(sorted(t.evict(5)), (std::vector<int32_t>{1, 2}));
}

TEST(KvCache, SharedBlocksAreFreedWithTheirLastReference) {
  auto be = make_cpu_backend();
  KvCache c(*be, KvCacheShape{1, 1, 4, 4, 6, DType::F32});
  int a = c.add_sequence();
  c.reserve(a, 8);  // 2 blocks
  c.set_length(a, 8);
  const std::vector<int32_t> ab = c.blocks(a);
  for (int32_t b : ab) c.retain(b);  // a prefix cache keeps them
  c.free_sequence(a);
  EXPECT_EQ(c.n_free_blocks(), 4);
  int s = c.add_sequence();
  c.share(s, ab[0]);
  c.share(s, ab[1]);
  EXPECT_EQ(c.length(s), 8);
  EXPECT_EQ(c.ref_count(ab[0]), 2);
  c.reserve(s, 10);  // one new block after the shared ones
  EXPECT_EQ(c.n_free_blocks(), 3);
  EXPECT_EQ(c.slot(s, 5), ab[1] * 4 + 1);
  EXPECT_THROW(c.share(s, ab[0]), Error);  // after a partly written block
  c.free_sequence(s);
  EXPECT_EQ(c.n_free_blocks(), 4);  // the shared blocks are still the cache's
  c.release(ab[0]);
  c.release(ab[1]);
  EXPECT_EQ(c.n_free_blocks(), 6);
  EXPECT_THROW(c.release(ab[0]), Error);
  EXPECT_THROW(c.retain(ab[0]), Error);
  EXPECT_THROW(c.share(c.add_sequence(), ab[0]), Error);  // a free block cannot be shared
  EXPECT_THROW(c.ref_count(6), Error);
}

TEST(RadixCache, AVeryLongPathIsMatchedEvictedAndDestroyedWithoutRecursion) {
  const int n = 300000;  // one-token pages: a path 300000 nodes deep
  const auto tokens = seq(n);
  {
    RadixCache t(1);
    EXPECT_EQ(t.insert(tokens, tokens).size(), size_t(n));
    EXPECT_EQ(t.match(tokens).n_pages(), n);
  }  // destroyed with the whole path in it
  RadixCache t(1);
  t.insert(tokens, tokens);
  const auto freed = t.evict(n);
  ASSERT_EQ(freed.size(), size_t(n));
  EXPECT_EQ(freed.front(), n - 1);  // leaf first, root's child last
  EXPECT_EQ(freed.back(), 0);
}

// A page's tag (its KV layout: with sharded KV, the owner rank of each position) is part of its
// key: the same tokens written with another layout are another node, and a match follows the tokens
// through every layout to the deepest path. A ref listed by several pages is taken, counted and
// freed once, and is evictable (per group) only while no pinned page lists it.
TEST(RadixCache, LayoutsAreSeparateBranchesAndSharedRefsAreCountedOnce) {
  RadixCache t(2, 2, 100);  // refs 0..99: group 0, 100..199: group 1
  // Path a: page 1 lists 101 again (a block begun in page 0), page 2 lists 102 again.
  std::vector<CachedPage> a = {{{1, 1}, {1, 101}}, {{1, 1}, {101, 102}}, {{0, 0}, {2, 102}}};
  EXPECT_EQ(sorted(t.insert(seq(6), a)), (std::vector<int32_t>{1, 2, 101, 102}));
  EXPECT_EQ(t.n_cached_blocks(), 4);
  EXPECT_EQ(t.n_evictable_blocks(0), 2);
  EXPECT_EQ(t.n_evictable_blocks(1), 2);
  // Path b: the same tokens in another layout, one page longer. A match takes the deepest path.
  std::vector<CachedPage> b = {{{1, 0}, {103, 3}}, {{0, 1}, {4, 104}}, {{1, 0}, {105, 5}}, {{0, 1}, {6, 106}}};
  EXPECT_EQ(t.insert(seq(8), b).size(), 8u);
  EXPECT_EQ(t.n_pages(), 7);
  EXPECT_EQ(t.n_cached_blocks(), 12);
  auto m = t.match(seq(8));
  ASSERT_EQ(m.n_pages(), 4);
  EXPECT_EQ(m.pages[0]->tag, (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(m.pages[3]->refs, (std::vector<int32_t>{6, 106}));
  EXPECT_TRUE(t.insert(seq(8), b).empty()) << "the same tokens in the same layout are cached already";
  // Equally deep: the first layout in key order wins (a: its page 0 key ends 1, 1).
  auto pin = t.match(seq(4));
  ASSERT_EQ(pin.n_pages(), 2);
  EXPECT_EQ(pin.pages[1]->refs, (std::vector<int32_t>{101, 102}));
  // Pinned: a's pages 0 and 1, so refs 1, 101 and 102; a's page 2 stays evictable but frees only 2.
  t.pin(pin.last);
  EXPECT_EQ(t.n_evictable_blocks(0), 5);  // 2; b's 3, 4, 5, 6
  EXPECT_EQ(t.n_evictable_blocks(1), 4);  // b's 103..106
  EXPECT_EQ(sorted(t.clear()), (std::vector<int32_t>{2, 3, 4, 5, 6, 103, 104, 105, 106}));
  EXPECT_EQ(t.n_cached_blocks(), 3);
  EXPECT_EQ(t.n_pages(), 2);
  t.unpin(pin.last);
  EXPECT_EQ(sorted(t.clear()), (std::vector<int32_t>{1, 101, 102}));
  EXPECT_EQ(t.n_cached_blocks(), 0);
  EXPECT_EQ(t.n_evictable_blocks(0) + t.n_evictable_blocks(1), 0);
}

// Sharded KV (two ranks, pages of 4): a sequence's whole pages as the prefix cache keeps them, and
// a new sequence adopting them: every rank's full pages shared, its partly filled last page copied,
// the ownership replayed, so each rank's shard holds the same K/V at the same positions.
TEST(KvCache, ShardedPrefixIsAdoptedRankByRank) {
  auto be = make_cpu_backend();
  constexpr int kBs = 4, C = 2;
  std::vector<std::unique_ptr<KvCache>> caches;
  for (int r = 0; r < C; ++r) {
    caches.push_back(std::make_unique<KvCache>(*be, KvCacheShape{1, 1, 2, kBs, 8, DType::F32}));
    caches.back()->enable_shard(r, C, 1);
  }
  // A prefill of 10 positions split zigzag: rank 0 owns [0, 3) and [8, 10), rank 1 [3, 8).
  const std::vector<std::array<int, 3>> runs = {{0, 0, 3}, {1, 3, 5}, {0, 8, 2}};
  int a = -1;
  for (int r = 0; r < C; ++r) {
    KvCache& c = *caches[size_t(r)];
    a = c.add_sequence();
    c.reserve(a, 10);
    for (const auto& [rank, begin, n] : runs) c.add_owned(a, rank, begin, n);
    c.set_length(a, 10);
    std::vector<float> k, v;
    std::vector<int32_t> slots;
    int local = 0;
    for (const auto& [rank, begin, n] : runs)
      for (int p = begin; p < begin + n && rank == r; ++p) {
        k.insert(k.end(), {float(p), float(p) + 0.5f});
        v.insert(v.end(), {-float(p), -float(p) - 0.5f});
        slots.push_back(c.local_slot(a, local++));
      }
    const int64_t n = static_cast<int64_t>(slots.size());
    be->kv_store(Tensor(k.data(), DType::F32, {n, 1, 2}), Tensor(v.data(), DType::F32, {n, 1, 2}),
                 Tensor(slots.data(), DType::I32, {n}), c.layer(0));
  }
  KvCache& c0 = *caches[0];
  const std::vector<CachedPage> pages = c0.cached_pages(a, 2);
  ASSERT_EQ(pages.size(), 2u);
  EXPECT_EQ(pages[0].tag, (std::vector<int32_t>{0, 0, 0, 1}));
  EXPECT_EQ(pages[1].tag, (std::vector<int32_t>{1, 1, 1, 1}));
  // Page 0: each rank's partly filled first block. Page 1: rank 0's still partly filled block
  // (it owns nothing there), rank 1's first block (full now) and its partly filled second.
  const std::vector<int32_t> b0 = c0.blocks(a);
  const std::vector<int32_t> b1 = caches[1]->blocks(a);
  EXPECT_EQ(pages[0].refs, (std::vector<int32_t>{c0.page_ref(0, b0[0]), c0.page_ref(1, b1[0])}));
  EXPECT_EQ(pages[1].refs, (std::vector<int32_t>{c0.page_ref(0, b0[0]), c0.page_ref(1, b1[0]), c0.page_ref(1, b1[1])}));
  EXPECT_EQ(caches[1]->cached_pages(a, 2)[1].refs, pages[1].refs) << "every rank names every rank's blocks";
  const std::vector<float> k0 = c0.read(a, 0, false), v1 = caches[1]->read(a, 0, true);

  // The tree holds the pages; the sequence goes; a new one adopts them.
  std::vector<int32_t> held;
  for (const CachedPage& p : pages)
    for (int32_t ref : p.refs)
      if (std::find(held.begin(), held.end(), ref) == held.end()) held.push_back(ref);
  const std::vector<const CachedPage*> path = {&pages[0], &pages[1]};
  for (int r = 0; r < C; ++r) {
    KvCache& c = *caches[size_t(r)];
    for (int32_t ref : held) c.retain(c.ref_block(ref), c.ref_rank(ref));
    c.free_sequence(a);
    const KvCache::Adoption ad = c.adoption(path);
    EXPECT_EQ(ad.shares, (std::vector<std::array<int32_t, 2>>{{1, b1[0]}}));
    EXPECT_EQ(ad.tails, (std::vector<std::array<int32_t, 3>>{{0, b0[0], 3}, {1, b1[1], 1}}));
    EXPECT_EQ(ad.runs, (std::vector<std::array<int32_t, 2>>{{0, 3}, {1, 5}}));
    // Growing to 12 (2 positions a rank): rank 0 copies its tail and takes one block more; rank 1
    // copies its tail, which has room.
    EXPECT_EQ(c.blocks_to_adopt(ad, 12), 2);
    const int s = c.add_sequence();
    for (const auto& [rank, block] : ad.shares) c.share(s, block, rank);
    for (const auto& [rank, src, rows] : ad.tails) c.copy_tail(s, rank, src, rows);
    for (const auto& [rank, n] : ad.runs) c.adopt(s, rank, n);
    EXPECT_EQ(c.length(s), 8);
    EXPECT_EQ(c.owned(s, 0), 3);
    EXPECT_EQ(c.owned(s, 1), 5);
    EXPECT_EQ(c.ref_count(b1[0], 1), 2);  // the tree's and the new sequence's
    EXPECT_EQ(c.ref_count(b1[1], 1), 1);  // copied, not shared
    EXPECT_NE(c.blocks(s).back(), r == 0 ? b0[0] : b1[1]);
    EXPECT_EQ(c.owner_ranges(s, 1), (std::vector<std::array<int32_t, 2>>{{3, 5}}));
    if (r == 0) EXPECT_EQ(c.read(s, 0, false), std::vector<float>(k0.begin(), k0.begin() + 3 * 2));
    if (r == 1) EXPECT_EQ(c.read(s, 0, true), v1);
    // The rest is written after the adopted positions, never into a shared block.
    c.reserve(s, 12);
    // Each rank: the tree's blocks, the tail copy; rank 0 one block more for its share of [8, 12).
    EXPECT_EQ(c.n_free_blocks_on(0), 8 - 1 - 1 - 1);
    EXPECT_EQ(c.n_free_blocks_on(1), 8 - 2 - 1);
    c.free_sequence(s);
    for (int32_t ref : held) c.release(c.ref_block(ref), c.ref_rank(ref));
    for (int q = 0; q < C; ++q) EXPECT_EQ(c.n_free_blocks_on(q), 8) << "rank " << r << "'s view of rank " << q;
  }
}
