// CPU back-end: q/k RMSNorm + RoPE (with and without norm weights, with an attention factor) and
// the paged KV store, against double-precision references. These tests belong to the CpuAttention
// suite (fixture in ops_test_util.h), whose paged attention tests are in test_cpu_attention.cpp.
#include <algorithm>

#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

RopeParams make_rope(int64_t D, double theta, float factor) {
  RopeParams r;
  for (int64_t i = 0; i < D / 2; ++i)
    r.inv_freq.push_back(static_cast<float>(1.0 / std::pow(theta, static_cast<double>(2 * i) / D)));
  r.attention_factor = factor;
  return r;
}

// Per-head RMSNorm then rotate_half RoPE, in double; the angle is the fp32 product as in transformers.
std::vector<double> ref_norm_rope(const HostTensor& x, const HostTensor& w, const HostTensor& pos, int64_t T, int64_t H,
                                  int64_t D, double eps, const RopeParams& rope) {
  std::vector<double> out(static_cast<size_t>(T * H * D));
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = (t * H + h) * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += x.get(base + i) * x.get(base + i);
      const double r = 1.0 / std::sqrt(ss / D + eps);
      std::vector<double> n(static_cast<size_t>(D));
      for (int64_t i = 0; i < D; ++i) n[i] = x.get(base + i) * r * w.get(i);
      for (int64_t i = 0; i < half; ++i) {
        const double f = static_cast<float>(static_cast<float>(pos.get(t)) * rope.inv_freq[i]);
        const double c = std::cos(f) * rope.attention_factor, s = std::sin(f) * rope.attention_factor;
        out[base + i] = n[i] * c - n[half + i] * s;
        out[base + half + i] = n[half + i] * c + n[i] * s;
      }
    }
  return out;
}

TEST_F(CpuAttention, QkNormRope) {
  Rng rng(21);
  for (int64_t D : {16, 32, 64, 128})
    for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{1, 1}, {4, 2}, {8, 1}, {16, 2}})
      for (int64_t T : {1, 3, 17, 200}) {
        const RopeParams rope = make_rope(D, D == 64 ? 10000.0 : 1e6, D == 32 ? 1.25f : 1.0f);
        HostTensor q = rng.normal_tensor(DType::F32, {T, Hq, D}, 1.5);
        HostTensor k = rng.normal_tensor(DType::F32, {T, Hkv, D}, 0.7);
        HostTensor qw = rng.normal_tensor(DType::BF16, {D}, 0.2, 1.0);
        HostTensor kw = rng.normal_tensor(DType::F32, {D}, 0.2, 1.0);
        std::vector<int64_t> p(static_cast<size_t>(T));
        for (auto& v : p) v = rng.integer(0, 40000);
        p[0] = 0;
        HostTensor pos = index_tensor(p);
        const auto rq = ref_norm_rope(q, qw, pos, T, Hq, D, 1e-6, rope);
        const auto rk = ref_norm_rope(k, kw, pos, T, Hkv, D, 1e-6, rope);
        be->qk_norm_rope(q, k, qw, kw, 1e-6f, pos, rope);
        const std::string tag = " D=" + std::to_string(D) + " Hq=" + std::to_string(Hq) + " T=" + std::to_string(T);
        EXPECT_TRUE(all_close(q, rq, 1e-5, "q" + tag));
        EXPECT_TRUE(all_close(k, rk, 1e-5, "k" + tag));
      }
  HostTensor q(DType::F32, {2, 2, 16}), k(DType::F32, {2, 1, 16}), w(DType::F32, {16});
  EXPECT_THROW(be->qk_norm_rope(q, k, w, Tensor{}, 1e-6f, index_tensor({0, 1}), make_rope(16, 1e4, 1)), Error);
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0, 1}), make_rope(32, 1e4, 1)), Error);
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0, -1}), make_rope(16, 1e4, 1)), Error);
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0}), make_rope(16, 1e4, 1)), Error);
}

// Undefined norm weights: RoPE alone (families without q/k norm, e.g. Llama).
TEST_F(CpuAttention, RopeWithoutQkNorm) {
  Rng rng(23);
  const int64_t T = 9, Hq = 4, Hkv = 2, D = 32;
  const RopeParams rope = make_rope(D, 5e5, 1.0f);
  HostTensor q = rng.normal_tensor(DType::F32, {T, Hq, D}, 1.5), k = rng.normal_tensor(DType::F32, {T, Hkv, D});
  std::vector<int64_t> p(static_cast<size_t>(T));
  for (auto& v : p) v = rng.integer(0, 40000);
  HostTensor pos = index_tensor(p);
  auto rotated = [&](const HostTensor& x, int64_t H) {
    std::vector<double> out(static_cast<size_t>(T * H * D));
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const int64_t b = (t * H + h) * D;
          const double f = static_cast<float>(static_cast<float>(pos.get(t)) * rope.inv_freq[size_t(i)]);
          const double x1 = x.get(b + i), x2 = x.get(b + D / 2 + i);
          out[size_t(b + i)] = x1 * std::cos(f) - x2 * std::sin(f);
          out[size_t(b + D / 2 + i)] = x2 * std::cos(f) + x1 * std::sin(f);
        }
    return out;
  };
  const auto rq = rotated(q, Hq), rk = rotated(k, Hkv);
  be->qk_norm_rope(q, k, Tensor{}, Tensor{}, 1e-6f, pos, rope);
  EXPECT_TRUE(all_close(q, rq, 1e-5, "q"));
  EXPECT_TRUE(all_close(k, rk, 1e-5, "k"));
}

TEST_F(CpuAttention, KvStore) {
  Rng rng(22);
  for (DType cache_t : {DType::F32, DType::BF16, DType::F16}) {
    const int64_t nb = 5, bs = 4, Hkv = 2, D = 16, T = 7;
    HostTensor kc = rng.normal_tensor(cache_t, {nb, bs, Hkv, D}), vc = rng.normal_tensor(cache_t, {nb, bs, Hkv, D});
    const HostTensor k0 = kc, v0 = vc;
    HostTensor k = rng.normal_tensor(DType::F32, {T, Hkv, D}), v = rng.normal_tensor(DType::F32, {T, Hkv, D});
    const std::vector<int64_t> slots = {19, 0, 6, 7, 13, 3, 8};
    be->kv_store(k, v, index_tensor(slots), KvLayer{kc, vc});
    const int64_t row = Hkv * D;
    for (int64_t s = 0; s < nb * bs; ++s) {
      const auto it = std::find(slots.begin(), slots.end(), s);
      for (int64_t e = 0; e < row; ++e) {
        if (it == slots.end()) {  // untouched slots keep their contents
          ASSERT_EQ(kc.get(s * row + e), k0.get(s * row + e));
          ASSERT_EQ(vc.get(s * row + e), v0.get(s * row + e));
        } else {
          HostTensor want(cache_t, {2});
          const int64_t t = it - slots.begin();
          want.set(0, k.get(t * row + e));
          want.set(1, v.get(t * row + e));
          ASSERT_EQ(kc.get(s * row + e), want.get(0));
          ASSERT_EQ(vc.get(s * row + e), want.get(1));
        }
      }
    }
    EXPECT_THROW(be->kv_store(k, v, index_tensor({0, 1, 2, 3, 4, 5, 20}), KvLayer{kc, vc}), Error);
    EXPECT_THROW(be->kv_store(k, v, index_tensor({0, 1}), KvLayer{kc, vc}), Error);
  }
}

}  // namespace
}  // namespace cpinfer::test
