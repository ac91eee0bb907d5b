// load_weights: name/shape validation, zero-copy CPU views, device uploads, expert sharding.
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <fstream>

#include <nlohmann/json.hpp>

#include "loader/config.h"
#include "loader/quant.h"
#include "loader_test_util.h"
#include "model/weights.h"

namespace cpinfer {
namespace {

using test::TempDir;
using test::TinyTensor;
using test::write_text;

// A back-end that only owns memory: host memory, reported as `dev`, recording every upload so
// the tests can see which checkpoint bytes were read. Ops are never called by the loader.
class MemoryBackend : public Backend {
 public:
  explicit MemoryBackend(Device dev) : dev_(dev) {}
  Device device() const override { return dev_; }
  std::string name() const override { return "memory"; }
  DType act_dtype() const override { return DType::F32; }
  void* alloc(size_t bytes) override {
    ++allocs;
    return std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  }
  void dealloc(void* p) override { std::free(p); }
  void upload(void* dst, const void* src, size_t bytes) override {
    uploads.push_back({static_cast<const uint8_t*>(src), bytes});
    std::memcpy(dst, src, bytes);
  }
  void download(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void sync() override { ++syncs; }
  bool fp8_weights_supported() const override { return fp8; }
  [[noreturn]] static void no_op() { throw std::logic_error("MemoryBackend has no ops"); }
  void fill_zero(Tensor) override { no_op(); }
  void embedding(const Tensor&, const Tensor&, Tensor) override { no_op(); }
  void rms_norm(const Tensor&, const Tensor&, float, Tensor) override { no_op(); }
  void add_rms_norm(Tensor, const Tensor&, const Tensor&, float, Tensor) override { no_op(); }
  void linear(const Tensor&, const Weight&, Tensor) override { no_op(); }
  void qk_norm_rope(Tensor, Tensor, const Tensor&, const Tensor&, float, const Tensor&, const RopeParams&) override {
    no_op();
  }
  void kv_store(const Tensor&, const Tensor&, const Tensor&, KvLayer) override { no_op(); }
  void attention(const Tensor&, const AttnBatch&, const KvLayer&, float, Tensor, Tensor) override { no_op(); }
  void moe_route(const Tensor&, int, bool, Tensor, Tensor) override { no_op(); }
  void moe_experts(const Tensor&, const Tensor&, const Tensor&, const ExpertShard&, Tensor) override { no_op(); }
  void silu_mul(const Tensor&, const Tensor&, Tensor) override { no_op(); }
  void add(Tensor, const Tensor&) override { no_op(); }
  void gather_rows(const Tensor&, const Tensor&, Tensor) override { no_op(); }
  void scatter_rows(const Tensor&, const Tensor&, Tensor) override { no_op(); }
  void convert(const Tensor&, Tensor) override { no_op(); }
  void attention_merge(Tensor, Tensor, const Tensor&, const Tensor&) override { no_op(); }
  void sample(const Tensor&, const std::vector<SampleRow>&, Tensor) override { no_op(); }

  struct Upload {
    const uint8_t* src;
    size_t bytes;
  };
  std::vector<Upload> uploads;
  int allocs = 0, syncs = 0;
  bool fp8 = false;  // says it computes with FP8 weights (the form a device FP8 GEMM would take)

 private:
  Device dev_;
};

// A tiny model directory: config.json + checkpoint (per-expert or fused, 1 or more shards).
struct TinyModel {
  TempDir dir;
  std::map<std::string, TinyTensor> tensors;
  TinyModel(bool fused = false, int shards = 1, bool tie = false, const test::TinyShape& s = {}) {
    tensors = test::tiny_tensors(s, fused, /*with_lm_head=*/!tie);
    write_text(dir.file("config.json"), test::tiny_config_json(s, tie));
    test::write_checkpoint(dir.path(), tensors, shards);
  }
  // Rewrites the checkpoint after `edit` changed the tensors.
  template <class F>
  void edit(F&& f) {
    f(tensors);
    std::filesystem::remove(dir.file("model.safetensors"));
    test::write_checkpoint(dir.path(), tensors, 1);
  }
};

// The bytes of tensor `t` equal `want` (a whole checkpoint tensor or a part of one).
void expect_bytes(const Tensor& t, const uint16_t* want, size_t n, const std::string& what) {
  ASSERT_TRUE(t.defined()) << what;
  ASSERT_EQ(t.nbytes(), n * 2) << what;
  EXPECT_EQ(std::memcmp(t.data, want, n * 2), 0) << what;
}

TEST(Weights, ExpertRangeCoversEveryExpertOnce) {
  for (int world = 1; world <= 9; ++world) {
    std::vector<int> owner(8, -1);
    int next = 0;
    for (int r = 0; r < world; ++r) {
      ExpertRange er = expert_range(8, r, world);
      EXPECT_EQ(er.first, next) << "contiguous, world " << world << " rank " << r;
      EXPECT_TRUE(er.count == 8 / world || er.count == 8 / world + 1);
      if (r > 0) {
        EXPECT_LE(er.count, expert_range(8, r - 1, world).count);  // the remainder goes first
      }
      for (int e = er.first; e < er.first + er.count; ++e) {
        ASSERT_LT(e, 8);
        EXPECT_EQ(owner[static_cast<size_t>(e)], -1) << "expert " << e << " held twice, world " << world;
        owner[static_cast<size_t>(e)] = r;
      }
      next = er.first + er.count;
    }
    for (int e = 0; e < 8; ++e) EXPECT_GE(owner[static_cast<size_t>(e)], 0) << "expert " << e << " world " << world;
  }
  EXPECT_EQ(expert_range(8, 8, 9).count, 0);
  EXPECT_ERROR_HAS(expert_range(8, 3, 3), "rank 3");
  EXPECT_ERROR_HAS(expert_range(8, 0, 0), "world size");
}

TEST(Weights, CpuViewsPointIntoTheCheckpoint) {
  TinyModel m;
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  size_t last_done = 0, last_total = 0, calls = 0;
  ModelWeights w = load_weights(ck, cfg, cpu, 0, 1, [&](size_t done, size_t total) {
    EXPECT_GE(done, last_done);
    last_done = done;
    last_total = total;
    ++calls;
  });
  EXPECT_TRUE(w.owned.empty());
  EXPECT_TRUE(cpu.uploads.empty());
  EXPECT_EQ(w.bytes, ck.total_bytes());
  EXPECT_EQ(last_done, last_total);
  EXPECT_EQ(last_total, ck.total_bytes());
  EXPECT_EQ(calls, ck.size());
  EXPECT_EQ(w.embed.data, ck.get("model.embed_tokens.weight").data);
  EXPECT_EQ(w.embed.shape_str(), "[32, 16]");
  EXPECT_EQ(w.embed.dtype, DType::BF16);
  EXPECT_EQ(w.lm_head.data, ck.get("lm_head.weight").data);
  ASSERT_EQ(w.layers.size(), 3u);
  EXPECT_TRUE(w.layers[0].moe);
  EXPECT_FALSE(w.layers[1].moe);
  EXPECT_TRUE(w.layers[2].moe);
  EXPECT_EQ(w.layers[0].q_proj.weight.shape_str(), "[32, 16]");  // Hq*D = 4*8
  EXPECT_EQ(w.layers[0].k_proj.weight.shape_str(), "[16, 16]");  // Hkv*D = 2*8
  EXPECT_EQ(w.layers[0].o_proj.weight.shape_str(), "[16, 32]");
  EXPECT_EQ(w.layers[0].q_norm.shape_str(), "[8]");
  EXPECT_EQ(w.layers[0].router.shape_str(), "[4, 16]");
  EXPECT_EQ(w.layers[1].mlp_down.weight.shape_str(), "[16, 12]");
  EXPECT_FALSE(w.layers[1].router.defined());
  const ExpertShard& s = w.layers[2].experts;
  EXPECT_EQ(s.n_experts, 4);
  EXPECT_EQ(s.first, 0);
  ASSERT_EQ(s.count, 4);
  for (int e = 0; e < 4; ++e) {
    const std::string p = "model.layers.2.mlp.experts." + std::to_string(e) + ".";
    EXPECT_EQ(s.gate[e].data, ck.get(p + "gate_proj.weight").data);
    EXPECT_EQ(s.up[e].data, ck.get(p + "up_proj.weight").data);
    EXPECT_EQ(s.down[e].shape_str(), "[16, 6]");
  }
}

TEST(Weights, MisalignedTensorsAreCopiedNotViewed) {
  // A 1-byte tensor first shifts every bf16 tensor to an odd address; a view would be a
  // misaligned uint16_t access, so the CPU path copies those into aligned memory instead.
  TinyModel m;
  SafetensorsWriter w;
  uint8_t pad = 7;
  w.add("pad", DType::U8, {1}, &pad);
  for (const auto& [name, t] : m.tensors) w.add(name, DType::BF16, t.shape, t.bf16.data());
  w.write(m.dir.file("model.safetensors"));
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  ASSERT_EQ(reinterpret_cast<uintptr_t>(ck.get("model.norm.weight").data) % 2, 1u);
  MemoryBackend cpu(Device::CPU);
  ModelWeights mw = load_weights(ck, cfg, cpu, 0, 1);
  EXPECT_FALSE(mw.owned.empty());
  EXPECT_EQ(reinterpret_cast<uintptr_t>(mw.final_norm.data) % 2, 0u);
  expect_bytes(mw.final_norm, m.tensors.at("model.norm.weight").bf16.data(), 16, "norm");
  expect_bytes(mw.layers[2].experts.up[3], m.tensors.at("model.layers.2.mlp.experts.3.up_proj.weight").bf16.data(),
               6 * 16, "expert 3 up");
}

TEST(Weights, TiedEmbeddingsShareTheTable) {
  TinyModel m(false, 1, /*tie=*/true);
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  ModelWeights w = load_weights(ck, cfg, cpu, 0, 1);
  EXPECT_EQ(w.lm_head.data, w.embed.data);
  EXPECT_EQ(w.lm_head.shape_str(), "[32, 16]");
}

// For every world size and rank: only the rank's experts are read, per-expert and fused layouts
// give the same bytes, and on a device back-end the uploads never touch another rank's experts.
TEST(Weights, RankLoadsOnlyItsExpertShard) {
  TinyModel per_expert(false, 2), fused(true);
  ModelConfig cfg = load_config(per_expert.dir.path());
  Checkpoint ck_pe = Checkpoint::open(per_expert.dir.path());
  Checkpoint ck_fu = Checkpoint::open(fused.dir.path());
  const int64_t H = 16, Im = 6;
  for (int world = 1; world <= 5; ++world) {
    size_t total_bytes = 0;
    for (int rank = 0; rank < world; ++rank) {
      ExpertRange er = expert_range(4, rank, world);
      MemoryBackend dev(Device::CUDA);
      ModelWeights a = load_weights(ck_pe, cfg, dev, rank, world);
      ModelWeights b = load_weights(ck_fu, cfg, dev, rank, world);
      total_bytes += a.bytes;
      EXPECT_EQ(a.embed.device, Device::CUDA);
      EXPECT_NE(a.embed.data, ck_pe.get("model.embed_tokens.weight").data);  // a device copy
      for (const ModelWeights* w : {&a, &b}) {
        const ExpertShard& s = w->layers[0].experts;
        ASSERT_EQ(s.first, er.first);
        ASSERT_EQ(s.count, er.count);
        ASSERT_EQ(s.gate.size(), static_cast<size_t>(er.count));
        for (int k = 0; k < er.count; ++k) {
          const int e = er.first + k;
          const std::string p = "model.layers.0.mlp.experts." + std::to_string(e) + ".";
          const TinyTensor& gu = fused.tensors.at("model.layers.0.mlp.experts.gate_up_proj");
          const TinyTensor& dn = fused.tensors.at("model.layers.0.mlp.experts.down_proj");
          if (w == &a) {
            expect_bytes(s.gate[k], per_expert.tensors.at(p + "gate_proj.weight").bf16.data(), Im * H, p + "gate");
            expect_bytes(s.up[k], per_expert.tensors.at(p + "up_proj.weight").bf16.data(), Im * H, p + "up");
            expect_bytes(s.down[k], per_expert.tensors.at(p + "down_proj.weight").bf16.data(), H * Im, p + "down");
          } else {  // fused: gate rows first, then up
            expect_bytes(s.gate[k], gu.bf16.data() + e * 2 * Im * H, Im * H, p + "fused gate");
            expect_bytes(s.up[k], gu.bf16.data() + (e * 2 * Im + Im) * H, Im * H, p + "fused up");
            expect_bytes(s.down[k], dn.bf16.data() + e * H * Im, H * Im, p + "fused down");
          }
          EXPECT_EQ(s.gate[k].shape_str(), "[6, 16]");
          EXPECT_EQ(s.down[k].shape_str(), "[16, 6]");
        }
      }
      // No upload reads the experts of another rank (per-expert tensors and fused rows alike).
      auto overlaps = [](const uint8_t* p, size_t n, const void* q, size_t m) {
        auto* qq = static_cast<const uint8_t*>(q);
        return p < qq + m && qq < p + n;
      };
      for (int e = 0; e < 4; ++e) {
        if (e >= er.first && e < er.first + er.count) continue;
        for (const auto& up : dev.uploads) {
          for (const char* kind : {"gate_proj", "up_proj", "down_proj"}) {
            const TensorInfo& t = ck_pe.get("model.layers.0.mlp.experts." + std::to_string(e) + "." + kind + ".weight");
            EXPECT_FALSE(overlaps(up.src, up.bytes, t.data, t.nbytes)) << "rank " << rank << " read expert " << e;
          }
          const TensorInfo& gu = ck_fu.get("model.layers.0.mlp.experts.gate_up_proj");
          const TensorInfo& dn = ck_fu.get("model.layers.0.mlp.experts.down_proj");
          const size_t gu_row = gu.nbytes / 4, dn_row = dn.nbytes / 4;
          EXPECT_FALSE(overlaps(up.src, up.bytes, static_cast<const uint8_t*>(gu.data) + e * gu_row, gu_row));
          EXPECT_FALSE(overlaps(up.src, up.bytes, static_cast<const uint8_t*>(dn.data) + e * dn_row, dn_row));
        }
      }
      EXPECT_GT(dev.syncs, 0);
    }
    // Every rank holds the dense part; the experts are split, so the sum grows by (world-1) copies
    // of the non-expert weights only.
    const size_t expert_bytes = 2 * static_cast<size_t>(4 * 3 * Im * H) * 2;  // 2 MoE layers
    const size_t dense_bytes = ck_pe.total_bytes() - expert_bytes;
    EXPECT_EQ(total_bytes, static_cast<size_t>(world) * dense_bytes + expert_bytes) << "world " << world;
  }
}

TEST(Weights, ShardedCheckpointGivesIdenticalWeights) {
  TinyModel one(false, 1), three(false, 3);
  ModelConfig cfg = load_config(one.dir.path());
  Checkpoint a = Checkpoint::open(one.dir.path()), b = Checkpoint::open(three.dir.path());
  MemoryBackend cpu(Device::CPU);
  ModelWeights wa = load_weights(a, cfg, cpu, 0, 1), wb = load_weights(b, cfg, cpu, 0, 1);
  EXPECT_EQ(wa.bytes, wb.bytes);
  auto same = [](const Tensor& x, const Tensor& y) {
    return x.shape_str() == y.shape_str() && x.nbytes() == y.nbytes() && std::memcmp(x.data, y.data, x.nbytes()) == 0;
  };
  EXPECT_TRUE(same(wa.embed, wb.embed));
  EXPECT_TRUE(same(wa.lm_head, wb.lm_head));
  for (size_t l = 0; l < 3; ++l) {
    EXPECT_TRUE(same(wa.layers[l].q_proj.weight, wb.layers[l].q_proj.weight)) << l;
    EXPECT_TRUE(same(wa.layers[l].k_norm, wb.layers[l].k_norm)) << l;
    for (int e = 0; e < wa.layers[l].experts.count; ++e)
      EXPECT_TRUE(same(wa.layers[l].experts.down[e], wb.layers[l].experts.down[e])) << l << " " << e;
  }
}

// ---- mismatches between checkpoint and config: each names the tensor and the file.

TEST(WeightsErrors, MissingTensor) {
  TinyModel m;
  m.edit([](auto& t) { t.erase("model.layers.2.self_attn.k_proj.weight"); });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "missing tensor 'model.layers.2.self_attn.k_proj.weight'",
                   m.dir.path());
}

TEST(WeightsErrors, MissingExpertOfThisRankButNotOthers) {
  TinyModel m;
  m.edit([](auto& t) { t.erase("model.layers.0.mlp.experts.3.up_proj.weight"); });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_NO_THROW(load_weights(ck, cfg, cpu, 0, 2));  // rank 0 holds experts 0-1 only
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 1, 2), "missing tensor 'model.layers.0.mlp.experts.3.up_proj.weight'");
}

TEST(WeightsErrors, WrongShapeForTheConfig) {
  TinyModel m;
  m.edit([](auto& t) { t["model.layers.1.self_attn.q_proj.weight"].shape = {16, 32}; });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "tensor 'model.layers.1.self_attn.q_proj.weight'",
                   "model.safetensors", "has shape [16, 32], expected [32, 16]", "num_attention_heads*head_dim=32");
}

TEST(WeightsErrors, FusedExpertsOfWrongShape) {
  TinyModel m(/*fused=*/true);
  m.edit([](auto& t) { t["model.layers.2.mlp.experts.gate_up_proj"].shape = {4, 16, 12}; });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "tensor 'model.layers.2.mlp.experts.gate_up_proj'",
                   "has shape [4, 16, 12], expected [4, 12, 16]");
}

TEST(WeightsErrors, FusedGateUpWithoutDown) {
  TinyModel m(/*fused=*/true);
  m.edit([](auto& t) { t.erase("model.layers.0.mlp.experts.down_proj"); });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "missing tensor 'model.layers.0.mlp.experts.down_proj'");
}

TEST(WeightsErrors, LmHeadAbsentWithoutTie) {
  TinyModel m;
  m.edit([](auto& t) { t.erase("lm_head.weight"); });
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "missing tensor 'lm_head.weight'", "tie_word_embeddings");
}

TEST(WeightsErrors, NonFloatWeight) {
  TinyModel m;
  Checkpoint ck0 = Checkpoint::open(m.dir.path());
  // Rewrite model.norm.weight as I32 of the same element count.
  SafetensorsWriter w;
  for (const std::string& n : ck0.names()) {
    const TensorInfo& t = ck0.get(n);
    if (n == "model.norm.weight") {
      std::vector<int32_t> v(16, 1);
      w.add(n, DType::I32, t.shape, v.data());
    } else {
      w.add(n, t.dtype, t.shape, t.data);
    }
  }
  // Write beside and rename: ck0 still maps the old file, which must not be truncated under it.
  w.write(m.dir.file("new.tmp"));
  std::filesystem::rename(m.dir.file("new.tmp"), m.dir.file("model.safetensors"));
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 0, 1), "tensor 'model.norm.weight'", "dtype I32");
}

TEST(WeightsErrors, BadRank) {
  TinyModel m;
  ModelConfig cfg = load_config(m.dir.path());
  Checkpoint ck = Checkpoint::open(m.dir.path());
  MemoryBackend cpu(Device::CPU);
  EXPECT_ERROR_HAS(load_weights(ck, cfg, cpu, 2, 2), "rank 2");
}

// ---- checkpoints written by transformers itself (tests/loader/make_hf_tiny.py on the GPU machine).

TEST(HfInterop, TransformersSavedModelLoads) {
  const char* root = std::getenv("CPINFER_HF_TINY_DIR");
  if (!root) GTEST_SKIP() << "CPINFER_HF_TINY_DIR not set (made by tests/loader/make_hf_tiny.py where transformers is)";
  std::ifstream in(std::string(root) + "/expected.json");
  ASSERT_TRUE(in.good()) << root << "/expected.json";
  nlohmann::json want = nlohmann::json::parse(in);
  for (const char* variant : {"single", "sharded"}) {
    SCOPED_TRACE(variant);
    const std::string dir = std::string(root) + "/" + variant;
    ModelConfig cfg = load_config(dir);
    EXPECT_EQ(cfg.head_dim, 16);
    EXPECT_EQ(cfg.num_experts, 4);
    EXPECT_EQ(cfg.mlp_only_layers, std::vector<int>{1});
    EXPECT_TRUE(cfg.norm_topk_prob);
    EXPECT_EQ(cfg.rope.type, "yarn");
    RopeParams rope = cfg.rope_params();
    std::vector<float> inv = want["inv_freq"].get<std::vector<float>>();
    ASSERT_EQ(rope.inv_freq.size(), inv.size());
    for (size_t i = 0; i < inv.size(); ++i)
      EXPECT_NEAR(rope.inv_freq[i], inv[i], 1e-7 * std::abs(inv[i])) << "inv_freq[" << i << "]";
    EXPECT_FLOAT_EQ(rope.attention_factor, want["attention_scaling"].get<float>());

    Checkpoint ck = Checkpoint::open(dir);
    EXPECT_EQ(ck.size(), want["tensors"].size());
    for (auto it = want["tensors"].begin(); it != want["tensors"].end(); ++it) {
      const TensorInfo& t = ck.get(it.key());
      EXPECT_EQ(t.shape, it.value()["shape"].get<std::vector<int64_t>>()) << it.key();
      ASSERT_EQ(t.dtype, DType::BF16) << it.key();
      double sum = 0;
      for (size_t i = 0; i < t.nbytes / 2; ++i) {
        uint16_t h;
        std::memcpy(&h, static_cast<const uint8_t*>(t.data) + 2 * i, 2);
        sum += bf16_to_f32(h);
      }
      EXPECT_NEAR(sum, it.value()["sum"].get<double>(), 1e-6 * (1 + std::abs(sum))) << it.key();
    }
    MemoryBackend cpu(Device::CPU);
    ModelWeights w = load_weights(ck, cfg, cpu, 1, 2);
    EXPECT_EQ(w.layers[0].experts.first, 2);
    EXPECT_EQ(w.layers[0].experts.count, 2);
    EXPECT_FALSE(w.layers[1].moe);
    EXPECT_EQ(w.layers[2].experts.down[1].shape_str(), "[32, 8]");
  }
}

}  // namespace
}  // namespace cpinfer

namespace cpinfer {
namespace {

// An FP8 twin of the tiny model, quantized by the published rule: every *_proj.weight as e4m3 codes
// with scales, F32 for attention and BF16 for the MLPs (both occur in published checkpoints).
void write_fp8_twin(const TinyModel& m, const std::string& dir) {
  SafetensorsWriter wr;
  for (const auto& [name, t] : m.tensors) {
    if (!name.ends_with("_proj.weight")) {
      wr.add(name, DType::BF16, t.shape, t.bf16.data());
      continue;
    }
    const int64_t N = t.shape[0], K = t.shape[1], sn = (N + 127) / 128, sk = (K + 127) / 128;
    std::vector<float> v(t.bf16.size()), scale(static_cast<size_t>(sn * sk));
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(t.bf16[i]);
    std::vector<uint8_t> codes(v.size());
    quantize_fp8(v.data(), N, K, 128, 128, codes.data(), scale.data());
    wr.add(name, DType::F8E4M3, t.shape, codes.data());
    if (name.find("mlp") == std::string::npos) {
      wr.add(name + "_scale_inv", DType::F32, {sn, sk}, scale.data());
      continue;
    }
    std::vector<uint16_t> sb(scale.size());
    for (size_t i = 0; i < sb.size(); ++i) sb[i] = f32_to_bf16(scale[i]);
    wr.add(name + "_scale_inv", DType::BF16, {sn, sk}, sb.data());
  }
  wr.write(dir + "/model.safetensors");
  nlohmann::json cfg = nlohmann::json::parse(test::tiny_config_json());
  cfg["quantization_config"] = {{"quant_method", "fp8"}, {"weight_block_size", {128, 128}}};
  write_text(dir + "/config.json", cfg.dump());
}

// A device back-end that takes FP8 gets each FP8 weight as its codes, uploaded straight from the
// checkpoint (1 byte per weight), and F32 scales (BF16 ones widened); one without FP8 kernels gets
// the BF16 dequantized weight. Rank 1 of 2 uploads only its experts' codes.
TEST(Weights, Fp8WeightsReachADeviceAsCodesAndF32ScalesOrAsBf16) {
  TinyModel m;
  TempDir dir;
  write_fp8_twin(m, dir.path());
  const Checkpoint ck = Checkpoint::open(dir.path());
  const ModelConfig cfg = load_config(dir.path());
  auto uploaded_from = [](const MemoryBackend& be, const void* src, size_t bytes) {
    for (const auto& u : be.uploads)
      if (u.src == src && u.bytes == bytes) return true;
    return false;
  };
  MemoryBackend fp8(Device::CUDA);
  fp8.fp8 = true;
  const ModelWeights w = load_weights(ck, cfg, fp8, 0, 1);
  const std::string q = "model.layers.0.self_attn.q_proj.weight", d = "model.layers.2.mlp.experts.3.down_proj.weight";
  for (const auto& [name, x] :
       {std::pair<std::string, const Weight*>{q, &w.layers[0].q_proj.weight}, {d, &w.layers[2].experts.down[3]}}) {
    const TensorInfo& t = ck.get(name);
    EXPECT_EQ(x->dtype, DType::F8E4M3) << name;
    EXPECT_EQ(x->device, Device::CUDA) << name;
    EXPECT_EQ(x->nbytes(), t.nbytes) << name;
    EXPECT_EQ(std::memcmp(x->data, t.data, t.nbytes), 0) << name;
    EXPECT_TRUE(uploaded_from(fp8, t.data, t.nbytes)) << name << ": codes uploaded from the checkpoint";
    const std::vector<float> s = fp8_scales_f32(t, ck.get(name + "_scale_inv"), cfg.quant);
    ASSERT_EQ(x->scale.dtype, DType::F32) << name;
    ASSERT_EQ(x->scale.numel(), int64_t(s.size())) << name;
    EXPECT_EQ(std::memcmp(x->scale.data, s.data(), s.size() * 4), 0) << name;
  }
  EXPECT_EQ(ck.get(d + "_scale_inv").dtype, DType::BF16);

  MemoryBackend bf16(Device::CUDA);
  const ModelWeights b = load_weights(ck, cfg, bf16, 0, 1);
  const Weight& bq = b.layers[0].q_proj.weight;
  ASSERT_EQ(bq.dtype, DType::BF16);
  EXPECT_FALSE(bq.scale.defined());
  std::vector<uint16_t> want(static_cast<size_t>(bq.numel()));
  dequantize_fp8_rows(ck.get(q), ck.get(q + "_scale_inv"), cfg.quant, 0, bq.dim(0), DType::BF16, want.data());
  EXPECT_EQ(std::memcmp(bq.data, want.data(), want.size() * 2), 0);
  size_t codes = 0, scales = 0;  // BF16: one more byte per weight, no F32 scales
  for (const std::string& n : ck.names()) {
    if (ck.get(n).dtype != DType::F8E4M3) continue;
    const TensorInfo& s = ck.get(n + "_scale_inv");
    codes += ck.get(n).nbytes;
    scales += s.nbytes / dtype_size(s.dtype);
  }
  EXPECT_EQ(b.bytes, w.bytes + codes - 4 * scales);

  MemoryBackend rank1(Device::CUDA);
  rank1.fp8 = true;
  const ModelWeights r = load_weights(ck, cfg, rank1, 1, 2);
  EXPECT_EQ(r.layers[0].experts.first, 2);
  for (int e = 0; e < 4; ++e) {
    const TensorInfo& t = ck.get("model.layers.0.mlp.experts." + std::to_string(e) + ".up_proj.weight");
    EXPECT_EQ(uploaded_from(rank1, t.data, t.nbytes), e >= 2) << "expert " << e;
  }
}

}  // namespace
}  // namespace cpinfer
