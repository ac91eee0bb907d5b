#include <gtest/gtest.h>

#include "kv/kv_cache.h"

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
