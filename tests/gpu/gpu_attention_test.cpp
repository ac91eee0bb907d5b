// CUDA vs CPU for kv_store + paged causal attention: the tensor-core paths (head_dim 128:
// mma.sync, and on Hopper wgmma and the warp-specialized kernel) and the generic path (16/32/64,
// decode), block sizes that are and are not multiples of 16, queries at an offset inside a longer
// K/V (pos_begin > 0), several varlen blocks, zigzag (context-parallel) blocks of one sequence,
// scrambled block tables, key ranges (diagonal / prefix parts, empty ranges) and their
// attention_merge, and lse. The cache starts NaN-poisoned so a read of a slot that was never
// written shows up as a NaN output.
#include <algorithm>
#include <numeric>

#include "backends/cuda/cuda_backend.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

struct BlockSpec {
  int32_t q_len, pos_begin, seq;
  int32_t kv_begin = 0, kv_end = AttnBlock::kNoBound;
};

struct AttnCase {
  std::string name;
  int64_t hq, hkv, d, block_size;
  std::vector<BlockSpec> blocks;
  bool scramble = true;
};

using PK = cuda::CudaBackend::PrefillKernel;

class AttnRunner : public GpuOpsTest {
 public:
  // A case's cache, block table and queries on both back-ends. K/V are written (kv_store) only at
  // the positions some block of the case reads; the rest of the CUDA cache stays NaN, so a kernel
  // that reads outside a block's key range shows NaN outputs.
  struct Prepared {
    int64_t t = 0, hq = 0, hkv = 0, d = 0;
    int32_t mbps = 1, n_seqs = 0;
    std::vector<int32_t> table;
    KvLayer ccache, gcache;
    std::vector<float> q;           // [t, hq, d], bf16-rounded
    std::vector<AttnBlock> blocks;  // the case's blocks, back to back in the rows of q
    std::string name;
  };

  Prepared prepare(const AttnCase& c, uint32_t seed) {
    Rng rng(seed);
    Prepared p;
    p.hq = c.hq, p.hkv = c.hkv, p.d = c.d, p.name = c.name;
    const int64_t hkv = c.hkv, d = c.d, bs = c.block_size;
    for (const auto& b : c.blocks) p.n_seqs = std::max(p.n_seqs, b.seq + 1);
    std::vector<int32_t> seq_len(p.n_seqs, 0);
    for (const auto& b : c.blocks) seq_len[b.seq] = std::max(seq_len[b.seq], b.pos_begin + b.q_len);
    int32_t total_pages = 0;
    for (int32_t l : seq_len) {
      p.mbps = std::max<int32_t>(p.mbps, static_cast<int32_t>((l + bs - 1) / bs));
      total_pages += static_cast<int32_t>((l + bs - 1) / bs);
    }
    const int64_t n_cache_blocks = total_pages + 3;
    std::vector<int32_t> phys(n_cache_blocks);
    std::iota(phys.begin(), phys.end(), 0);
    if (c.scramble) std::shuffle(phys.begin(), phys.end(), rng.gen());
    p.table.assign(static_cast<size_t>(p.n_seqs) * p.mbps, -1);  // unused entries stay -1
    int next = 0;
    for (int s = 0; s < p.n_seqs; ++s)
      for (int pg = 0; pg < (seq_len[s] + bs - 1) / bs; ++pg) p.table[s * p.mbps + pg] = phys[next++];

    // Caches: CPU F32 zeros, CUDA BF16 NaN-poisoned; the read positions written via kv_store.
    const std::vector<float> zeros(n_cache_blocks * bs * hkv * d, 0.0f);
    p.ccache = KvLayer{cpu_f32(zeros, {n_cache_blocks, bs, hkv, d}), cpu_f32(zeros, {n_cache_blocks, bs, hkv, d})};
    p.gcache = KvLayer{gpu_tensor("cache.k", DType::BF16, {n_cache_blocks, bs, hkv, d}, nullptr),
                       gpu_tensor("cache.v", DType::BF16, {n_cache_blocks, bs, hkv, d}, nullptr)};
    for (int s = 0; s < p.n_seqs; ++s) {
      std::vector<uint8_t> read(static_cast<size_t>(seq_len[s]), 0);
      for (const auto& b : c.blocks)
        if (b.seq == s && b.q_len > 0)
          for (int32_t k = b.kv_begin; k < std::min(b.kv_end, b.pos_begin + b.q_len); ++k) read[k] = 1;
      std::vector<int32_t> slots;
      for (int32_t k = 0; k < seq_len[s]; ++k)
        if (read[k]) slots.push_back(p.table[s * p.mbps + k / bs] * static_cast<int32_t>(bs) + k % bs);
      const int64_t l = static_cast<int64_t>(slots.size());
      if (l == 0) continue;
      auto k = rng.bf16_normal(l * hkv * d), v = rng.bf16_normal(l * hkv * d);
      cpu_->kv_store(cpu_f32(k, {l, hkv, d}), cpu_f32(v, {l, hkv, d}), cpu_i32(slots, {l}), p.ccache);
      gpu_->kv_store(gpu_tensor("k", DType::BF16, {l, hkv, d}, &k), gpu_tensor("v", DType::BF16, {l, hkv, d}, &v),
                     gpu_i32("slots", slots, {l}), p.gcache);
    }
    int32_t t = 0;
    for (const auto& b : c.blocks) {
      p.blocks.push_back(AttnBlock{t, b.q_len, b.pos_begin, b.seq, b.kv_begin, b.kv_end});
      t += b.q_len;
    }
    p.t = t;
    p.q = rng.bf16_normal(static_cast<size_t>(t) * c.hq * d, 1.5f);
    return p;
  }

  // The batch of `blocks` over p's block table, with its device copies on the CPU or the GPU.
  AttnBatch batch(const Prepared& p, const std::vector<AttnBlock>& blocks, bool on_gpu) {
    AttnBatch b;
    b.blocks = blocks;
    b.block_table = p.table;
    b.max_blocks_per_seq = p.mbps;
    for (const AttnBlock& a : blocks) {
      b.max_q_len = std::max(b.max_q_len, a.q_len);
      b.max_kv_len = std::max(b.max_kv_len, a.pos_begin + a.q_len);
    }
    const std::vector<int32_t> flat = flatten_attn_blocks(blocks);
    const int64_t nb = static_cast<int64_t>(blocks.size());
    b.dev_blocks = on_gpu ? gpu_i32("blocks", flat, {nb, kAttnBlockFields}) : cpu_i32(flat, {nb, kAttnBlockFields});
    b.dev_block_table = on_gpu ? gpu_i32("table", p.table, {p.n_seqs, p.mbps}) : cpu_i32(p.table, {p.n_seqs, p.mbps});
    return b;
  }

  // A copy of a cache with every non-finite value (the poison of never-written slots) set to 0.
  KvLayer finite_copy(const KvLayer& c) {
    auto copy = [&](const Tensor& t, const char* name) {
      std::vector<float> v = gpu_read(t);
      for (float& x : v)
        if (!std::isfinite(x)) x = 0.0f;
      return gpu_tensor(name, t.dtype, {t.dim(0), t.dim(1), t.dim(2), t.dim(3)}, &v);
    };
    return KvLayer{copy(c.k, "finite.k"), copy(c.v, "finite.v")};
  }

  float scale(const Prepared& p) const { return 1.0f / std::sqrt(static_cast<float>(p.d)); }

  void cpu_attention(const Prepared& p, const std::vector<AttnBlock>& blocks, Tensor& out, Tensor& lse) {
    out = cpu_alloc(DType::F32, {p.t, p.hq, p.d});
    lse = cpu_alloc(DType::F32, {p.t, p.hq});
    cpu_->attention(cpu_f32(p.q, {p.t, p.hq, p.d}), batch(p, blocks, false), p.ccache, scale(p), out, lse);
  }

  // CUDA attention with `kernel` as the prefill kernel; out and lse (undefined unless want_lse)
  // start NaN-poisoned. With PK::Cudnn, returns "" when the cuDNN path took the call, else its
  // reason for refusing (the own kernel ran instead), and checks that exactly the calls it
  // accepted ran on cuDNN.
  std::string gpu_attention(const Prepared& p, const std::vector<AttnBlock>& blocks, PK kernel, Tensor& out,
                            Tensor& lse, bool want_lse = true) {
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    const PK initial = cuda.prefill_kernel();
    cuda.set_prefill_kernel(kernel);
    out = gpu_tensor("out", DType::BF16, {p.t, p.hq, p.d}, nullptr);
    lse = want_lse ? gpu_tensor("lse", DType::F32, {p.t, p.hq}, nullptr) : Tensor{};
    const Tensor q = gpu_tensor("q", DType::BF16, {p.t, p.hq, p.d}, &p.q);
    const AttnBatch b = batch(p, blocks, true);
    // cuDNN reads whole pages (and page 0 for unused table entries) and masks the scores, so a NaN
    // in a slot it masks still reaches P·V as 0·NaN: its contract is a cache with finite values in
    // every slot, which the engine's KvCache keeps (zeroed at allocation). Its runs see the case's
    // cache with the never-written slots zero instead of NaN; a read of them with any weight still
    // shows as a wrong output.
    const KvLayer cache = kernel == PK::Cudnn ? finite_copy(p.gcache) : p.gcache;
    std::string refused;
    if (kernel == PK::Cudnn) refused = cuda.cudnn_check(q, b, cache, out, lse);
    const int64_t calls = cuda.cudnn_calls();
    gpu_->attention(q, b, cache, scale(p), out, lse);
    EXPECT_EQ(cuda.cudnn_calls() - calls, kernel == PK::Cudnn && refused.empty() ? 1 : 0) << p.name;
    cuda.set_prefill_kernel(initial);
    if (!refused.empty()) std::printf("[ cuDNN refused ] %s: %s\n", p.name.c_str(), refused.c_str());
    return refused;
  }

  // The CUDA kernels that run `blocks`: head dim 128 with q_len > 1 runs a tensor-core kernel, so
  // every one this GPU has, and cuDNN where it loads (it runs what it takes, the own kernel the
  // rest); otherwise the generic kernel, whatever the setting.
  std::vector<PK> kernels(const Prepared& p, const std::vector<AttnBlock>& blocks) {
    int32_t max_q = 0;
    for (const AttnBlock& b : blocks) max_q = std::max(max_q, b.q_len);
    std::vector<PK> k = {PK::MmaSync};
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    if (p.d == 128 && max_q > 1 && cuda.wgmma_supported()) {
      k.push_back(PK::Wgmma);
      k.push_back(PK::Ws);
    }
    if (p.d == 128 && max_q > 1 && cuda.cudnn_unavailable_reason().empty()) k.push_back(PK::Cudnn);
    return k;
  }

  static std::string kernel_tag(PK k) {
    switch (k) {
      case PK::Wgmma:
        return " wgmma";
      case PK::Ws:
        return " ws";
      case PK::Cudnn:
        return " cudnn";
      case PK::MmaSync:
        return "";
      case PK::Auto:
        return " auto";
    }
    return " ?";
  }

  // lse: rows with no key in range are -inf on both sides (checked exactly, and their outputs 0),
  // then compared as zeros, since expect_close counts every non-finite value as unwritten.
  void expect_attention_close(const std::string& sh, std::vector<float> out, std::vector<float> ref_out,
                              std::vector<float> lse, std::vector<float> ref_lse, int64_t d) {
    int64_t bad_empty = 0, n_empty = 0;
    for (size_t r = 0; r < ref_lse.size(); ++r) {
      if (!std::isinf(ref_lse[r]) && !std::isinf(lse[r])) continue;
      n_empty += std::isinf(ref_lse[r]);
      bad_empty += lse[r] != ref_lse[r];
      for (int64_t e = 0; e < d; ++e) bad_empty += out[r * d + e] != 0.0f;
      lse[r] = ref_lse[r] = 0.0f;
    }
    EXPECT_EQ(bad_empty, 0) << sh << ": rows with no key in range must be out 0, lse -inf (" << n_empty
                            << " such rows)";
    expect_close("attention.out", sh, out, ref_out, 1e-4, 0.05);
    expect_close("attention.lse", sh, lse, ref_lse, 1e-8, 2e-3);
  }

  // Runs the case on every kernel against the CPU; returns the cuDNN path's refusal ("" when it
  // took the case or is not available).
  std::string run(const AttnCase& c, uint32_t seed) {
    Prepared p = prepare(c, seed);
    Tensor co, clse;
    cpu_attention(p, p.blocks, co, clse);
    int32_t max_kv = 0;
    for (const AttnBlock& b : p.blocks) max_kv = std::max(max_kv, b.pos_begin + b.q_len);
    std::string refused;
    for (PK kernel : kernels(p, p.blocks)) {
      Tensor go, glse;
      const std::string why = gpu_attention(p, p.blocks, kernel, go, glse);
      if (kernel == PK::Cudnn) refused = why;
      const std::string sh = c.name + kernel_tag(kernel) + (why.empty() ? "" : " (refused)") +
                             " T=" + std::to_string(p.t) + " kv<=" + std::to_string(max_kv);
      expect_attention_close(sh, gpu_read(go), cpu_read(co), gpu_read(glse), cpu_read(clse), p.d);
      // Without lse the output is the same.
      Tensor go2, no_lse;
      EXPECT_EQ(gpu_attention(p, p.blocks, kernel, go2, no_lse, false), why) << sh;
      expect_close("attention.nolse", sh, gpu_read(go2), gpu_read(go), 0.0, 0.0);
    }
    return refused;
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

// The warp-specialized kernel's own edges: every GQA ratio, block sizes on its TMA path (powers of
// two >= 8: one box per chunk of min(block_size, 64) keys) and off it, chunks cut by the ends of
// the key range, query tiles of 128 rows split over two consumers (lengths around 64 and 128),
// many query tiles of one head (the persistent scheduler), and a ragged batch of many blocks.
TEST_F(AttnRunner, FlashGqaBlockSizesAndLengths) {
  for (int64_t ratio : {1, 2, 4, 8, 16})
    run({"d128 gqa" + std::to_string(ratio), 2 * ratio, 2, 128, 64, {{333, 70, 0}, {65, 0, 1}}},
        100 + static_cast<uint32_t>(ratio));
  for (int64_t bs : {8, 16, 32, 128, 256, 48, 100})
    run({"d128 bs" + std::to_string(bs), 4, 2, 128, bs, {{257, 3, 0}, {64, 129, 1}, {129, 0, 2}}},
        200 + static_cast<uint32_t>(bs));
  // Pages in order (a fresh prompt's layout): tiles inside the key range load as one box of 128
  // rows per half; tiles at the range's edges (a start at 70, an end at 700) still go chunk by chunk.
  constexpr int32_t kNo = AttnBlock::kNoBound;
  for (int64_t bs : {8, 16, 32, 64, 128})
    run({"d128 in-order bs" + std::to_string(bs),
         8,
         2,
         128,
         bs,
         {{257, 3, 0}, {300, 500, 1}, {129, 0, 2}, {200, 600, 3, 70, 700}, {130, 900, 4, 0, kNo}},
         false},
        250 + static_cast<uint32_t>(bs));
  std::vector<BlockSpec> ragged;
  for (int32_t i = 0; i < 40; ++i) ragged.push_back({1 + (i * 37) % 190, (i * 53) % 300, i});
  run({"d128 ragged40", 8, 2, 128, 32, ragged}, 301);
}

TEST_F(AttnRunner, FlashLongSequence) {
  run({"d128 bs64 19999", 2, 1, 128, 64, {{19999, 0, 0}}}, 401);
  run({"d128 bs256 chunk after 9000", 4, 2, 128, 256, {{3001, 9000, 0}}}, 402);
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

// The GQA decode kernel (head_dim 128, BF16, one CTA per KV head and key split): every head ratio
// it takes, block sizes on and off the power-of-two grid, lengths that end inside a 64-key tile,
// one split and many, a batch of 64 sequences at the Qwen3-30B-A3B head shape; a ratio it does not
// take (3) runs on the generic kernel.
TEST_F(AttnRunner, DecodeGqaKernel) {
  for (int64_t ratio : {1, 2, 3, 4, 5, 8, 12, 16})
    run({"d128 decode gqa" + std::to_string(ratio),
         2 * ratio,
         2,
         128,
         16,
         {{1, 0, 0}, {1, 64, 1}, {1, 130, 2}, {1, 5000, 3}}},
        500 + static_cast<uint32_t>(ratio));
  for (int64_t bs : {1, 24, 64, 100, 256})
    run({"d128 decode bs" + std::to_string(bs), 8, 2, 128, bs, {{1, 63, 0}, {1, 1999, 1}}},
        600 + static_cast<uint32_t>(bs));
  std::vector<BlockSpec> many;
  for (int32_t i = 0; i < 64; ++i) many.push_back({1, (i * 97) % 3000, i});
  run({"d128 decode batch64", 32, 4, 128, 16, many}, 700);
  run({"d128 decode ratio24 generic", 48, 2, 128, 16, {{1, 300, 0}, {1, 2, 1}}}, 701);

  auto shape = [](int64_t hq, int64_t hkv, DType t) {
    cuda::DevTensor q, k;
    q.data = reinterpret_cast<void*>(uintptr_t{256});
    q.dtype = t;
    q.ndim = 3;
    q.shape[0] = 1, q.shape[1] = hq, q.shape[2] = 128;
    k = q;
    k.ndim = 4;
    k.shape[0] = 8, k.shape[1] = 16, k.shape[2] = hkv, k.shape[3] = 128;
    return std::make_pair(q, cuda::DevKv{k, k});
  };
  for (auto [hq, hkv, ok] : {std::tuple{32, 4, true}, {64, 4, true}, {4, 4, true}, {6, 2, true}, {48, 2, false}}) {
    auto [q, kv] = shape(hq, hkv, DType::BF16);
    EXPECT_EQ(cuda::attention_decode_supported(q, kv, 1), ok) << hq << "/" << hkv;
    EXPECT_FALSE(cuda::attention_decode_supported(q, kv, 2)) << "q_len 2 is prefill";
  }
  auto [qf, kvf] = shape(32, 4, DType::F32);
  EXPECT_FALSE(cuda::attention_decode_supported(qf, kvf, 1)) << "F32 runs on the generic kernel";
}

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
  for (PK kernel : kernels(p, p.blocks)) {
    const std::string sh = std::string("cp zigzag") + kernel_tag(kernel) + " T=" + std::to_string(p.t);
    Tensor d_o, d_l, p_o, p_l;
    gpu_attention(p, diag, kernel, d_o, d_l);
    gpu_attention(p, prefix, kernel, p_o, p_l);
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

// The cuDNN path (CudaBackend PrefillKernel::Cudnn): at the Qwen3-30B-A3B attention shape it must
// take ordinary causal prefill (one sequence, a cached prefix, ragged blocks of several sequences,
// zigzag blocks of one sequence, lse or none) and match the CPU; the cases run above cover the
// other shapes, taken or refused. It must refuse what it cannot do (key ranges, blocks out of row
// order) before any launch, and the own kernel then gives the right result.
TEST_F(AttnRunner, CudnnTakesCausalPrefillAndRefusesTheRest) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  const std::string why = cuda.cudnn_unavailable_reason();
  if (!why.empty()) GTEST_SKIP() << why;
  for (const AttnCase& c : {AttnCase{"cudnn qwen bs64", 32, 4, 128, 64, {{1000, 0, 0}}},
                            AttnCase{"cudnn qwen bs16 cached prefix", 32, 4, 128, 16, {{517, 1203, 0}}},
                            AttnCase{"cudnn qwen bs64 ragged", 32, 4, 128, 64, {{300, 0, 0}, {77, 40, 1}, {2, 700, 2}}},
                            AttnCase{"cudnn qwen bs16 zigzag", 32, 4, 128, 16, {{363, 0, 0}, {362, 2538, 0}}},
                            AttnCase{"cudnn gqa16 bs32", 16, 1, 128, 32, {{129, 64, 0}, {250, 0, 1}}}}) {
    EXPECT_EQ(run(c, 91), "") << c.name << ": the cuDNN path must take it";
  }
  // A fresh prompt on consecutive pages (the layout of a new KvCache) runs cuDNN's dense graph: K/V
  // as one strided run, no page tables. Its plan reads the keys of the bucketed length (3001 -> 3072):
  // when those pages would run past the cache (191 pages of 16 here, 192 read), the paged graph runs.
  for (const auto& [c, dense_expected] :
       {std::pair{AttnCase{"cudnn dense bs64", 32, 4, 128, 64, {{1000, 0, 0}}, false}, true},
        std::pair{AttnCase{"cudnn dense bs16", 32, 4, 128, 16, {{3070, 0, 0}}, false}, true},
        std::pair{AttnCase{"cudnn dense gqa16 bs32", 16, 1, 128, 32, {{250, 0, 0}}, false}, true},
        std::pair{AttnCase{"cudnn near the cache end", 32, 4, 128, 16, {{3001, 0, 0}}, false}, false}}) {
    const int64_t dense = cuda.cudnn_dense_calls();
    EXPECT_EQ(run(c, 93), "") << c.name << ": the cuDNN path must take it";
    EXPECT_EQ(cuda.cudnn_dense_calls() > dense, dense_expected) << c.name;
  }
  // The automatic choice keeps a long fresh prompt on the own kernel (faster than cuDNN's dense
  // graph since 2026-12-04, docs/attention.md); cuDNN runs only when asked for.
  {
    const AttnCase c{"auto fresh prompt", 2, 1, 128, 16, {{8192, 0, 0}}, false};
    Prepared p = prepare(c, 94);
    Tensor co, clse;
    cpu_attention(p, p.blocks, co, clse);
    const PK initial = cuda.prefill_kernel();
    cuda.set_prefill_kernel(PK::Auto);
    Tensor go = gpu_tensor("out", DType::BF16, {p.t, p.hq, p.d}, nullptr);
    Tensor glse = gpu_tensor("lse", DType::F32, {p.t, p.hq}, nullptr);
    const int64_t calls = cuda.cudnn_calls();
    gpu_->attention(gpu_tensor("q", DType::BF16, {p.t, p.hq, p.d}, &p.q), batch(p, p.blocks, true),
                    finite_copy(p.gcache), scale(p), go, glse);
    cuda.set_prefill_kernel(initial);
    EXPECT_EQ(cuda.cudnn_calls(), calls) << "Auto must run a long fresh prompt on the own kernel";
    expect_attention_close("auto fresh prompt", gpu_read(go), cpu_read(co), gpu_read(glse), cpu_read(clse), p.d);
  }
  constexpr int32_t kNo = AttnBlock::kNoBound;
  const AttnCase ranges{"cudnn ranges", 8, 2, 128, 64, {{100, 200, 0, 0, kNo}, {100, 400, 1, 50, kNo}}};
  Prepared p = prepare(ranges, 92);
  Tensor co, clse, go, glse;
  cpu_attention(p, p.blocks, co, clse);
  const std::string refused = gpu_attention(p, p.blocks, PK::Cudnn, go, glse);
  EXPECT_NE(refused.find("key ranges"), std::string::npos) << refused;
  expect_attention_close("cudnn refused ranges", gpu_read(go), cpu_read(co), gpu_read(glse), cpu_read(clse), p.d);
  // A finite kv_end at the end of the causal range bounds nothing: taken.
  std::vector<AttnBlock> bounded = p.blocks;
  bounded[1].kv_begin = 0;
  bounded[1].kv_end = bounded[1].pos_begin + bounded[1].q_len;
  Tensor bo, blse;
  EXPECT_EQ(gpu_attention(p, bounded, PK::Cudnn, bo, blse), "");
  // Blocks out of row order.
  std::vector<AttnBlock> swapped = {bounded[1], bounded[0]};
  EXPECT_NE(gpu_attention(p, swapped, PK::Cudnn, bo, blse).find("row order"), std::string::npos);
  EXPECT_NO_THROW(gpu_->sync());
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
  KvLayer gc{gpu_tensor("ck", DType::BF16, {nb, bs, hkv, d}, &zeros),
             gpu_tensor("cv", DType::BF16, {nb, bs, hkv, d}, &zeros)};
  cpu_->kv_store(cpu_f32(k, {t, hkv, d}), cpu_f32(v, {t, hkv, d}), cpu_i32(slots, {t}), cc);
  gpu_->kv_store(gpu_tensor("k", DType::BF16, {t, hkv, d}, &k), gpu_tensor("v", DType::BF16, {t, hkv, d}, &v),
                 gpu_i32("slots", slots, {t}), gc);
  expect_close("kv_store.k", shape_of({nb, bs, hkv, d}), gpu_read(gc.k), cpu_read(cc.k), 0.0, 0.0);
  expect_close("kv_store.v", shape_of({nb, bs, hkv, d}), gpu_read(gc.v), cpu_read(cc.v), 0.0, 0.0);
}

TEST_F(AttnRunner, RejectsBadBlockTable) {
  const int64_t bs = 16, hkv = 1, d = 64;
  KvLayer gc{gpu_tensor("ck", DType::BF16, {2, bs, hkv, d}, nullptr),
             gpu_tensor("cv", DType::BF16, {2, bs, hkv, d}, nullptr)};
  AttnBatch b;
  b.blocks = {AttnBlock{0, 4, 0, 0}};
  b.block_table = {7};  // outside the 2-block cache
  b.max_blocks_per_seq = 1;
  b.max_q_len = 4;
  b.max_kv_len = 4;
  b.dev_blocks = gpu_i32("blocks", flatten_attn_blocks(b.blocks), {1, kAttnBlockFields});
  b.dev_block_table = gpu_i32("table", {7}, {1, 1});
  Tensor q = gpu_tensor("q", DType::BF16, {4, 2, d}, nullptr), out = gpu_tensor("out", DType::BF16, {4, 2, d}, nullptr);
  EXPECT_THROW(gpu_->attention(q, b, gc, 0.125f, out, Tensor{}), Error);
  // Bad key ranges and the old 4-column block layout.
  b.block_table = {0};
  b.dev_block_table = gpu_i32("table0", {0}, {1, 1});
  EXPECT_NO_THROW(gpu_->attention(q, b, gc, 0.125f, out, Tensor{}));
  for (const AttnBlock& bad : {AttnBlock{0, 4, 0, 0, -1}, AttnBlock{0, 4, 0, 0, 3, 2}}) {
    AttnBatch bb = b;
    bb.blocks = {bad};
    bb.dev_blocks = gpu_i32("bad_blocks", flatten_attn_blocks(bb.blocks), {1, kAttnBlockFields});
    EXPECT_THROW(gpu_->attention(q, bb, gc, 0.125f, out, Tensor{}), Error);
  }
  AttnBatch b4 = b;
  b4.dev_blocks = gpu_i32("blocks4", {0, 4, 0, 0}, {1, 4});
  EXPECT_THROW(gpu_->attention(q, b4, gc, 0.125f, out, Tensor{}), Error);

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
    cuda.set_prefill_kernel(cuda::CudaBackend::PrefillKernel::Ws);
    EXPECT_NO_THROW(gpu_->attention(q128, b, gc128, 0.088f, out128, Tensor{}));
  }
  if (cuda.cudnn_unavailable_reason().empty()) {  // its page tables read bad entries as page 0
    cuda.set_prefill_kernel(cuda::CudaBackend::PrefillKernel::Cudnn);
    const std::string refused = cuda.cudnn_check(q128, b, gc128, out128, Tensor{});
    if (!refused.empty()) std::printf("[ cuDNN refused ] big table: %s\n", refused.c_str());
    EXPECT_NO_THROW(gpu_->attention(q128, b, gc128, 0.088f, out128, Tensor{}));
  }
  EXPECT_NO_THROW(gpu_->attention(q, b, gc, 0.125f, out, Tensor{}));  // generic path (D = 64)
  EXPECT_NO_THROW(gpu_->sync());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace cpinfer::gputest
