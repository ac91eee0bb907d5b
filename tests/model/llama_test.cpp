// Llama 3 (LlamaForCausalLM) on the CPU reference: the llama3 RoPE frequencies against the formula
// in double precision, a tiny checkpoint's forward (prefill and decode) against an independent
// naive fp64 forward written here, and context-parallel prefill (C = 2..5, awkward lengths, the
// overlapped exchange too) equal to one rank. No transformers golden yet: transformers cannot be
// installed on the CI machine; tools/make_fixtures.py has a `llama3_gqa` entry that makes one on
// the GPU machine.
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>
#include <numbers>
#include <random>

#include "../loader/loader_test_util.h"
#include "engine/engine.h"
#include "engine/launch.h"
#include "fixtures.h"
#include "model/registry.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

struct Shape {
  int64_t vocab = 96, hidden = 32, heads = 4, kv_heads = 2, head_dim = 8, inter = 48, layers = 2;
  double theta = 10000.0, factor = 8.0, low = 1.0, high = 4.0;
  int64_t orig = 64;  // wavelengths 6.3, 63, 628, 6283: one high, one medium, two low frequencies
};

std::string llama_config(const Shape& s) {
  char buf[1024];
  std::snprintf(buf, sizeof buf, R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": %lld, "hidden_size": %lld,
  "intermediate_size": %lld, "num_hidden_layers": %lld, "num_attention_heads": %lld, "num_key_value_heads": %lld,
  "head_dim": %lld, "hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "rms_norm_eps": 1e-05,
  "max_position_embeddings": 1024, "rope_theta": %g, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "rope_scaling": {"rope_type": "llama3", "factor": %g, "low_freq_factor": %g, "high_freq_factor": %g,
                   "original_max_position_embeddings": %lld},
  "bos_token_id": 1, "eos_token_id": 2})",
                (long long)s.vocab, (long long)s.hidden, (long long)s.inter, (long long)s.layers, (long long)s.heads,
                (long long)s.kv_heads, (long long)s.head_dim, s.theta, s.factor, s.low, s.high, (long long)s.orig);
  return buf;
}

// The llama3 inv_freq in double (transformers' _compute_llama3_parameters, without float rounding).
std::vector<double> llama3_inv_freq(const Shape& s) {
  std::vector<double> out;
  const double low_wavelen = double(s.orig) / s.low, high_wavelen = double(s.orig) / s.high;
  for (int64_t i = 0; i < s.head_dim / 2; ++i) {
    const double inv = 1.0 / std::pow(s.theta, double(2 * i) / double(s.head_dim));
    const double wavelen = 2 * std::numbers::pi / inv;
    if (wavelen < high_wavelen) {
      out.push_back(inv);
    } else if (wavelen > low_wavelen) {
      out.push_back(inv / s.factor);
    } else {
      const double smooth = (double(s.orig) / wavelen - s.low) / (s.high - s.low);
      out.push_back((1 - smooth) * inv / s.factor + smooth * inv);
    }
  }
  return out;
}

struct LlamaWeights {
  std::map<std::string, TinyTensor> t;
  std::vector<double> get(const std::string& name) const {
    const TinyTensor& x = t.at(name);
    std::vector<double> v(x.bf16.size());
    for (size_t i = 0; i < v.size(); ++i) v[i] = bf16_to_f32(x.bf16[i]);
    return v;
  }
};

LlamaWeights make_checkpoint(const Shape& s, uint32_t seed) {
  LlamaWeights c;
  std::mt19937 rng(seed);
  auto add = [&](const std::string& name, std::vector<int64_t> shape, float mean, float std) {
    std::normal_distribution<float> d(mean, std);
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    TinyTensor t{std::move(shape), std::vector<uint16_t>(size_t(n))};
    for (auto& x : t.bf16) x = f32_to_bf16(d(rng));
    c.t[name] = std::move(t);
  };
  const int64_t H = s.hidden, D = s.head_dim;
  const float sh = 1.0f / std::sqrt(float(H));
  add("model.embed_tokens.weight", {s.vocab, H}, 0, 1);
  add("model.norm.weight", {H}, 1, 0.1f);
  add("lm_head.weight", {s.vocab, H}, 0, 2 * sh);
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 1, 0.1f);
    add(p + "post_attention_layernorm.weight", {H}, 1, 0.1f);
    add(p + "self_attn.q_proj.weight", {s.heads * D, H}, 0, 2 * sh);
    add(p + "self_attn.k_proj.weight", {s.kv_heads * D, H}, 0, 2 * sh);
    add(p + "self_attn.v_proj.weight", {s.kv_heads * D, H}, 0, sh);
    add(p + "self_attn.o_proj.weight", {H, s.heads * D}, 0, 1.0f / std::sqrt(float(s.heads * D)));
    add(p + "mlp.gate_proj.weight", {s.inter, H}, 0, sh);
    add(p + "mlp.up_proj.weight", {s.inter, H}, 0, sh);
    add(p + "mlp.down_proj.weight", {H, s.inter}, 0, 1.0f / std::sqrt(float(s.inter)));
  }
  return c;
}

// y[n] = Σ_k w[n, k] x[k]; w [N, K].
std::vector<double> matvec(const std::vector<double>& w, const std::vector<double>& x, int64_t N) {
  const int64_t K = int64_t(x.size());
  std::vector<double> y(size_t(N), 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) y[size_t(n)] += w[size_t(n * K + k)] * x[size_t(k)];
  return y;
}

std::vector<double> rms(const std::vector<double>& x, const std::vector<double>& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
  return y;
}

// Logits [n, V] of every position of `ids`, in fp64, straight from the Llama definition.
std::vector<std::vector<double>> naive_forward(const Shape& s, const LlamaWeights& c, const std::vector<int32_t>& ids) {
  const int64_t n = int64_t(ids.size()), H = s.hidden, D = s.head_dim, Hq = s.heads, Hkv = s.kv_heads;
  const double eps = 1e-5;
  const std::vector<double> inv_freq = llama3_inv_freq(s);
  const std::vector<double> embed = c.get("model.embed_tokens.weight");
  std::vector<std::vector<double>> x(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t)
    x[size_t(t)].assign(embed.begin() + ids[size_t(t)] * H, embed.begin() + (ids[size_t(t)] + 1) * H);
  auto rope = [&](std::vector<double>& v, int64_t heads, int64_t pos) {
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D / 2; ++i) {
        const double a = double(pos) * inv_freq[size_t(i)], co = std::cos(a), si = std::sin(a);
        double& x1 = v[size_t(h * D + i)];
        double& x2 = v[size_t(h * D + i + D / 2)];
        const double y1 = x1 * co - x2 * si, y2 = x2 * co + x1 * si;
        x1 = y1;
        x2 = y2;
      }
  };
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const auto wq = c.get(p + "self_attn.q_proj.weight"), wk = c.get(p + "self_attn.k_proj.weight"),
               wv = c.get(p + "self_attn.v_proj.weight"), wo = c.get(p + "self_attn.o_proj.weight"),
               wi = c.get(p + "input_layernorm.weight"), wp = c.get(p + "post_attention_layernorm.weight"),
               wg = c.get(p + "mlp.gate_proj.weight"), wu = c.get(p + "mlp.up_proj.weight"),
               wd = c.get(p + "mlp.down_proj.weight");
    const size_t n_rows = static_cast<size_t>(n);
    std::vector<std::vector<double>> q(n_rows), k(n_rows), v(n_rows);
    for (int64_t t = 0; t < n; ++t) {
      const auto h = rms(x[size_t(t)], wi, eps);
      q[size_t(t)] = matvec(wq, h, Hq * D);
      k[size_t(t)] = matvec(wk, h, Hkv * D);
      v[size_t(t)] = matvec(wv, h, Hkv * D);
      rope(q[size_t(t)], Hq, t);
      rope(k[size_t(t)], Hkv, t);
    }
    for (int64_t t = 0; t < n; ++t) {
      std::vector<double> attn(size_t(Hq * D), 0.0);
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t g = h / (Hq / Hkv);
        std::vector<double> sc(size_t(t + 1));
        double mx = -INFINITY;
        for (int64_t j = 0; j <= t; ++j) {
          double d = 0;
          for (int64_t i = 0; i < D; ++i) d += q[size_t(t)][size_t(h * D + i)] * k[size_t(j)][size_t(g * D + i)];
          sc[size_t(j)] = d / std::sqrt(double(D));
          mx = std::max(mx, sc[size_t(j)]);
        }
        double sum = 0;
        for (double& e : sc) sum += (e = std::exp(e - mx));
        for (int64_t j = 0; j <= t; ++j)
          for (int64_t i = 0; i < D; ++i)
            attn[size_t(h * D + i)] += sc[size_t(j)] / sum * v[size_t(j)][size_t(g * D + i)];
      }
      const auto o = matvec(wo, attn, H);
      for (int64_t i = 0; i < H; ++i) x[size_t(t)][size_t(i)] += o[size_t(i)];
      const auto h2 = rms(x[size_t(t)], wp, eps);
      auto gate = matvec(wg, h2, s.inter);
      const auto up = matvec(wu, h2, s.inter);
      for (size_t i = 0; i < gate.size(); ++i) gate[i] = gate[i] / (1 + std::exp(-gate[i])) * up[i];
      const auto m = matvec(wd, gate, H);
      for (int64_t i = 0; i < H; ++i) x[size_t(t)][size_t(i)] += m[size_t(i)];
    }
  }
  const auto wn = c.get("model.norm.weight"), lm = c.get("lm_head.weight");
  std::vector<std::vector<double>> logits;
  for (int64_t t = 0; t < n; ++t) logits.push_back(matvec(lm, rms(x[size_t(t)], wn, eps), s.vocab));
  return logits;
}

double rel_err(const std::vector<float>& a, const std::vector<double>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    d = std::max(d, std::abs(double(a[i]) - b[i]));
    m = std::max(m, std::abs(b[i]));
  }
  return d / m;
}

class LlamaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ckpt_ = make_checkpoint(shape_, 17);
    write_text(dir_.file("config.json"), llama_config(shape_));
    write_checkpoint(dir_.path(), ckpt_.t);
  }
  EngineOptions options(int cp = 1) const {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 2048;
    eo.cp = CpOptions{cp, true, 0};
    return eo;
  }
  Shape shape_;
  LlamaWeights ckpt_;
  TempDir dir_;
};

}  // namespace

TEST(LlamaConfig, Llama3RopeFrequenciesMatchTheFormula) {
  for (Shape s : {Shape{}, [] {
                    Shape l;  // Llama 3.1 8B's rope: theta 5e5, factor 8, 1 / 4, 8192, head_dim 128
                    l.head_dim = 128;
                    l.theta = 500000.0;
                    l.orig = 8192;
                    return l;
                  }()}) {
    ModelConfig c = parse_config(llama_config(s), "llama/config.json");
    EXPECT_EQ(c.architecture, "LlamaForCausalLM");
    EXPECT_EQ(c.num_experts, 0);
    ASSERT_EQ(c.rope.type, "llama3");
    RopeParams r = c.rope_params();
    const std::vector<double> want = llama3_inv_freq(s);
    ASSERT_EQ(r.inv_freq.size(), want.size());
    EXPECT_EQ(r.attention_factor, 1.0f);
    int n_scaled = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(r.inv_freq[i], want[i], 2e-6 * want[i]) << "head_dim " << s.head_dim << " i " << i;
      const double plain = 1.0 / std::pow(s.theta, double(2 * i) / double(s.head_dim));
      if (want[i] < plain * (1 - 1e-9)) ++n_scaled;
    }
    EXPECT_GT(n_scaled, 0) << "the scaling must change some frequencies";
    EXPECT_LT(n_scaled, int(want.size())) << "and leave the high ones alone";
  }
}

TEST(LlamaConfig, BiasesAndUnknownRopeAreRefused) {
  Shape s;
  std::string cfg = llama_config(s);
  std::string biased = cfg;
  biased.replace(biased.find("\"attention_bias\": false"), 23, "\"attention_bias\": true ");
  EXPECT_THROW(parse_config(biased, "llama/config.json"), Error);
  std::string rope = cfg;
  rope.replace(rope.find("\"llama3\""), 8, "\"longrope\"");
  EXPECT_THROW(parse_config(rope, "llama/config.json"), Error);
  EXPECT_EQ(model_family("LlamaForCausalLM").architecture, "LlamaForCausalLM");
}

// Prefill logits at every position and a decode step equal the naive fp64 forward.
TEST_F(LlamaTest, ForwardMatchesNaiveReference) {
  Engine e(dir_.path(), options());
  EXPECT_EQ(e.config().architecture, "LlamaForCausalLM");
  const std::vector<int32_t> ids = random_ids(37, int(shape_.vocab), 5);
  std::vector<int> seqs;
  auto logits = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
  const auto ref = naive_forward(shape_, ckpt_, ids);
  ASSERT_EQ(logits[0].size(), ref.size() * size_t(shape_.vocab));
  double worst = 0;
  for (size_t t = 0; t < ref.size(); ++t) {
    std::vector<float> row(logits[0].begin() + t * shape_.vocab, logits[0].begin() + (t + 1) * shape_.vocab);
    worst = std::max(worst, rel_err(row, ref[t]));
  }
  EXPECT_LE(worst, 1e-5) << "prefill logits vs naive fp64";
  std::vector<int32_t> more = ids;
  more.push_back(7);
  auto dec = e.decode({seqs[0]}, {7});
  const auto ref2 = naive_forward(shape_, ckpt_, more);
  const double d = rel_err(dec[0], ref2.back());
  EXPECT_LE(d, 1e-5) << "decode logits vs naive fp64";
  std::printf("[llama] worst relative difference to the naive fp64 forward: prefill %.3g, decode %.3g\n", worst, d);
}

// Context-parallel prefill (sequential and overlapped exchange) equals one rank: logits at every
// position and the greedy continuation.
TEST_F(LlamaTest, ContextParallelEqualsOneRank) {
  auto run = [&](int cp, const std::vector<int32_t>& ids, KvOverlap overlap) {
    std::pair<std::vector<float>, std::vector<int32_t>> out;
    std::mutex mu;
    LaunchOptions lo;
    lo.world_size = cp;
    lo.cp_size = cp;
    lo.timeout_s = 120;
    launch(lo, [&](ParallelCtx& par) {
      EngineOptions eo = options(cp);
      eo.model.kv_overlap = overlap;
      Engine e(dir_.path(), eo, par);
      std::vector<int> seqs;
      auto logits = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
      e.release(seqs[0]);
      GenerateOptions g;
      g.max_new_tokens = 6;
      g.ignore_eos = true;
      g.sampling.temperature = 0;
      auto greedy = e.generate(ids, g).output_ids;
      if (par.world_rank() == 0) {
        std::lock_guard<std::mutex> lock(mu);
        out = {logits[0], greedy};
      }
    });
    return out;
  };
  double worst = 0;
  for (int cp : {2, 3, 5}) {
    for (int len : {1, 2 * cp - 1, 2 * cp + 1, 257}) {
      const auto ids = random_ids(len, int(shape_.vocab), uint32_t(100 + len));
      const auto ref = run(1, ids, KvOverlap::Auto);
      for (KvOverlap ov : {KvOverlap::Off, KvOverlap::On}) {
        const auto r = run(cp, ids, ov);
        ASSERT_EQ(r.first.size(), ref.first.size());
        const double e = rel_max_err(r.first.data(), ref.first.data(), ref.first.size());
        worst = std::max(worst, e);
        EXPECT_LE(e, 1e-5) << "cp=" << cp << " len=" << len;
        EXPECT_EQ(r.second, ref.second) << "greedy, cp=" << cp << " len=" << len;
      }
    }
  }
  std::printf("[llama] worst relative difference CP vs one rank: %.3g\n", worst);
}
