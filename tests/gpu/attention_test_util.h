// The harness of the CUDA attention tests (gpu_attention_test.cpp, gpu_attention_ranges_test.cpp):
// a case (blocks of query rows over a paged KV cache) prepared on both back-ends, with a
// NaN-poisoned CUDA cache written only where some block reads, run on every CUDA kernel that takes
// it (mma.sync, on Hopper wgmma and the warp-specialized kernel, cuDNN where it loads) and compared
// with the CPU reference, out and lse. The AttnRunner fixture of both files.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <string>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {

struct BlockSpec {
  int32_t q_len, pos_begin, seq;
  int32_t kv_begin = 0, kv_end = AttnBlock::kNoBound;
};

struct AttnCase {
  std::string name;
  int64_t hq, hkv, d, block_size;
  std::vector<BlockSpec> blocks;
  bool scramble = true;
  // boost_keys keys each sequence reads, from its boost_first-th on, scaled by k_boost (a power of
  // two): scores there far above the rest, so the online softmax's running max jumps on a late tile.
  int32_t boost_first = 0, boost_keys = 0;
  float k_boost = 1.0f;
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
      // (slots are in position order; a power-of-two boost keeps the values bf16)
      for (int64_t i = std::min<int64_t>(l, c.boost_first) * hkv * d;
           i < std::min<int64_t>(l, int64_t{c.boost_first} + c.boost_keys) * hkv * d; ++i)
        k[i] *= c.k_boost;
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

  // CUDA attention with `kernel` as the prefill kernel (and `ws` as the Ws kernel's settings); out
  // and lse (undefined unless want_lse) start NaN-poisoned. With PK::Cudnn, returns "" when the
  // cuDNN path took the call, else its reason for refusing (the own kernel ran instead), and checks
  // that exactly the calls it accepted ran on cuDNN.
  std::string gpu_attention(const Prepared& p, const std::vector<AttnBlock>& blocks, PK kernel, Tensor& out,
                            Tensor& lse, bool want_lse = true, const cuda::AttentionWsConfig& ws = {}) {
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    const PK initial = cuda.prefill_kernel();
    const cuda::AttentionWsConfig initial_ws = cuda.ws_config();
    cuda.set_prefill_kernel(kernel);
    cuda.set_ws_config(ws);
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
    cuda.set_ws_config(initial_ws);
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

  // The settings each kernel runs with: the Ws kernel both in two passes (the default,
  // AttentionWsConfig::two_pass) and in one.
  static std::vector<cuda::AttentionWsConfig> ws_configs(PK k) {
    if (k != PK::Ws) return {cuda::AttentionWsConfig{}};
    cuda::AttentionWsConfig one;
    one.two_pass = false;
    return {cuda::AttentionWsConfig{}, one};
  }

  static std::string kernel_tag(PK k, const cuda::AttentionWsConfig& ws = {}) {
    if (k == PK::Ws && !ws.two_pass) return " ws 1-pass";
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
    for (PK kernel : kernels(p, p.blocks))
      for (const cuda::AttentionWsConfig& ws : ws_configs(kernel)) {
        Tensor go, glse;
        const std::string why = gpu_attention(p, p.blocks, kernel, go, glse, true, ws);
        if (kernel == PK::Cudnn) refused = why;
        const std::string sh = c.name + kernel_tag(kernel, ws) + (why.empty() ? "" : " (refused)") +
                               " T=" + std::to_string(p.t) + " kv<=" + std::to_string(max_kv);
        expect_attention_close(sh, gpu_read(go), cpu_read(co), gpu_read(glse), cpu_read(clse), p.d);
        // Without lse the output is the same.
        Tensor go2, no_lse;
        EXPECT_EQ(gpu_attention(p, p.blocks, kernel, go2, no_lse, false, ws), why) << sh;
        expect_close("attention.nolse", sh, gpu_read(go2), gpu_read(go), 0.0, 0.0);
      }
    return refused;
  }
};

}  // namespace cpinfer::gputest
