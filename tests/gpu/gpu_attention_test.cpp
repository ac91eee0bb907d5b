// CUDA vs CPU for kv_store + paged causal attention: the tensor-core paths (head_dim 128:
// mma.sync, and on Hopper wgmma and the warp-specialized kernel) and the generic path (16/32/64,
// decode), block sizes that are and are not multiples of 16, queries at an offset inside a longer
// K/V (pos_begin > 0), several varlen blocks, zigzag (context-parallel) blocks of one sequence,
// scrambled block tables, and lse; the cuDNN path; bad metadata. The cache starts NaN-poisoned so
// a read of a slot that was never written shows up as a NaN output. The harness (AttnRunner) is in
// attention_test_util.h; key ranges and attention_merge are tested in gpu_attention_ranges_test.cpp.
#include <algorithm>
#include <numeric>
#include <tuple>

#include "attention_test_util.h"
#include "backends/cuda/cuda_backend.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

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

// 40 keys that score far above the diagonal's (k_boost 64: ~100 nats and more), at the start of
// the sequence (as attention sinks do) or at keys 130-169 (the second tile): the kernels that
// visit the diagonal first (ws: last tile first) meet a row max far above the running one on a
// late tile; every row's max and sum must still come out as the CPU's.
AttnCase late_jump(const std::string& name, int32_t first_key, float k_boost) {
  AttnCase c{name, 4, 2, 128, 16, {{700, 0, 0}, {300, 200, 1}}};
  c.boost_first = first_key;
  c.boost_keys = 40;
  c.k_boost = k_boost;
  return c;
}

TEST_F(AttnRunner, FlashScoresJumpOnALateTile) {
  run(late_jump("d128 bs16 late max at the start", 0, 64.0f), 403);
  run(late_jump("d128 bs16 late max in tile 1", 130, 64.0f), 405);
}

// --attention-backend: ws and auto run the Ws kernel in two passes, ws-1pass in one.
TEST_F(AttnRunner, WsPassesFollowTheAttentionBackend) {
  if (!static_cast<cuda::CudaBackend&>(*gpu_).wgmma_supported()) GTEST_SKIP() << "ws needs compute capability 9.0";
  using PK = cuda::CudaBackend::PrefillKernel;
  for (const auto& [name, kernel, two_pass] :
       {std::tuple{"auto", PK::Auto, true}, std::tuple{"ws", PK::Ws, true}, std::tuple{"ws-1pass", PK::Ws, false}}) {
    BackendOptions o;
    o.attention = name;
    const auto be = make_cuda_backend(0, o);
    const auto& cuda = static_cast<const cuda::CudaBackend&>(*be);
    EXPECT_EQ(cuda.prefill_kernel(), kernel) << name;
    EXPECT_EQ(cuda.ws_config().two_pass, two_pass) << name;
  }
}

// The Ws kernel's first pass of two (AttentionWsConfig::two_pass) takes a tile's exponentials
// against the rows' running max where it does not look for a new one, which is everywhere but an
// item's first and last tiles and masked tiles. Jumps of tens of nats in tile 1 (k_boost 8:
// probabilities far above 1 but finite) and the far jump at the start (the last tile) are exact in
// that pass alone; the far jump in tile 1 overflows fp32 there, so in two passes that case passes
// (above) only through the second. (tools/ws_softmax_model.py models these cases in numpy.)
TEST_F(AttnRunner, WsFirstPassAloneOnLateJumps) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  if (!cuda.wgmma_supported()) GTEST_SKIP() << "the Ws kernel needs compute capability 9.0";
  cuda::AttentionWsConfig first_alone;  // the first of two passes alone
  first_alone.second_pass = false;

  const AttnCase moderate = late_jump("d128 bs16 moderate late max in tile 1", 130, 8.0f);
  run(moderate, 404);
  for (const auto& [c, seed] :
       {std::pair{moderate, 404u}, std::pair{late_jump("d128 bs16 late max at the start", 0, 64.0f), 403u}}) {
    Prepared p = prepare(c, seed);
    Tensor co, clse, go, glse;
    cpu_attention(p, p.blocks, co, clse);
    gpu_attention(p, p.blocks, PK::Ws, go, glse, true, first_alone);
    expect_attention_close(c.name + " ws first pass alone", gpu_read(go), cpu_read(co), gpu_read(glse), cpu_read(clse),
                           p.d);
  }

  // (The items it flags stay flagged, and the next two-pass call redoes them as well.)
  Prepared f = prepare(late_jump("d128 bs16 late max in tile 1", 130, 64.0f), 405);
  Tensor go, glse;
  gpu_attention(f, f.blocks, PK::Ws, go, glse, true, first_alone);
  int64_t non_finite = 0;
  for (float x : gpu_read(glse)) non_finite += !std::isfinite(x);
  for (float x : gpu_read(go)) non_finite += !std::isfinite(x);
  EXPECT_GT(non_finite, 0)
      << "the first pass alone must overflow on the k_boost 64 case, or FlashScoresJumpOnALateTile "
         "does not reach the second pass";
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

// A captured decode graph sizes the key splits for the longest context it serves (AttnBatch
// key_bound); the kernel cuts each block's actual keys evenly over them. Against the CPU: contexts
// far shorter than the bound (most splits empty, one key), a ragged batch with a padding row and
// key ranges under one bound, the split count at its limit (64).
TEST_F(AttnRunner, DecodeUnderAKeyBound) {
  constexpr int32_t kNo = AttnBlock::kNoBound;
  const std::vector<std::pair<AttnCase, int32_t>> cases = {
      {{"qwen3 32/4 1045 keys, bound 2048", 32, 4, 128, 16, {{1, 1045, 0}}}, 2048},
      {{"gqa4 one key, bound 4096", 8, 2, 128, 64, {{1, 0, 0}}}, 4096},
      {{"gqa4 33 keys, bound 65536", 8, 2, 128, 16, {{1, 32, 0}}}, 65536},
      {{"ragged, ranges, padding, bound 8192",
        32,
        4,
        128,
        16,
        {{1, 700, 0}, {1, 33, 1}, {1, 5000, 2}, {1, 3000, 3, 1000, kNo}, {1, 9, 4, 0, 0}}},
       8192},
      {{"gqa16 bs256 3001 keys, bound 32768", 16, 1, 128, 256, {{1, 3000, 0}}}, 32768},
  };
  uint32_t seed = 950;
  for (const auto& [c, bound] : cases) {
    Prepared p = prepare(c, ++seed);
    Tensor co, clse;
    cpu_attention(p, p.blocks, co, clse);
    AttnBatch b = batch(p, p.blocks, true);
    b.key_bound = bound;
    const Tensor q = gpu_tensor("q", DType::BF16, {p.t, p.hq, p.d}, &p.q);
    Tensor out = gpu_tensor("out", DType::BF16, {p.t, p.hq, p.d}, nullptr);
    Tensor lse = gpu_tensor("lse", DType::F32, {p.t, p.hq}, nullptr);
    gpu_->attention(q, b, p.gcache, scale(p), out, lse);
    expect_attention_close(c.name, gpu_read(out), cpu_read(co), gpu_read(lse), cpu_read(clse), p.d);
  }
}

// The decode kernel is launched while the previous kernel still runs (programmatic dependent
// launch) and must read no key before it waits for it. Here each sequence's
// newest key is stored by kv_store right before the attention, back to back on the stream, with
// values unlike the ones it replaces (as q/k norm + RoPE stores them in a decode step): a kernel
// that read it before its wait would see the old values. Several rounds, since whether such an
// early read wins the race depends on timing. Contexts of one tile per split (1001 keys), of a few,
// and a short one.
TEST_F(AttnRunner, DecodeSeesTheKeysStoredJustBefore) {
  constexpr int64_t kBs = 16;
  const AttnCase c{"qwen3 32/4 decode", 32, 4, 128, kBs, {{1, 1000, 0}, {1, 63, 1}, {1, 4100, 2}}};
  Prepared p = prepare(c, 990);
  const AttnBatch b = batch(p, p.blocks, true);
  const Tensor q = gpu_tensor("q", DType::BF16, {p.t, p.hq, p.d}, &p.q);
  Tensor out = gpu_tensor("out", DType::BF16, {p.t, p.hq, p.d}, nullptr);
  Tensor lse = gpu_tensor("lse", DType::F32, {p.t, p.hq}, nullptr);
  std::vector<int32_t> slots;
  for (const AttnBlock& a : p.blocks)
    slots.push_back(p.table[a.seq * p.mbps + a.pos_begin / kBs] * static_cast<int32_t>(kBs) + a.pos_begin % kBs);
  const int64_t l = static_cast<int64_t>(slots.size());
  const Tensor gslots = gpu_i32("slots", slots, {l});
  Rng rng(991);
  for (int round = 0; round < 8; ++round) {
    const auto k = rng.bf16_normal(l * p.hkv * p.d, 3.0f), v = rng.bf16_normal(l * p.hkv * p.d, 3.0f);
    cpu_->kv_store(cpu_f32(k, {l, p.hkv, p.d}), cpu_f32(v, {l, p.hkv, p.d}), cpu_i32(slots, {l}), p.ccache);
    const Tensor gk = gpu_tensor("k", DType::BF16, {l, p.hkv, p.d}, &k);
    const Tensor gv = gpu_tensor("v", DType::BF16, {l, p.hkv, p.d}, &v);
    gpu_->kv_store(gk, gv, gslots, p.gcache);
    gpu_->attention(q, b, p.gcache, scale(p), out, lse);
    Tensor co, clse;
    cpu_attention(p, p.blocks, co, clse);
    expect_attention_close(c.name + " round " + std::to_string(round), gpu_read(out), cpu_read(co), gpu_read(lse),
                           cpu_read(clse), p.d);
  }
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
