// CUDA vs CPU for kv_store + paged causal attention: the tensor-core path (head_dim 128) and the
// generic path (16/32/64, decode), block sizes that are and are not multiples of 16, queries at an
// offset inside a longer K/V (pos_begin > 0), several varlen blocks, zigzag (context-parallel)
// blocks of one sequence, scrambled block tables, and lse. The cache starts NaN-poisoned so a read
// of a slot that was never written shows up as a NaN output.
#include <algorithm>
#include <numeric>

#include "backends/cuda/cuda_backend.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

struct BlockSpec {
  int32_t q_len, pos_begin, seq;
};

struct AttnCase {
  std::string name;
  int64_t hq, hkv, d, block_size;
  std::vector<BlockSpec> blocks;
  bool scramble = true;
};

class AttnRunner : public GpuOpsTest {
 public:
  void run(const AttnCase& c, uint32_t seed) {
    Rng rng(seed);
    const int64_t hq = c.hq, hkv = c.hkv, d = c.d, bs = c.block_size;
    int n_seqs = 0;
    for (const auto& b : c.blocks) n_seqs = std::max(n_seqs, b.seq + 1);
    std::vector<int32_t> seq_len(n_seqs, 0);
    for (const auto& b : c.blocks) seq_len[b.seq] = std::max(seq_len[b.seq], b.pos_begin + b.q_len);
    int32_t mbps = 1, total_pages = 0;
    for (int32_t l : seq_len) {
      mbps = std::max<int32_t>(mbps, static_cast<int32_t>((l + bs - 1) / bs));
      total_pages += static_cast<int32_t>((l + bs - 1) / bs);
    }
    const int64_t n_cache_blocks = total_pages + 3;
    std::vector<int32_t> phys(n_cache_blocks);
    std::iota(phys.begin(), phys.end(), 0);
    if (c.scramble) std::shuffle(phys.begin(), phys.end(), rng.gen());
    std::vector<int32_t> table(static_cast<size_t>(n_seqs) * mbps, -1);  // unused entries stay -1
    int next = 0;
    for (int s = 0; s < n_seqs; ++s)
      for (int p = 0; p < (seq_len[s] + bs - 1) / bs; ++p) table[s * mbps + p] = phys[next++];

    // Caches: CPU F32 zeros, CUDA BF16 NaN-poisoned; every sequence's K/V written via kv_store.
    const std::vector<float> zeros(n_cache_blocks * bs * hkv * d, 0.0f);
    KvLayer ccache{cpu_f32(zeros, {n_cache_blocks, bs, hkv, d}), cpu_f32(zeros, {n_cache_blocks, bs, hkv, d})};
    KvLayer gcache{gpu_tensor("cache.k", DType::BF16, {n_cache_blocks, bs, hkv, d}, nullptr),
                   gpu_tensor("cache.v", DType::BF16, {n_cache_blocks, bs, hkv, d}, nullptr)};
    for (int s = 0; s < n_seqs; ++s) {
      const int64_t l = seq_len[s];
      if (l == 0) continue;
      auto k = rng.bf16_normal(l * hkv * d), v = rng.bf16_normal(l * hkv * d);
      std::vector<int32_t> slots(l);
      for (int64_t p = 0; p < l; ++p) slots[p] = static_cast<int32_t>(table[s * mbps + p / bs] * bs + p % bs);
      cpu_->kv_store(cpu_f32(k, {l, hkv, d}), cpu_f32(v, {l, hkv, d}), cpu_i32(slots, {l}), ccache);
      gpu_->kv_store(gpu_tensor("k", DType::BF16, {l, hkv, d}, &k), gpu_tensor("v", DType::BF16, {l, hkv, d}, &v),
                     gpu_i32("slots", slots, {l}), gcache);
    }

    // Query rows: blocks laid out back to back in the order given.
    std::vector<AttnBlock> blocks;
    int32_t t = 0, max_q = 0, max_kv = 0;
    for (const auto& b : c.blocks) {
      blocks.push_back(AttnBlock{t, b.q_len, b.pos_begin, b.seq});
      t += b.q_len;
      max_q = std::max(max_q, b.q_len);
      max_kv = std::max(max_kv, b.pos_begin + b.q_len);
    }
    std::vector<int32_t> flat;
    for (const auto& b : blocks) flat.insert(flat.end(), {b.q_begin, b.q_len, b.pos_begin, b.seq});
    auto q = rng.bf16_normal(static_cast<size_t>(t) * hq * d, 1.5f);
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    const int64_t nb = static_cast<int64_t>(blocks.size());

    AttnBatch cb;
    cb.blocks = blocks;
    cb.block_table = table;
    cb.max_blocks_per_seq = mbps;
    cb.max_q_len = max_q;
    cb.max_kv_len = max_kv;
    AttnBatch gb = cb;
    cb.dev_blocks = cpu_i32(flat, {nb, 4});
    cb.dev_block_table = cpu_i32(table, {n_seqs, mbps});
    gb.dev_blocks = gpu_i32("blocks", flat, {nb, 4});
    gb.dev_block_table = gpu_i32("table", table, {n_seqs, mbps});

    Tensor co = cpu_alloc(DType::F32, {t, hq, d}), clse = cpu_alloc(DType::F32, {t, hq});
    cpu_->attention(cpu_f32(q, {t, hq, d}), cb, ccache, scale, co, clse);
    // Head dim 128 with q_len > 1 runs a tensor-core kernel: check every one this GPU has.
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    using PK = cuda::CudaBackend::PrefillKernel;
    const PK initial = cuda.prefill_kernel();
    std::vector<PK> kernels = {PK::MmaSync};
    if (d == 128 && max_q > 1 && cuda.wgmma_supported()) kernels.push_back(PK::Wgmma);
    for (PK kernel : kernels) {
      cuda.set_prefill_kernel(kernel);
      Tensor go = gpu_tensor("out", DType::BF16, {t, hq, d}, nullptr);
      Tensor glse = gpu_tensor("lse", DType::F32, {t, hq}, nullptr);
      gpu_->attention(gpu_tensor("q", DType::BF16, {t, hq, d}, &q), gb, gcache, scale, go, glse);
      const std::string sh = c.name + (kernel == PK::Wgmma ? " wgmma" : "") + " T=" + std::to_string(t) +
                             " kv<=" + std::to_string(max_kv);
      expect_close("attention.out", sh, gpu_read(go), cpu_read(co), 1e-4, 0.05);
      expect_close("attention.lse", sh, gpu_read(glse), cpu_read(clse), 1e-8, 2e-3);
      // Without lse the output is the same.
      Tensor go2 = gpu_tensor("out2", DType::BF16, {t, hq, d}, nullptr);
      gpu_->attention(gpu_tensor("q2", DType::BF16, {t, hq, d}, &q), gb, gcache, scale, go2, Tensor{});
      expect_close("attention.nolse", sh, gpu_read(go2), gpu_read(go), 0.0, 0.0);
    }
    cuda.set_prefill_kernel(initial);
  }
};

TEST_F(AttnRunner, FlashSingleSequence) {
  run({"d128 bs16 prefill", 8, 2, 128, 16, {{300, 0, 0}}}, 11);
  run({"d128 bs16 q=128 exact", 4, 4, 128, 16, {{128, 0, 0}}}, 12);
  run({"d128 bs64 q=1..", 4, 1, 128, 64, {{2, 0, 0}}}, 13);
}

TEST_F(AttnRunner, FlashOffsetsAndVarlen) {
  run({"d128 bs16 pos_begin=200", 8, 2, 128, 16, {{150, 200, 0}}}, 21);
  run({"d128 bs32 varlen", 8, 2, 128, 32, {{200, 37, 0}, {1, 99, 1}, {130, 0, 2}, {17, 500, 3}}}, 22);
  // Context parallel: zigzag blocks 0 and 3 of one sequence of 4 x 64 tokens, rank 0's view.
  run({"d128 bs16 zigzag", 8, 2, 128, 16, {{64, 0, 0}, {64, 192, 0}}}, 23);
  // Block size not a multiple of 16: per-row page addressing.
  run({"d128 bs24 varlen", 4, 2, 128, 24, {{77, 5, 0}, {140, 0, 1}}}, 24);
  run({"d128 bs1", 2, 1, 128, 1, {{40, 10, 0}}}, 25);
  run({"d128 bs64 long prefix", 8, 1, 128, 64, {{700, 2500, 0}}}, 26);
}

TEST_F(AttnRunner, GenericHeadDims) {
  run({"d64 bs16", 4, 2, 64, 16, {{50, 0, 0}, {20, 30, 1}}}, 31);
  run({"d32 bs8", 4, 1, 32, 8, {{33, 7, 0}}}, 32);
  run({"d16 bs16", 2, 2, 16, 16, {{19, 0, 0}, {5, 60, 1}}}, 33);
  run({"d96 bs16", 3, 1, 96, 16, {{21, 4, 0}}}, 34);
}

TEST_F(AttnRunner, Decode) {
  run({"d128 decode", 8, 2, 128, 16, {{1, 0, 0}, {1, 700, 1}, {1, 33, 2}}}, 41);
  run({"d64 decode", 4, 4, 64, 32, {{1, 250, 0}, {1, 5, 1}}}, 42);
  // Long contexts take the split-K path (partials merged by log-sum-exp), some splits empty.
  run({"d128 split decode", 8, 2, 128, 16, {{1, 9000, 0}, {1, 3000, 1}}}, 43);
  run({"d64 split short-q", 4, 2, 64, 32, {{3, 2500, 0}, {2, 10, 1}}}, 44);
}

TEST_F(AttnRunner, KvStoreMatchesCpu) {
  // kv_store alone, compared through the whole cache (slots scattered, untouched slots zero on
  // both sides: the CUDA cache starts zeroed here).
  Rng rng(51);
  const int64_t nb = 6, bs = 16, hkv = 2, d = 64, t = 37;
  std::vector<int32_t> slots(nb * bs);
  std::iota(slots.begin(), slots.end(), 0);
  std::shuffle(slots.begin(), slots.end(), rng.gen());
  slots.resize(t);
  auto k = rng.bf16_normal(t * hkv * d), v = rng.bf16_normal(t * hkv * d);
  const std::vector<float> zeros(nb * bs * hkv * d, 0.0f);
  KvLayer cc{cpu_f32(zeros, {nb, bs, hkv, d}), cpu_f32(zeros, {nb, bs, hkv, d})};
  KvLayer gc{gpu_tensor("ck", DType::BF16, {nb, bs, hkv, d}, &zeros), gpu_tensor("cv", DType::BF16, {nb, bs, hkv, d}, &zeros)};
  cpu_->kv_store(cpu_f32(k, {t, hkv, d}), cpu_f32(v, {t, hkv, d}), cpu_i32(slots, {t}), cc);
  gpu_->kv_store(gpu_tensor("k", DType::BF16, {t, hkv, d}, &k), gpu_tensor("v", DType::BF16, {t, hkv, d}, &v),
                 gpu_i32("slots", slots, {t}), gc);
  expect_close("kv_store.k", shape_of({nb, bs, hkv, d}), gpu_read(gc.k), cpu_read(cc.k), 0.0, 0.0);
  expect_close("kv_store.v", shape_of({nb, bs, hkv, d}), gpu_read(gc.v), cpu_read(cc.v), 0.0, 0.0);
}

TEST_F(AttnRunner, RejectsBadBlockTable) {
  const int64_t bs = 16, hkv = 1, d = 64;
  KvLayer gc{gpu_tensor("ck", DType::BF16, {2, bs, hkv, d}, nullptr), gpu_tensor("cv", DType::BF16, {2, bs, hkv, d}, nullptr)};
  AttnBatch b;
  b.blocks = {AttnBlock{0, 4, 0, 0}};
  b.block_table = {7};  // outside the 2-block cache
  b.max_blocks_per_seq = 1;
  b.max_q_len = 4;
  b.max_kv_len = 4;
  b.dev_blocks = gpu_i32("blocks", {0, 4, 0, 0}, {1, 4});
  b.dev_block_table = gpu_i32("table", {7}, {1, 1});
  Tensor q = gpu_tensor("q", DType::BF16, {4, 2, d}, nullptr), out = gpu_tensor("out", DType::BF16, {4, 2, d}, nullptr);
  EXPECT_THROW(gpu_->attention(q, b, gc, 0.125f, out, Tensor{}), Error);

  // A table too large for the host check (> 65536 entries) is not validated per call; its bad
  // entries must still never fault: the kernels treat them as empty pages.
  const int32_t big = 70000;
  std::vector<int32_t> table(big, 1'000'000);  // every entry outside the 2-block cache
  b.block_table = table;
  b.max_blocks_per_seq = big;
  b.dev_block_table = gpu_i32("big_table", table, {1, big});
  Tensor q128 = gpu_tensor("q128", DType::BF16, {4, 2, 128}, nullptr);
  KvLayer gc128{gpu_tensor("ck128", DType::BF16, {2, 1, 1, 128}, nullptr),
                gpu_tensor("cv128", DType::BF16, {2, 1, 1, 128}, nullptr)};
  const std::vector<float> qv(4 * 2 * 128, 0.5f);
  gpu_->upload(q128.data, std::vector<uint16_t>(qv.size(), f32_to_bf16(0.5f)).data(), q128.nbytes());
  Tensor out128 = gpu_tensor("out128", DType::BF16, {4, 2, 128}, nullptr);
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  cuda.set_prefill_kernel(cuda::CudaBackend::PrefillKernel::MmaSync);
  EXPECT_NO_THROW(gpu_->attention(q128, b, gc128, 0.088f, out128, Tensor{}));  // tensor-core path (D = 128)
  if (cuda.wgmma_supported()) {
    cuda.set_prefill_kernel(cuda::CudaBackend::PrefillKernel::Wgmma);
    EXPECT_NO_THROW(gpu_->attention(q128, b, gc128, 0.088f, out128, Tensor{}));
  }
  EXPECT_NO_THROW(gpu_->attention(q, b, gc, 0.125f, out, Tensor{}));            // generic path (D = 64)
  EXPECT_NO_THROW(gpu_->sync());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace cpinfer::gputest
