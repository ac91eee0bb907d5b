// CPU back-end: memory, norms, element-wise ops, embedding, router, row moves, conversions, each
// against a naive double-precision reference.
#include <algorithm>
#include <numeric>

#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

TEST_F(CpuOps, Identity) {
  EXPECT_EQ(be->device(), Device::CPU);
  EXPECT_EQ(be->name(), "cpu");
  EXPECT_EQ(be->act_dtype(), DType::F32);
  EXPECT_EQ(make_backend("cpu")->name(), "cpu");
  // Kernel choices are CUDA's: the CPU back-end takes only "auto", and says so.
  BackendOptions o;
  o.attention = "ws";
  EXPECT_THROW(make_backend("cpu", 0, o), Error);
  o.attention = "auto";
  o.moe = "wgmma";
  EXPECT_THROW(make_backend("cpu", 0, o), Error);
  o.moe = "auto";
  EXPECT_EQ(make_backend("cpu", 0, o)->name(), "cpu");
}

TEST_F(CpuOps, MemoryRoundTrip) {
  EXPECT_EQ(be->alloc(0), nullptr);
  be->dealloc(nullptr);
  std::vector<uint8_t> src(1001), back(1001, 0);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  Buffer a(*be, src.size()), b(*be, src.size());
  ASSERT_NE(a.data(), nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.data()) % 64, 0u);
  be->upload(a.data(), src.data(), src.size());
  be->copy(b.data(), a.data(), src.size());
  be->sync();
  be->download(back.data(), b.data(), back.size());
  EXPECT_EQ(src, back);
  be->copy(nullptr, nullptr, 0);  // zero bytes: nothing to do, no error

  Tensor t = b.tensor(DType::U8, {1001});
  be->fill_zero(t);
  be->download(back.data(), b.data(), back.size());
  EXPECT_TRUE(std::all_of(back.begin(), back.end(), [](uint8_t v) { return v == 0; }));
}

std::vector<double> ref_rms_norm(const std::vector<double>& x, const std::vector<double>& w, int64_t T, int64_t H,
                                 double eps) {
  std::vector<double> out(x.size());
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0;
    for (int64_t i = 0; i < H; ++i) ss += x[t * H + i] * x[t * H + i];
    const double r = 1.0 / std::sqrt(ss / H + eps);
    for (int64_t i = 0; i < H; ++i) out[t * H + i] = x[t * H + i] * r * w[i];
  }
  return out;
}

TEST_F(CpuOps, RmsNorm) {
  Rng rng(1);
  for (int64_t T : {1, 3, 17, 200})
    for (int64_t H : {16, 33, 128, 2048})
      for (DType wt : {DType::F32, DType::BF16, DType::F16}) {
        HostTensor x = rng.normal_tensor(DType::F32, {T, H}, 2.0, 0.5);
        HostTensor w = rng.normal_tensor(wt, {H}, 0.3, 1.0);
        HostTensor out(DType::F32, {T, H});
        out.poison();
        be->rms_norm(x, w, 1e-6f, out);
        EXPECT_TRUE(all_close(out, ref_rms_norm(x.to_double(), w.to_double(), T, H, 1e-6), 1e-6,
                              "rms_norm T=" + std::to_string(T) + " H=" + std::to_string(H) + " w=" + dtype_str(wt)));
      }
}

TEST_F(CpuOps, AddRmsNorm) {
  Rng rng(2);
  for (int64_t T : {1, 17, 200})
    for (int64_t H : {16, 129}) {
      HostTensor res = rng.normal_tensor(DType::F32, {T, H});
      HostTensor x = rng.normal_tensor(DType::F32, {T, H});
      HostTensor w = rng.normal_tensor(DType::BF16, {H}, 0.3, 1.0);
      std::vector<double> sum(static_cast<size_t>(T * H));
      for (int64_t i = 0; i < T * H; ++i)  // the residual add is one fp32 addition
        sum[i] = static_cast<float>(static_cast<float>(res.get(i)) + static_cast<float>(x.get(i)));
      HostTensor out(DType::F32, {T, H});
      out.poison();
      be->add_rms_norm(res, x, w, 1e-5f, out);
      EXPECT_TRUE(all_close(res, sum, 0.0, "residual"));
      EXPECT_TRUE(all_close(out, ref_rms_norm(sum, w.to_double(), T, H, 1e-5), 1e-6, "add_rms_norm"));
    }
}

TEST_F(CpuOps, SiluMul) {
  Rng rng(3);
  for (int64_t T : {1, 17, 200}) {
    const int64_t I = 97;
    HostTensor g = rng.normal_tensor(DType::F32, {T, I}, 4.0), u = rng.normal_tensor(DType::F32, {T, I});
    HostTensor out(DType::F32, {T, I});
    out.poison();
    be->silu_mul(g, u, out);
    std::vector<double> ref(static_cast<size_t>(T * I));
    for (int64_t i = 0; i < T * I; ++i) ref[i] = g.get(i) / (1.0 + std::exp(-g.get(i))) * u.get(i);
    EXPECT_TRUE(all_close(out, ref, 1e-6, "silu_mul"));
  }
}

TEST_F(CpuOps, Add) {
  Rng rng(4);
  for (DType dt : {DType::F32, DType::BF16, DType::F16}) {
    HostTensor a = rng.normal_tensor(dt, {17, 1029}), b = rng.normal_tensor(dt, {17, 1029});
    HostTensor expect(dt, {17, 1029});  // one fp32 add, then rounded to dt once
    for (int64_t i = 0; i < a.numel(); ++i) expect.set(i, static_cast<float>(a.get(i)) + static_cast<float>(b.get(i)));
    be->add(a, b);
    EXPECT_TRUE(all_close(a, expect.to_double(), 0.0, std::string("add ") + dtype_str(dt)));
  }
  HostTensor a(DType::F32, {4, 4}), b(DType::F32, {4, 5}), c(DType::BF16, {4, 4});
  EXPECT_THROW(be->add(a, b), Error);
  EXPECT_THROW(be->add(a, c), Error);
}

TEST_F(CpuOps, Embedding) {
  Rng rng(5);
  const int64_t V = 50, H = 24;
  for (DType table_t : {DType::F32, DType::BF16, DType::F16})
    for (DType out_t : {DType::F32, DType::BF16}) {
      HostTensor table = rng.normal_tensor(table_t, {V, H});
      HostTensor ids = index_tensor({0, 49, 7, 7, 13, 0, 31});
      HostTensor out(out_t, {7, H});
      out.poison();
      be->embedding(table, ids, out);
      HostTensor expect(out_t, {7, H});
      for (int64_t t = 0; t < 7; ++t)
        for (int64_t i = 0; i < H; ++i) expect.set(t * H + i, table.get(ids.get(t) * H + i));
      EXPECT_TRUE(all_close(out, expect.to_double(), 0.0, "embedding"));
    }
  HostTensor table = rng.normal_tensor(DType::F32, {V, H}), out(DType::F32, {2, H});
  EXPECT_THROW(be->embedding(table, index_tensor({1, 50}), out), Error);
  EXPECT_THROW(be->embedding(table, index_tensor({-1, 2}), out), Error);
  EXPECT_THROW(be->embedding(table, index_tensor({1, 2, 3}), out), Error);
  HostTensor out_ok(DType::F32, {2, H});
  be->embedding(table, index_tensor({1, 2}, DType::I64), out_ok);
  EXPECT_EQ(out_ok.get(H + 5), table.get(2 * H + 5));
}

TEST_F(CpuOps, GatherScatterRows) {
  Rng rng(6);
  HostTensor src = rng.normal_tensor(DType::F32, {10, 3, 5});
  HostTensor idx = index_tensor({9, 0, 4, 4, 2});
  HostTensor out(DType::F32, {5, 3, 5});
  out.poison();
  be->gather_rows(src, idx, out);
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t c = 0; c < 15; ++c) ASSERT_EQ(out.get(i * 15 + c), src.get(idx.get(i) * 15 + c));

  HostTensor back = rng.normal_tensor(DType::BF16, {10, 15});
  HostTensor before = back;
  HostTensor rows = rng.normal_tensor(DType::BF16, {3, 15});
  be->scatter_rows(rows, index_tensor({8, 1, 5}), back);
  for (int64_t r = 0; r < 10; ++r) {
    const int64_t from = r == 8 ? 0 : r == 1 ? 1 : r == 5 ? 2 : -1;
    for (int64_t c = 0; c < 15; ++c)
      ASSERT_EQ(back.get(r * 15 + c), from < 0 ? before.get(r * 15 + c) : rows.get(from * 15 + c));
  }
  EXPECT_THROW(be->gather_rows(src, index_tensor({10}), out.t.slice(0, 1)), Error);
  EXPECT_THROW(be->scatter_rows(rows, index_tensor({1, 2, 10}), back), Error);
  EXPECT_THROW(be->gather_rows(src, idx, HostTensor(DType::F32, {5, 16})), Error);
}

TEST_F(CpuOps, Convert) {
  Rng rng(7);
  for (DType from : {DType::F32, DType::BF16, DType::F16})
    for (DType to : {DType::F32, DType::BF16, DType::F16}) {
      HostTensor src = rng.normal_tensor(from, {3, 3001});
      HostTensor dst(to, {3001, 3});
      dst.poison();
      be->convert(src, dst);
      HostTensor expect(to, {3, 3001});  // single rounding from the source value
      for (int64_t i = 0; i < src.numel(); ++i) expect.set(i, src.get(i));
      EXPECT_TRUE(all_close(dst, expect.to_double(), 0.0, std::string(dtype_str(from)) + "->" + dtype_str(to)));
    }
  HostTensor a(DType::F32, {4}), b(DType::F32, {5}), c(DType::I32, {4});
  EXPECT_THROW(be->convert(a, b), Error);
  EXPECT_THROW(be->convert(a, c), Error);
}

TEST_F(CpuOps, FillZero) {
  Rng rng(8);
  HostTensor t = rng.normal_tensor(DType::BF16, {7, 9});
  be->fill_zero(t);
  for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t.get(i), 0.0);
}

void ref_route(const HostTensor& logits, int64_t T, int64_t E, int K, bool renorm, std::vector<int64_t>& ids,
               std::vector<double>& w) {
  ids.assign(static_cast<size_t>(T * K), 0);
  w.assign(static_cast<size_t>(T * K), 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(static_cast<size_t>(E));
    double mx = -1e300, sum = 0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits.get(t * E + e));
    for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(logits.get(t * E + e) - mx);
    for (double& v : p) v /= sum;
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double sel = 0;
    for (int k = 0; k < K; ++k) sel += p[order[k]];
    for (int k = 0; k < K; ++k) {
      ids[t * K + k] = order[k];
      w[t * K + k] = renorm ? p[order[k]] / sel : p[order[k]];
    }
  }
}

TEST_F(CpuOps, MoeRoute) {
  Rng rng(9);
  for (int64_t T : {1, 3, 17, 200})
    for (auto [E, K] : {std::pair<int64_t, int>{8, 2}, {64, 8}, {128, 8}, {5, 5}, {16, 1}})
      for (bool renorm : {false, true}) {
        HostTensor logits = rng.normal_tensor(DType::F32, {T, E}, 3.0);
        HostTensor ids(DType::I32, {T, K}), w(DType::F32, {T, K});
        w.poison();
        be->moe_route(logits, K, renorm, ids, w);
        std::vector<int64_t> rid;
        std::vector<double> rw;
        ref_route(logits, T, E, K, renorm, rid, rw);
        for (int64_t i = 0; i < T * K; ++i) ASSERT_EQ(ids.get(i), rid[i]) << "T=" << T << " E=" << E << " i=" << i;
        EXPECT_TRUE(all_close(w, rw, 1e-6, "moe_route weights"));
      }
}

TEST_F(CpuOps, MoeRouteTiesGoToLowerId) {
  HostTensor logits(DType::F32, {2, 6});
  const double v[12] = {1, 3, 3, 0, 3, 2, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 12; ++i) logits.set(i, v[i]);
  HostTensor ids(DType::I32, {2, 4}), w(DType::F32, {2, 4});
  be->moe_route(logits, 4, true, ids, w);
  const int64_t want[8] = {1, 2, 4, 5, 0, 1, 2, 3};
  for (int i = 0; i < 8; ++i) EXPECT_EQ(ids.get(i), want[i]) << i;
  EXPECT_NEAR(w.get(4), 0.25, 1e-7);
  EXPECT_THROW(be->moe_route(logits, 7, true, HostTensor(DType::I32, {2, 7}), HostTensor(DType::F32, {2, 7})), Error);
  EXPECT_THROW(be->moe_route(logits, 4, true, HostTensor(DType::I64, {2, 4}), w), Error);
}

TEST_F(CpuOps, ShapeAndDtypeErrorsThrow) {
  HostTensor x(DType::F32, {3, 8}), w(DType::F32, {8}), bad_w(DType::F32, {7}), out(DType::F32, {3, 8});
  HostTensor bf(DType::BF16, {3, 8}), out2(DType::F32, {2, 8});
  EXPECT_THROW(be->rms_norm(x, bad_w, 1e-6f, out), Error);
  EXPECT_THROW(be->rms_norm(bf, w, 1e-6f, out), Error);
  EXPECT_THROW(be->rms_norm(x, w, 1e-6f, out2), Error);
  EXPECT_THROW(be->rms_norm(x, w, -1.0f, out), Error);
  EXPECT_THROW(be->rms_norm(Tensor(), w, 1e-6f, out), Error);
  EXPECT_THROW(be->silu_mul(x, out2, out), Error);
  EXPECT_THROW(be->add_rms_norm(out2, x, w, 1e-6f, out), Error);
  try {
    be->rms_norm(x, bad_w, 1e-6f, out);
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rms_norm"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace cpinfer::test
