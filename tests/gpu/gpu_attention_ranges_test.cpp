// CUDA vs CPU for what context parallelism relies on in attention: key ranges (AttnBlock kv_begin /
// kv_end: the diagonal and prefix parts of zigzag blocks, ranges that cut the causal frontier or
// are empty) on every kernel, prefill and decode; the merge of a diagonal and a prefix part by
// attention_merge against one full attention; attention_merge itself against the CPU. The cache
// starts NaN-poisoned so a read of a slot that was never written shows up as a NaN output.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "attention_test_util.h"

namespace cpinfer::gputest {
namespace {

// Key ranges (AttnBlock kv_begin / kv_end) on every kernel: the diagonal and prefix parts of
// context-parallel blocks, on and off the 64-key tile grid, ranges that cut the causal frontier,
// start inside the block (its first queries see nothing) or are empty. Keys outside every range
// are NaN in the CUDA cache.
std::vector<BlockSpec> range_blocks() {
  constexpr int32_t kNo = AttnBlock::kNoBound;
  return {
      {300, 777, 0, 777, kNo},    // diagonal, off the tile grid
      {200, 1000, 0, 0, 1000},    // prefix, off the grid
      {128, 1024, 1, 1024, kNo},  // diagonal on the grid
      {130, 1024, 1, 0, 1024},    // prefix on the grid
      {150, 500, 2, 100, 560},    // range that cuts the causal frontier
      {100, 200, 2, 250, kNo},    // starts inside the block: its first 50 queries see nothing
      {70, 400, 2, 37, 333},      // ends before every query
      {40, 300, 3, 120, 120},     // empty
      {20, 50, 3, 400, kNo},      // after every query: empty
  };
}

TEST_F(AttnRunner, FlashKeyRanges) {
  run({"d128 bs16 ranges", 8, 2, 128, 16, range_blocks()}, 71);
  run({"d128 bs24 ranges", 4, 1, 128, 24, range_blocks()}, 72);
}

TEST_F(AttnRunner, GenericKeyRanges) {
  run({"d64 bs16 ranges", 4, 2, 64, 16, range_blocks()}, 73);
  run({"d96 bs8 ranges", 3, 1, 96, 8, range_blocks()}, 74);
}

TEST_F(AttnRunner, DecodeKeyRanges) {
  constexpr int32_t kNo = AttnBlock::kNoBound;
  // Long ranges take the split-K path (splits over the range, not over [0, position]).
  run({"d128 split decode ranges",
       8,
       2,
       128,
       16,
       {{1, 9000, 0, 0, 4000},
        {1, 6000, 1, 2500, kNo},
        {1, 3000, 2, 1000, 2500},
        {1, 700, 3, 700, kNo},
        {1, 500, 4, 600, kNo},
        {1, 80, 5, 30, 30}}},
      75);
  run({"d64 decode ranges", 4, 4, 64, 32, {{1, 250, 0, 100, kNo}, {1, 5, 1, 0, 3}, {1, 40, 2, 41, kNo}}}, 76);
}

// Context parallelism overlaps the K/V exchange with the diagonal part of each local block
// (kv_begin = pos_begin) and adds the prefix part (kv_end = pos_begin) with attention_merge: at the
// Qwen3-30B-A3B attention shape (32 / 4 heads, head_dim 128) on zigzag blocks, the merge must equal
// one full attention within bf16 rounding (CPU fp32 reference), and a block at position 0 (empty
// prefix) must come back unchanged.
TEST_F(AttnRunner, DiagonalMergedWithPrefixEqualsFull) {
  // seq 0: 2900 tokens over C = 4 (8 zigzag blocks of 363/362), rank 0's blocks 0 and 7;
  // seq 1: 517 cached + 1203 new over C = 2 (4 blocks of 301/300), rank 1's blocks 1 and 2.
  const AttnCase c{"cp zigzag", 32, 4, 128, 16, {{363, 0, 0}, {362, 2538, 0}, {301, 818, 1}, {301, 1119, 1}}};
  Prepared p = prepare(c, 61);
  std::vector<AttnBlock> diag = p.blocks, prefix = p.blocks;
  for (size_t i = 0; i < p.blocks.size(); ++i) {
    diag[i].kv_begin = p.blocks[i].pos_begin;
    prefix[i].kv_end = p.blocks[i].pos_begin;
  }
  Tensor co, clse;
  cpu_attention(p, p.blocks, co, clse);
  const int64_t n0 = p.blocks[0].q_len * p.hq;  // rows of the block at position 0
  for (PK kernel : kernels(p, p.blocks))
    for (const cuda::AttentionWsConfig& ws : ws_configs(kernel)) {
      const std::string sh = std::string("cp zigzag") + kernel_tag(kernel, ws) + " T=" + std::to_string(p.t);
      Tensor d_o, d_l, p_o, p_l;
      gpu_attention(p, diag, kernel, d_o, d_l, true, ws);
      gpu_attention(p, prefix, kernel, p_o, p_l, true, ws);
      const std::vector<float> diag_out = gpu_read(d_o), diag_lse = gpu_read(d_l);
      gpu_->attention_merge(d_o, d_l, p_o, p_l);
      const std::vector<float> m_out = gpu_read(d_o), m_lse = gpu_read(d_l);
      expect_close("merge.out", sh, m_out, cpu_read(co), 1e-4, 0.05);
      expect_close("merge.lse", sh, m_lse, cpu_read(clse), 1e-8, 2e-3);
      expect_close("merge.empty", sh, std::vector<float>(m_out.begin(), m_out.begin() + n0 * p.d),
                   std::vector<float>(diag_out.begin(), diag_out.begin() + n0 * p.d), 0.0, 0.0);
      expect_close("merge.empty_lse", sh, std::vector<float>(m_lse.begin(), m_lse.begin() + n0),
                   std::vector<float>(diag_lse.begin(), diag_lse.begin() + n0), 0.0, 0.0);
    }
}

// attention_merge CUDA vs CPU on the same (bf16-rounded) inputs: two finite sides close and far
// apart, one empty side (-inf; its out is NaN and must not be read: the other side comes back
// bit for bit), both empty (0, -inf); BF16 and F32 activations, head dims 128, 96 and 20.
TEST_F(AttnRunner, AttentionMergeMatchesCpu) {
  Rng rng(81);
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t d : {128, 96, 20}) {
      const int64_t t = 37, hq = 8, rows = t * hq;
      auto o1 = rng.bf16_normal(rows * d), o2 = rng.bf16_normal(rows * d);
      std::vector<float> l1(rows), l2(rows);
      for (int64_t r = 0; r < rows; ++r) {
        l1[r] = bf16_to_f32(f32_to_bf16(static_cast<float>(rng.integer(-300, 800)) / 100.0f));
        l2[r] = bf16_to_f32(f32_to_bf16(static_cast<float>(rng.integer(-300, 800)) / 100.0f));
        switch (r % 5) {
          case 1:
            l1[r] = -inf;
            break;
          case 2:
            l2[r] = -inf;
            break;
          case 3:
            l1[r] = l2[r] = -inf;
            break;
          case 4:
            l2[r] = l1[r] + 60.0f;
            break;  // weight e^-60 on side 1
          default:
            break;
        }
        for (int64_t e = 0; e < d; ++e) {
          if (std::isinf(l1[r])) o1[r * d + e] = nan;
          if (std::isinf(l2[r])) o2[r * d + e] = nan;
        }
      }
      Tensor co = cpu_f32(o1, {t, hq, d}), cl = cpu_f32(l1, {t, hq});
      cpu_->attention_merge(co, cl, cpu_f32(o2, {t, hq, d}), cpu_f32(l2, {t, hq}));
      Tensor go = gpu_tensor("merge.out", dt, {t, hq, d}, &o1), gl = gpu_tensor("merge.lse", DType::F32, {t, hq}, &l1);
      gpu_->attention_merge(go, gl, gpu_tensor("merge.out2", dt, {t, hq, d}, &o2),
                            gpu_tensor("merge.lse2", DType::F32, {t, hq}, &l2));
      const std::string sh = std::string(dt == DType::BF16 ? "bf16 " : "f32 ") + shape_of({t, hq, d});
      std::vector<float> got_o = gpu_read(go), got_l = gpu_read(gl), ref_o = cpu_read(co), ref_l = cpu_read(cl);
      int64_t bad = 0;
      for (int64_t r = 0; r < rows; ++r) {
        const std::vector<float>* kept = r % 5 == 1 ? &o2 : r % 5 == 2 ? &o1 : nullptr;
        for (int64_t e = 0; e < d; ++e) {
          if (kept) bad += got_o[r * d + e] != (*kept)[r * d + e];
          if (r % 5 == 3) bad += got_o[r * d + e] != 0.0f;
        }
        if (r % 5 == 3) {
          bad += got_l[r] != -inf || ref_l[r] != -inf;
          got_l[r] = ref_l[r] = 0.0f;
        }
      }
      EXPECT_EQ(bad, 0) << sh << ": an empty side must leave the other bit for bit; both empty: 0, -inf";
      expect_close("merge.out", sh, got_o, ref_o, dt == DType::BF16 ? 2e-5 : 1e-12, dt == DType::BF16 ? 0.02 : 1e-5);
      expect_close("merge.lse", sh, got_l, ref_l, 1e-12, 5e-5);  // a few ulp at |lse| ~ 68
    }
  Tensor o = gpu_tensor("o", DType::BF16, {2, 3, 4}, nullptr), l = gpu_tensor("l", DType::F32, {2, 3}, nullptr);
  EXPECT_THROW(gpu_->attention_merge(o, l, gpu_tensor("o5", DType::BF16, {2, 3, 5}, nullptr), l), Error);
  EXPECT_THROW(gpu_->attention_merge(o, l, gpu_tensor("of", DType::F32, {2, 3, 4}, nullptr), l), Error);
  EXPECT_THROW(gpu_->attention_merge(o, l, o, gpu_tensor("l33", DType::F32, {3, 3}, nullptr)), Error);
}

}  // namespace
}  // namespace cpinfer::gputest
