// Parallel linear layers load their own slices (layers/linear.h): at every attention-TP rank the
// q/k/v/o projections and the dense MLP weights have the shard's shape and exactly the bytes of
// the matching rows/columns of the full checkpoint tensor (row slices as zero-copy views of the
// mmap, column slices copied), FP8 codes and block scales included; random weights are the TP=1
// random weights sliced; FP8 slices off the 128x128 blocks are refused with a clear message.
#include <gtest/gtest.h>

#include <cstring>

#include <nlohmann/json.hpp>

#include "loader/config.h"
#include "loader/quant.h"
#include "loader_test_util.h"
#include "model/random_weights.h"
#include "model/weights.h"

namespace cpinfer {
namespace {

using test::TempDir;
using test::TinyShape;
using test::write_text;

// The rows [r0, r0 + nr) x columns [c0, c0 + nc) of a row-major [N, K] array of `elem` bytes.
std::vector<uint8_t> cut(const void* full, int64_t K, int64_t r0, int64_t nr, int64_t c0, int64_t nc, size_t elem) {
  std::vector<uint8_t> out(size_t(nr * nc) * elem);
  for (int64_t r = 0; r < nr; ++r)
    std::memcpy(out.data() + size_t(r * nc) * elem,
                static_cast<const uint8_t*>(full) + (size_t((r0 + r) * K + c0)) * elem, size_t(nc) * elem);
  return out;
}

// Expected slice of a linear weight at TP rank `tp`: {split dim, first, count}.
struct Expect {
  const char* name;
  bool rows;
  int64_t first, count;
};

std::vector<Expect> expected_slices(const TinyShape& s, TpShard tp) {
  const AttnHeadShard h = attn_head_shard(s.heads, s.kv_heads, tp);
  const int64_t D = s.head_dim, I = s.inter / tp.size;
  return {{"self_attn.q_proj.weight", true, h.q_first * D, h.q_count * D},
          {"self_attn.k_proj.weight", true, h.kv_first * D, h.kv_count * D},
          {"self_attn.v_proj.weight", true, h.kv_first * D, h.kv_count * D},
          {"self_attn.o_proj.weight", false, h.q_first * D, h.q_count * D},
          {"mlp.gate_proj.weight", true, tp.rank * I, I},
          {"mlp.up_proj.weight", true, tp.rank * I, I},
          {"mlp.down_proj.weight", false, tp.rank * I, I}};
}

const ParallelLinear& linear_of(const LayerWeights& L, const std::string& name) {
  if (name == "self_attn.q_proj.weight") return L.q_proj;
  if (name == "self_attn.k_proj.weight") return L.k_proj;
  if (name == "self_attn.v_proj.weight") return L.v_proj;
  if (name == "self_attn.o_proj.weight") return L.o_proj;
  if (name == "mlp.gate_proj.weight") return L.mlp_gate;
  if (name == "mlp.up_proj.weight") return L.mlp_up;
  return L.mlp_down;
}

// Layer 1 is the dense one (mlp_only_layers [1]); layer 0 has attention only checked.
void check_rank(const Checkpoint& ck, const ModelWeights& w, const TinyShape& s, TpShard tp, bool fp8_kept) {
  for (const Expect& e : expected_slices(s, tp)) {
    const bool mlp = std::string(e.name).starts_with("mlp.");
    const int layer = mlp ? 1 : 0;
    const std::string name = "model.layers." + std::to_string(layer) + "." + e.name;
    const std::string what = name + " at TP rank " + std::to_string(tp.rank) + " of " + std::to_string(tp.size);
    const TensorInfo& t = ck.get(name);
    const ParallelLinear& p = linear_of(w.layers[size_t(layer)], e.name);
    const int64_t N = t.shape[0], K = t.shape[1];
    EXPECT_EQ(p.full_shape, t.shape) << what;
    EXPECT_EQ(p.shard.split, e.rows ? LinearShard::Split::Rows : LinearShard::Split::Cols) << what;
    EXPECT_EQ(p.shard.first, e.first) << what;
    EXPECT_EQ(p.shard.count, e.count) << what;
    const int64_t r0 = e.rows ? e.first : 0, nr = e.rows ? e.count : N;
    const int64_t c0 = e.rows ? 0 : e.first, nc = e.rows ? K : e.count;
    ASSERT_EQ(p.weight.dim(0), nr) << what;
    ASSERT_EQ(p.weight.dim(1), nc) << what;
    if (t.dtype == DType::F8E4M3 && !fp8_kept) {  // dequantized at load: the slice of the dequantized whole
      std::vector<uint16_t> full(size_t(N * K));
      dequantize_fp8_rows(t, ck.get(name + "_scale_inv"), load_config(ck.dir()).quant, 0, N, DType::BF16, full.data());
      ASSERT_EQ(p.weight.dtype, DType::BF16) << what;
      EXPECT_EQ(cut(full.data(), K, r0, nr, c0, nc, 2),
                std::vector<uint8_t>(static_cast<uint8_t*>(p.weight.data),
                                     static_cast<uint8_t*>(p.weight.data) + p.weight.nbytes()))
          << what;
      continue;
    }
    const size_t elem = dtype_size(t.dtype);
    ASSERT_EQ(p.weight.dtype, t.dtype) << what;
    const std::vector<uint8_t> want = cut(t.data, K, r0, nr, c0, nc, elem);
    ASSERT_EQ(p.weight.nbytes(), want.size()) << what;
    EXPECT_EQ(std::memcmp(p.weight.data, want.data(), want.size()), 0) << what << ": contents are the slice";
    if (e.rows)  // rows of a row-major tensor: a view into the mmap, no copy
      EXPECT_EQ(p.weight.data, static_cast<const uint8_t*>(t.data) + size_t(e.first * K) * elem) << what;
    else
      EXPECT_NE(p.weight.data, static_cast<const uint8_t*>(t.data) + size_t(e.first) * elem) << what;
    if (t.dtype != DType::F8E4M3) continue;
    // Scales: the 128x128 blocks of the slice, cut out of the full scale grid.
    const std::vector<float> all = fp8_scales_f32(t, ck.get(name + "_scale_inv"), load_config(ck.dir()).quant);
    const int64_t sk = (K + 127) / 128, b_r0 = r0 / 128, b_nr = (nr + 127) / 128, b_c0 = c0 / 128,
                  b_nc = (nc + 127) / 128;
    const std::vector<uint8_t> want_s = cut(all.data(), sk, b_r0, b_nr, b_c0, b_nc, 4);
    ASSERT_EQ(p.weight.scale.dim(0), b_nr) << what;
    ASSERT_EQ(p.weight.scale.dim(1), b_nc) << what;
    EXPECT_EQ(std::memcmp(p.weight.scale.data, want_s.data(), want_s.size()), 0) << what << ": block scales";
  }
}

// A BF16 tiny checkpoint, or its FP8 twin (every *_proj weight as e4m3 codes + F32 scales).
void write_model(const std::string& dir, const TinyShape& s, bool fp8) {
  const auto tensors = test::tiny_tensors(s);
  nlohmann::json cfg = nlohmann::json::parse(test::tiny_config_json(s));
  if (!fp8) {
    test::write_checkpoint(dir, tensors);
    write_text(dir + "/config.json", cfg.dump());
    return;
  }
  SafetensorsWriter wr;
  for (const auto& [name, t] : tensors) {
    if (!name.ends_with("_proj.weight")) {
      wr.add(name, DType::BF16, t.shape, t.bf16.data());
      continue;
    }
    const int64_t N = t.shape[0], K = t.shape[1];
    std::vector<float> v(t.bf16.size()), scale(size_t(((N + 127) / 128) * ((K + 127) / 128)));
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(t.bf16[i]) * (1.0f + float(i % 7));
    std::vector<uint8_t> codes(v.size());
    quantize_fp8(v.data(), N, K, 128, 128, codes.data(), scale.data());
    wr.add(name, DType::F8E4M3, t.shape, codes.data());
    wr.add(name + "_scale_inv", DType::F32, {(N + 127) / 128, (K + 127) / 128}, scale.data());
  }
  wr.write(dir + "/model.safetensors");
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  write_text(dir + "/config.json", cfg.dump());
}

TEST(ParallelLinear, EachTpRankLoadsItsSliceOfTheCheckpoint) {
  for (const TinyShape s : {TinyShape{}, TinyShape{.kv_heads = 1}}) {  // 2 kv heads; MQA (replicated at T > 1)
    TempDir dir;
    write_model(dir.path(), s, false);
    const Checkpoint ck = Checkpoint::open(dir.path());
    const ModelConfig cfg = load_config(dir.path());
    auto cpu = make_cpu_backend();
    for (int T : {1, 2, 4}) {
      size_t attn_bytes = 0;
      for (int t = 0; t < T; ++t) {
        const ModelWeights w = load_weights(ck, cfg, *cpu, 0, 1, {}, TpShard{t, T});
        if (T > 1) check_rank(ck, w, s, TpShard{t, T}, false);
        attn_bytes += w.layers[0].q_proj.weight.nbytes() + w.layers[0].o_proj.weight.nbytes();
      }
      // The q and o projections are split without overlap: together they are the whole.
      EXPECT_EQ(attn_bytes, size_t(2 * s.heads * s.head_dim * s.hidden) * 2) << "T=" << T;
    }
  }
}

TEST(ParallelLinear, Fp8SlicesKeepTheirCodesAndBlockScalesOrAreDequantizedSlices) {
  const TinyShape s{.head_dim = 128, .inter = 256};  // heads of 128 rows: every slice on the blocks
  TempDir dir;
  write_model(dir.path(), s, true);
  const Checkpoint ck = Checkpoint::open(dir.path());
  const ModelConfig cfg = load_config(dir.path());
  auto fp8 = make_cpu_backend(true, true), bf16 = make_cpu_backend(true, false);
  for (int t = 0; t < 2; ++t) {
    const ModelWeights w = load_weights(ck, cfg, *fp8, 0, 1, {}, TpShard{t, 2});
    ASSERT_EQ(w.layers[0].q_proj.weight.dtype, DType::F8E4M3);
    check_rank(ck, w, s, TpShard{t, 2}, true);
    check_rank(ck, load_weights(ck, cfg, *bf16, 0, 1, {}, TpShard{t, 2}), s, TpShard{t, 2}, false);
  }
  // T = 4: the dense MLP's 256 rows give 64 per rank, inside one 128-row scale block.
  EXPECT_ERROR_HAS(load_weights(ck, cfg, *fp8, 0, 1, {}, TpShard{1, 4}), "mlp.gate_proj.weight",
                   "cannot be split for attention tensor parallelism", "rows [64, 128)", "--fp8-weights bf16");
  // Dequantized at load (a back-end without FP8 kernels) any slice works.
  check_rank(ck, load_weights(ck, cfg, *bf16, 0, 1, {}, TpShard{1, 4}), s, TpShard{1, 4}, false);
}

// Random weights at TP rank t are the TP = 1 random weights' slice (BF16, FP8 kept, FP8 given as BF16).
TEST(ParallelLinear, RandomWeightsAreTheSameModelSliced) {
  const TinyShape s{.head_dim = 128, .inter = 256};
  for (auto [fp8, keep] : {std::pair{false, true}, std::pair{true, true}, std::pair{true, false}}) {
    nlohmann::json j = nlohmann::json::parse(test::tiny_config_json(s));
    if (fp8) j["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
    const ModelConfig cfg = parse_config(j.dump(), "tiny");
    {
      auto be = make_cpu_backend(true, keep);
      const ModelWeights full = random_weights(cfg, *be, 0, 1, 3);
      for (int t = 0; t < 2; ++t) {
        const ModelWeights w = random_weights(cfg, *be, 0, 1, 3, TpShard{t, 2});
        for (const Expect& e : expected_slices(s, TpShard{t, 2})) {
          const int layer = std::string(e.name).starts_with("mlp.") ? 1 : 0;
          const std::string what =
              std::string(e.name) + (fp8 ? " fp8" : " bf16") + (keep ? " kept" : "") + " rank " + std::to_string(t);
          const Weight& a = linear_of(full.layers[size_t(layer)], e.name).weight;
          const Weight& b = linear_of(w.layers[size_t(layer)], e.name).weight;
          ASSERT_EQ(a.dtype, b.dtype) << what;
          const int64_t K = a.dim(1), elem = int64_t(dtype_size(a.dtype));
          const auto want = e.rows ? cut(a.data, K, e.first, e.count, 0, K, size_t(elem))
                                   : cut(a.data, K, 0, a.dim(0), e.first, e.count, size_t(elem));
          ASSERT_EQ(b.nbytes(), want.size()) << what;
          EXPECT_EQ(std::memcmp(b.data, want.data(), want.size()), 0) << what;
          if (!a.fp8()) continue;
          const int64_t sk = a.scale.dim(1), f = e.first / 128, n = e.count / 128;
          const auto want_s =
              e.rows ? cut(a.scale.data, sk, f, n, 0, sk, 4) : cut(a.scale.data, sk, 0, a.scale.dim(0), f, n, 4);
          ASSERT_EQ(b.scale.nbytes(), want_s.size()) << what;
          EXPECT_EQ(std::memcmp(b.scale.data, want_s.data(), want_s.size()), 0) << what << " scales";
        }
      }
    }
  }
}

// The host slicing itself: rows are a pointer into the source, columns a copy; scales by block.
TEST(ParallelLinear, SliceHostAndScaleBlocks) {
  std::vector<float> w(6 * 4);
  for (size_t i = 0; i < w.size(); ++i) w[i] = float(i);
  std::vector<uint8_t> copy;
  const void* rows = slice_host(shard_rows(1, 2, 2), w.data(), 6, 4, 4, copy);  // rows [2, 6)
  EXPECT_EQ(rows, w.data() + 8);
  const auto* cols = static_cast<const float*>(slice_host(shard_cols(1, 1, 2), w.data(), 6, 4, 4, copy));
  EXPECT_EQ(static_cast<const void*>(cols), copy.data());
  for (int r = 0; r < 6; ++r) {
    EXPECT_EQ(cols[r * 2], float(r * 4 + 2));
    EXPECT_EQ(cols[r * 2 + 1], float(r * 4 + 3));
  }
  const std::vector<float> grid{1, 2, 3, 4, 5, 6};  // [2, 3] blocks of a [256, 300] weight
  EXPECT_EQ(slice_fp8_scales(shard_rows(1, 1, 128), grid, 256, 300, "w"), (std::vector<float>{4, 5, 6}));
  const LinearShard last{LinearShard::Split::Cols, 256, 44};  // the last block may be partial
  EXPECT_EQ(slice_fp8_scales(last, grid, 256, 300, "w"), (std::vector<float>{3, 6}));
  EXPECT_ERROR_HAS(slice_fp8_scales(shard_cols(1, 1, 64), grid, 256, 300, "w"), "'w'", "columns [64, 128)");
  EXPECT_ERROR_HAS(even_part(12, TpShard{0, 5}, "intermediate_size"), "intermediate_size is 12", "5");
}

}  // namespace
}  // namespace cpinfer
