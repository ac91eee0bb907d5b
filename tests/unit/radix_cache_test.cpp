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
  EXPECT_EQ(t.match(seq(3)).n_tokens(), 0);
  EXPECT_EQ(t.match(seq(3)).last, nullptr);
  auto b = seq(12);
  b[5] = 99;  // differs inside the second page
  EXPECT_EQ(t.match(b).blocks, (std::vector<int32_t>{100}));
  EXPECT_EQ(t.match(seq(8, 1)).n_tokens(), 0);  // same tokens shifted: no match
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
    EXPECT_EQ(t.match(tokens).n_tokens(), n);
  }  // destroyed with the whole path in it
  RadixCache t(1);
  t.insert(tokens, tokens);
  const auto freed = t.evict(n);
  ASSERT_EQ(freed.size(), size_t(n));
  EXPECT_EQ(freed.front(), n - 1);  // leaf first, root's child last
  EXPECT_EQ(freed.back(), 0);
}
