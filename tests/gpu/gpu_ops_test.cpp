// CUDA vs CPU for the row-wise ops, linear, qk_norm_rope, the router and the experts. Each case
// prints "[gpu_ops] op shape nmse max_err"; without a GPU every test is skipped with the reason.
#include <algorithm>
#include <numeric>
#include <tuple>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/kernels/kernels.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

// bf16 output rounding alone gives nmse ~1e-6; these leave room for fp32 reduction order.
constexpr double kNmse = 2e-5;

using Ops = GpuOpsTest;

TEST_F(Ops, RmsNormAndAddRmsNorm) {
  Rng rng(1);
  for (auto [t, h] : std::vector<std::pair<int64_t, int64_t>>{{1, 2048}, {7, 37}, {64, 128}, {5, 1000}, {3, 4104}}) {
    const std::string sh = shape_of({t, h});
    auto x = rng.bf16_normal(t * h, 3.0f);
    auto r = rng.bf16_normal(t * h, 2.0f);
    auto w = rng.bf16_normal(h, 1.0f);
    const float eps = 1e-6f;
    // rms_norm
    Tensor cx = cpu_f32(x, {t, h}), cw = cpu_f32(w, {h}), co = cpu_alloc(DType::F32, {t, h});
    cpu_->rms_norm(cx, cw, eps, co);
    Tensor gx = gpu_tensor("x", DType::BF16, {t, h}, &x), gw = gpu_tensor("w", DType::BF16, {h}, &w);
    Tensor go = gpu_tensor("out", DType::BF16, {t, h}, nullptr);
    gpu_->rms_norm(gx, gw, eps, go);
    expect_close("rms_norm", sh, gpu_read(go), cpu_read(co), kNmse, 0.1);
    // add_rms_norm: both the updated residual and the normed output. The CUDA residual is BF16,
    // so the reference sees the rounded sum, as the CUDA norm does.
    std::vector<float> rsum(r.size());
    for (size_t i = 0; i < r.size(); ++i) rsum[i] = bf16_to_f32(f32_to_bf16(r[i] + x[i]));
    Tensor cr = cpu_f32(rsum, {t, h}), czero = cpu_f32(std::vector<float>(t * h, 0.0f), {t, h});
    Tensor co2 = cpu_alloc(DType::F32, {t, h});
    cpu_->add_rms_norm(cr, czero, cw, eps, co2);
    Tensor gr = gpu_tensor("residual", DType::BF16, {t, h}, &r);
    Tensor go2 = gpu_tensor("out2", DType::BF16, {t, h}, nullptr);
    gpu_->add_rms_norm(gr, gx, gw, eps, go2);
    expect_close("add_rms_norm.res", sh, gpu_read(gr), rsum, 0.0, 0.0);
    expect_close("add_rms_norm.out", sh, gpu_read(go2), cpu_read(co2), kNmse, 0.1);
  }
}

TEST_F(Ops, RmsNormF32WeightsAndActivations) {
  Rng rng(2);
  const int64_t t = 9, h = 256;
  auto x = rng.bf16_normal(t * h), w = rng.bf16_normal(h);
  Tensor co = cpu_alloc(DType::F32, {t, h});
  cpu_->rms_norm(cpu_f32(x, {t, h}), cpu_f32(w, {h}), 1e-5f, co);
  Tensor gx = gpu_tensor("x", DType::F32, {t, h}, &x), gw = gpu_tensor("w", DType::F32, {h}, &w);
  Tensor go = gpu_tensor("out", DType::F32, {t, h}, nullptr);
  gpu_->rms_norm(gx, gw, 1e-5f, go);
  expect_close("rms_norm.f32", shape_of({t, h}), gpu_read(go), cpu_read(co), 1e-10, 1e-4);
}

TEST_F(Ops, SiluMulAddConvert) {
  Rng rng(3);
  for (int64_t n : {1, 7, 768, 8 * 3 * 1000 + 5}) {
    const std::string sh = shape_of({n});
    auto g = rng.bf16_normal(n, 3.0f), u = rng.bf16_normal(n, 2.0f);
    Tensor co = cpu_alloc(DType::F32, {n});
    cpu_->silu_mul(cpu_f32(g, {n}), cpu_f32(u, {n}), co);
    Tensor gg = gpu_tensor("gate", DType::BF16, {n}, &g), gu = gpu_tensor("up", DType::BF16, {n}, &u);
    Tensor go = gpu_tensor("out", DType::BF16, {n}, nullptr);
    gpu_->silu_mul(gg, gu, go);
    expect_close("silu_mul", sh, gpu_read(go), cpu_read(co), kNmse, 0.25);  // outputs up to ~30: bf16 ulp 0.125

    Tensor ca = cpu_f32(g, {n});
    cpu_->add(ca, cpu_f32(u, {n}));
    gpu_->add(gg, gu);  // gg := gate + up
    expect_close("add", sh, gpu_read(gg), cpu_read(ca), kNmse, 0.25);

    // BF16 -> F32 is exact; F32 -> BF16 rounds to nearest even like core/dtype.h.
    Tensor g32 = gpu_tensor("f32", DType::F32, {n}, nullptr);
    gpu_->convert(gu, g32);
    expect_close("convert.bf16>f32", sh, gpu_read(g32), u, 0.0, 0.0);
    std::vector<float> fine(n), rounded(n);
    for (int64_t i = 0; i < n; ++i) {
      fine[i] = u[i] * 1.0009765625f + 1e-3f;
      rounded[i] = bf16_to_f32(f32_to_bf16(fine[i]));
    }
    Tensor gf = gpu_tensor("fine", DType::F32, {n}, &fine), gb = gpu_tensor("bf16", DType::BF16, {n}, nullptr);
    gpu_->convert(gf, gb);
    expect_close("convert.f32>bf16", sh, gpu_read(gb), rounded, 0.0, 0.0);
  }
}

TEST_F(Ops, EmbeddingGatherScatter) {
  Rng rng(4);
  for (auto [v, h, t] :
       std::vector<std::tuple<int64_t, int64_t, int64_t>>{{100, 64, 17}, {33, 37, 5}, {1000, 2048, 3}}) {
    const std::string sh = shape_of({v, h}) + " T=" + std::to_string(t);
    auto table = rng.bf16_normal(v * h);
    std::vector<int32_t> ids(t);
    for (auto& i : ids) i = rng.integer(0, static_cast<int>(v) - 1);
    Tensor co = cpu_alloc(DType::F32, {t, h});
    cpu_->embedding(cpu_f32(table, {v, h}), cpu_i32(ids, {t}), co);
    Tensor gt = gpu_tensor("table", DType::BF16, {v, h}, &table);
    Tensor go = gpu_tensor("out", DType::BF16, {t, h}, nullptr);
    gpu_->embedding(gt, gpu_i32("ids", ids, {t}), go);
    expect_close("embedding", sh, gpu_read(go), cpu_read(co), 0.0, 0.0);

    Tensor gg = gpu_tensor("gathered", DType::BF16, {t, h}, nullptr);
    gpu_->gather_rows(gt, gpu_i32("idx", ids, {t}), gg);
    expect_close("gather_rows", sh, gpu_read(gg), cpu_read(co), 0.0, 0.0);

    // scatter a permutation of t rows into a v-row table (other rows untouched).
    std::vector<int32_t> perm(v);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng.gen());
    perm.resize(t);
    auto src = rng.bf16_normal(t * h);
    std::vector<float> want = table;
    for (int64_t i = 0; i < t; ++i) std::copy_n(src.begin() + i * h, h, want.begin() + perm[i] * h);
    Tensor gs = gpu_tensor("src", DType::BF16, {t, h}, &src);
    Tensor gdst = gpu_tensor("dst", DType::BF16, {v, h}, &table);
    gpu_->scatter_rows(gs, gpu_i32("perm", perm, {t}), gdst);
    expect_close("scatter_rows", sh, gpu_read(gdst), want, 0.0, 0.0);
  }
}

TEST_F(Ops, Linear) {
  Rng rng(5);
  struct Case {
    int64_t m, k, n;
    DType out;
  };
  // Up to kSkinnyMaxRows rows (aligned, K % 8 == 0) run on the own streaming kernel, the rest on
  // cuBLAS; both settings of set_skinny_gemm must match the CPU.
  auto* cuda_be = dynamic_cast<cuda::CudaBackend*>(gpu_.get());
  ASSERT_NE(cuda_be, nullptr);
  for (const Case& c : std::vector<Case>{{1, 64, 32, DType::BF16},
                                         {17, 2048, 512, DType::BF16},
                                         {128, 768, 2048, DType::BF16},
                                         {33, 100, 70, DType::BF16},
                                         {5, 2048, 1000, DType::F32},
                                         {1, 2048, 4096, DType::BF16},
                                         {2, 4096, 2048, DType::BF16},
                                         {3, 768, 2048, DType::F32},
                                         {4, 104, 1, DType::BF16},
                                         {6, 2048, 151, DType::F32},
                                         {8, 2048, 513, DType::BF16},
                                         {7, 100, 70, DType::BF16},
                                         {9, 2048, 512, DType::BF16},
                                         {1, 4104, 70, DType::BF16},  // K > 4096: two passes
                                         {2, 2056, 33, DType::F32},
                                         {1, 16, 5, DType::BF16}}) {
    const std::string sh = "M=" + std::to_string(c.m) + " K=" + std::to_string(c.k) + " N=" + std::to_string(c.n) +
                           (c.out == DType::F32 ? " out=f32" : "");
    auto a = rng.bf16_normal(c.m * c.k), w = rng.bf16_normal(c.n * c.k, 0.05f);
    Tensor co = cpu_alloc(DType::F32, {c.m, c.n});
    cpu_->linear(cpu_f32(a, {c.m, c.k}), cpu_f32(w, {c.n, c.k}), co);
    Tensor ga = gpu_tensor("a", DType::BF16, {c.m, c.k}, &a), gw = gpu_tensor("w", DType::BF16, {c.n, c.k}, &w);
    for (bool skinny : {true, false}) {
      cuda_be->set_skinny_gemm(skinny);
      Tensor go = gpu_tensor("out", c.out, {c.m, c.n}, nullptr);
      gpu_->linear(ga, gw, go);
      const bool own = skinny && cuda::skinny_gemm_supported(cuda::dev(ga), cuda::dev(gw), cuda::dev(go));
      expect_close(own ? "linear.skinny" : "linear.cublas", sh, gpu_read(go), cpu_read(co),
                   c.out == DType::F32 ? 1e-9 : kNmse, 0.1);
    }
    cuda_be->set_skinny_gemm(true);
  }
  // linears: several products of one input in one skinny launch (q, k, v), each against the CPU;
  // mixed output dtypes and too many rows take linear() one by one.
  for (const auto& [m, k, outs, dt] :
       std::vector<std::tuple<int64_t, int64_t, std::vector<int64_t>, DType>>{{1, 2048, {4096, 512, 512}, DType::BF16},
                                                                              {2, 2048, {1000, 70, 3}, DType::F32},
                                                                              {1, 776, {33, 1}, DType::BF16},
                                                                              {2, 4104, {130, 7, 64}, DType::BF16},
                                                                              {5, 256, {40, 24}, DType::BF16}}) {
    auto a = rng.bf16_normal(m * k);
    Tensor ga = gpu_tensor("a", DType::BF16, {m, k}, &a);
    std::vector<Weight> ws;
    std::vector<Tensor> gos, cos;
    std::vector<Backend::LinearOut> lo;
    for (int64_t n : outs) {
      auto w = rng.bf16_normal(n * k, 0.05f);
      ws.emplace_back(gpu_tensor("w", DType::BF16, {n, k}, &w));
      gos.push_back(gpu_tensor("out", dt, {m, n}, nullptr));
      cos.push_back(cpu_alloc(DType::F32, {m, n}));
      cpu_->linear(cpu_f32(a, {m, k}), cpu_f32(w, {n, k}), cos.back());
    }
    for (size_t i = 0; i < outs.size(); ++i) lo.push_back({&ws[i], gos[i]});
    gpu_->linears(ga, lo);
    for (size_t i = 0; i < outs.size(); ++i)
      expect_close("linears", "M=" + std::to_string(m) + " K=" + std::to_string(k) + " N=" + std::to_string(outs[i]),
                   gpu_read(gos[i]), cpu_read(cos[i]), dt == DType::F32 ? 1e-9 : kNmse, 0.1);
  }
  // F32 weights take the converted fp32 path.
  const int64_t m = 9, k = 96, n = 40;
  auto a = rng.bf16_normal(m * k), w = rng.bf16_normal(n * k, 0.1f);
  Tensor co = cpu_alloc(DType::F32, {m, n});
  cpu_->linear(cpu_f32(a, {m, k}), cpu_f32(w, {n, k}), co);
  Tensor go = gpu_tensor("out", DType::BF16, {m, n}, nullptr);
  gpu_->linear(gpu_tensor("a", DType::BF16, {m, k}, &a), gpu_tensor("w32", DType::F32, {n, k}, &w), go);
  expect_close("linear.w_f32", "M=9 K=96 N=40", gpu_read(go), cpu_read(co), kNmse, 0.05);
}

TEST_F(Ops, QkNormRope) {
  Rng rng(6);
  struct Case {
    int64_t t, hq, hkv, d;
    float theta, factor;
  };
  // Up to 15 tokens: a warp per (token, head); 16 and more with D % 4 == 0 and D <= 256: a CTA per
  // token, BF16 with D a power of two from 16 on in 16-byte lanes (D 16, 32, 64, 128, 256: 16, 8,
  // 4, 2 or 1 heads per warp; groups of q and k heads together, groups short of heads), else in
  // pairs (D 96; D 36 is not a multiple of 4 and stays per head).
  for (const Case& c : std::vector<Case>{{13, 4, 2, 128, 1e6f, 1.0f},
                                         {20, 3, 1, 16, 1e4f, 1.0f},
                                         {32, 5, 3, 32, 1e4f, 1.1386f},
                                         {17, 6, 2, 64, 1e4f, 1.0f},
                                         {5, 32, 4, 128, 1e6f, 1.1386f},
                                         {9, 3, 1, 64, 1e4f, 1.0f},
                                         {4, 2, 2, 16, 1e4f, 1.0f},
                                         {300, 32, 4, 128, 1e6f, 1.0f},
                                         {16, 3, 1, 96, 1e4f, 1.1386f},
                                         {40, 4, 4, 256, 1e6f, 1.0f},
                                         {24, 64, 4, 128, 1e6f, 1.0f},  // 68 heads: more than eight a warp
                                         {20, 2, 1, 36, 1e4f, 1.0f}}) {
    const std::string sh = shape_of({c.t, c.hq, c.d}) + " Hkv=" + std::to_string(c.hkv);
    auto q = rng.bf16_normal(c.t * c.hq * c.d, 2.0f), k = rng.bf16_normal(c.t * c.hkv * c.d, 2.0f);
    auto qw = rng.bf16_normal(c.d, 1.0f), kw = rng.bf16_normal(c.d, 1.0f);
    std::vector<int32_t> pos(c.t);
    for (auto& p : pos) p = rng.integer(0, 40000);
    pos[0] = 0;
    RopeParams rope;
    for (int64_t i = 0; i < c.d / 2; ++i)
      rope.inv_freq.push_back(1.0f / std::pow(c.theta, static_cast<float>(2 * i) / static_cast<float>(c.d)));
    rope.attention_factor = c.factor;
    Tensor cq = cpu_f32(q, {c.t, c.hq, c.d}), ck = cpu_f32(k, {c.t, c.hkv, c.d});
    cpu_->qk_norm_rope(cq, ck, cpu_f32(qw, {c.d}), cpu_f32(kw, {c.d}), 1e-6f, cpu_i32(pos, {c.t}), rope);
    Tensor gq = gpu_tensor("q", DType::BF16, {c.t, c.hq, c.d}, &q),
           gk = gpu_tensor("k", DType::BF16, {c.t, c.hkv, c.d}, &k);
    gpu_->qk_norm_rope(gq, gk, gpu_tensor("qw", DType::BF16, {c.d}, &qw), gpu_tensor("kw", DType::BF16, {c.d}, &kw),
                       1e-6f, gpu_i32("pos", pos, {c.t}), rope);
    expect_close("qk_norm_rope.q", sh, gpu_read(gq), cpu_read(cq), kNmse, 0.1);
    expect_close("qk_norm_rope.k", sh, gpu_read(gk), cpu_read(ck), kNmse, 0.1);
    // RoPE alone (undefined norm weights: Llama).
    Tensor rq = cpu_f32(q, {c.t, c.hq, c.d}), rk = cpu_f32(k, {c.t, c.hkv, c.d});
    cpu_->qk_norm_rope(rq, rk, Tensor{}, Tensor{}, 1e-6f, cpu_i32(pos, {c.t}), rope);
    Tensor hq = gpu_tensor("q2", DType::BF16, {c.t, c.hq, c.d}, &q),
           hk = gpu_tensor("k2", DType::BF16, {c.t, c.hkv, c.d}, &k);
    gpu_->qk_norm_rope(hq, hk, Tensor{}, Tensor{}, 1e-6f, gpu_i32("pos2", pos, {c.t}), rope);
    expect_close("rope.q", sh, gpu_read(hq), cpu_read(rq), kNmse, 0.1);
    expect_close("rope.k", sh, gpu_read(hk), cpu_read(rk), kNmse, 0.1);
    // qk_norm_rope_store (one kernel on CUDA) equals qk_norm_rope then kv_store bit for bit: q, k and
    // the whole cache (scattered slots, a padding row with slot -1, untouched slots stay as they were).
    const int64_t nb = std::max<int64_t>(3, c.t / 16 + 2), bs = 16;
    std::vector<int32_t> slots(nb * bs);
    std::iota(slots.begin(), slots.end(), 0);
    std::shuffle(slots.begin(), slots.end(), rng.gen());
    slots.resize(c.t);
    slots[c.t / 2] = -1;
    auto v = rng.bf16_normal(c.t * c.hkv * c.d), fill = rng.bf16_normal(nb * bs * c.hkv * c.d);
    Tensor gv = gpu_tensor("v", DType::BF16, {c.t, c.hkv, c.d}, &v), gs = gpu_i32("slots", slots, {c.t});
    Tensor gpos = gpu_i32("pos3", pos, {c.t}), gqw = gpu_tensor("qw3", DType::BF16, {c.d}, &qw),
           gkw = gpu_tensor("kw3", DType::BF16, {c.d}, &kw);
    std::vector<std::vector<float>> got[2];
    for (int fused = 0; fused < 2; ++fused) {
      Tensor fq = gpu_tensor("q3", DType::BF16, {c.t, c.hq, c.d}, &q),
             fk = gpu_tensor("k3", DType::BF16, {c.t, c.hkv, c.d}, &k);
      KvLayer fc{gpu_tensor("ck", DType::BF16, {nb, bs, c.hkv, c.d}, &fill),
                 gpu_tensor("cv", DType::BF16, {nb, bs, c.hkv, c.d}, &fill)};
      if (fused) {
        gpu_->qk_norm_rope_store(fq, fk, gv, gqw, gkw, 1e-6f, gpos, rope, gs, fc);
      } else {
        gpu_->qk_norm_rope(fq, fk, gqw, gkw, 1e-6f, gpos, rope);
        gpu_->kv_store(fk, gv, gs, fc);
      }
      got[fused] = {gpu_read(fq), gpu_read(fk), gpu_read(fc.k), gpu_read(fc.v)};
    }
    const char* what[] = {"q", "k", "cache.k", "cache.v"};
    for (int i = 0; i < 4; ++i) EXPECT_EQ(got[1][i], got[0][i]) << "qk_norm_rope_store " << what[i] << " " << sh;
  }
  // F32 activations, per token (24 tokens) and per head (3).
  for (int64_t t : {24, 3}) {
    const int64_t hq = 4, hkv = 2, d = 128;
    const std::string sh = "F32 " + shape_of({t, hq, d});
    auto q = rng.bf16_normal(t * hq * d, 2.0f), k = rng.bf16_normal(t * hkv * d, 2.0f);
    auto qw = rng.bf16_normal(d, 1.0f), kw = rng.bf16_normal(d, 1.0f);
    std::vector<int32_t> pos(t);
    for (auto& p : pos) p = rng.integer(0, 40000);
    RopeParams rope;
    for (int64_t i = 0; i < d / 2; ++i)
      rope.inv_freq.push_back(1.0f / std::pow(1e6f, static_cast<float>(2 * i) / static_cast<float>(d)));
    Tensor cq = cpu_f32(q, {t, hq, d}), ck = cpu_f32(k, {t, hkv, d});
    cpu_->qk_norm_rope(cq, ck, cpu_f32(qw, {d}), cpu_f32(kw, {d}), 1e-6f, cpu_i32(pos, {t}), rope);
    Tensor gq = gpu_tensor("q", DType::F32, {t, hq, d}, &q), gk = gpu_tensor("k", DType::F32, {t, hkv, d}, &k);
    gpu_->qk_norm_rope(gq, gk, gpu_tensor("qw", DType::BF16, {d}, &qw), gpu_tensor("kw", DType::BF16, {d}, &kw), 1e-6f,
                       gpu_i32("pos", pos, {t}), rope);
    expect_close("qk_norm_rope.q", sh, gpu_read(gq), cpu_read(cq), 1e-9, 1e-3);
    expect_close("qk_norm_rope.k", sh, gpu_read(gk), cpu_read(ck), 1e-9, 1e-3);
  }
}

TEST_F(Ops, MoeRoute) {
  Rng rng(7);
  struct Case {
    int64_t t, e;
    int k;
    bool renorm;
  };
  for (const Case& c : std::vector<Case>{
           {50, 128, 8, true}, {33, 128, 8, false}, {7, 60, 4, true}, {3, 512, 10, true}, {2, 8, 8, false}}) {
    const std::string sh = "T=" + std::to_string(c.t) + " E=" + std::to_string(c.e) + " K=" + std::to_string(c.k) +
                           (c.renorm ? " renorm" : "");
    auto logits = rng.bf16_normal(c.t * c.e, 2.0f);
    Tensor cid = cpu_alloc(DType::I32, {c.t, c.k}), cw = cpu_alloc(DType::F32, {c.t, c.k});
    cpu_->moe_route(cpu_f32(logits, {c.t, c.e}), c.k, c.renorm, cid, cw);
    Tensor gid = gpu_tensor("ids", DType::I32, {c.t, c.k}, nullptr),
           gw = gpu_tensor("w", DType::F32, {c.t, c.k}, nullptr);
    gpu_->moe_route(gpu_tensor("logits", DType::BF16, {c.t, c.e}, &logits), c.k, c.renorm, gid, gw);
    const std::vector<int32_t> got_ids = gpu_read_i32(gid);
    const int32_t* want_ids = cid.ptr<const int32_t>();
    int64_t mismatched = 0;
    for (size_t i = 0; i < got_ids.size(); ++i) mismatched += got_ids[i] != want_ids[i];
    std::printf("[gpu_ops] %-16s %-34s id_mismatch=%lld\n", "moe_route.ids", sh.c_str(),
                static_cast<long long>(mismatched));
    EXPECT_EQ(mismatched, 0) << "moe_route ids differ from the CPU reference for " << sh;
    expect_close("moe_route.w", sh, gpu_read(gw), cpu_read(cw), 1e-10, 1e-5);
  }
}

// The router of a decode step as one kernel (Backend::moe_gate on CUDA: the router's product and
// the route, routed by the block that finishes last): its logits, ids and weights must be those of
// the two ops it replaces (the same weight passes, then moe_route) bit for bit, on back-to-back
// calls (the ticket counter returns to 0) and in a captured graph; the logits against the CPU.
// Three rows take the two ops.
TEST_F(Ops, MoeGateOfADecodeStep) {
  Rng rng(8);
  struct Case {
    int64_t t, e, h;
    int k;
    bool renorm;
  };
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  for (const Case& c : std::vector<Case>{{1, 128, 2048, 8, true},
                                         {2, 128, 2048, 8, false},
                                         {1, 60, 136, 4, true},
                                         {2, 200, 4096, 8, true},
                                         {1, 512, 264, 10, true},
                                         {3, 128, 2048, 8, true}}) {
    const std::string sh = "T=" + std::to_string(c.t) + " E=" + std::to_string(c.e) + " H=" + std::to_string(c.h) +
                           " K=" + std::to_string(c.k);
    const auto x = rng.bf16_normal(c.t * c.h, 1.0f);
    const auto w = rng.bf16_normal(c.e * c.h, 0.05f);
    Tensor gx = gpu_tensor("x", DType::BF16, {c.t, c.h}, &x), gr = gpu_tensor("router", DType::BF16, {c.e, c.h}, &w);
    struct Out {
      Tensor logits, ids, w;
    };
    auto out = [&] {
      return Out{gpu_tensor("logits", DType::F32, {c.t, c.e}, nullptr),
                 gpu_tensor("ids", DType::I32, {c.t, c.k}, nullptr), gpu_tensor("w", DType::F32, {c.t, c.k}, nullptr)};
    };
    auto same = [&](const Out& a, const Out& b, const std::string& what) {
      EXPECT_EQ(gpu_read(a.logits), gpu_read(b.logits)) << what << " logits " << sh;
      EXPECT_EQ(gpu_read_i32(a.ids), gpu_read_i32(b.ids)) << what << " ids " << sh;
      EXPECT_EQ(gpu_read(a.w), gpu_read(b.w)) << what << " weights " << sh;
    };
    const Out two = out();
    gpu_->linear(gx, gr, two.logits);
    gpu_->moe_route(two.logits, c.k, c.renorm, two.ids, two.w);
    for (int rep = 0; rep < 3; ++rep) {
      const Out one = out();
      gpu_->moe_gate(gx, gr, c.k, c.renorm, one.logits, one.ids, one.w);
      same(one, two, "call " + std::to_string(rep));
    }
    const Out graphed = out();
    const CaptureRun run = capture_and_launch(
        cuda.stream(), [&] { gpu_->moe_gate(gx, gr, c.k, c.renorm, graphed.logits, graphed.ids, graphed.w); });
    EXPECT_TRUE(run.error.empty()) << sh << ": " << run.error;
    if (run.error.empty()) same(graphed, two, "graph");
    Tensor cl = cpu_alloc(DType::F32, {c.t, c.e});
    cpu_->linear(cpu_f32(x, {c.t, c.h}), cpu_f32(w, {c.e, c.h}), cl);
    expect_close("moe_gate.logits", sh, gpu_read(two.logits), cpu_read(cl), 1e-10, 1e-4);
  }
}

// The decode router with the residual add + RMSNorm before it in its kernel
// (Backend::add_rms_norm_moe_gate): the residual, the normed rows, the logits, ids and weights bit for
// bit those of add_rms_norm + moe_gate, back to back and in a captured graph, for norm weights in BF16
// and F32, H whose rows the norm's reduction splits unevenly over the kernel's 128 threads (17, 33
// and 512 chunks of 8); three rows take the two ops.
TEST_F(Ops, AddRmsNormMoeGateEqualsTheTwoOps) {
  Rng rng(9);
  struct Case {
    int64_t t, e, h;
    int k;
    DType norm_w;
  };
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  for (const Case& c : std::vector<Case>{{1, 128, 2048, 8, DType::BF16},
                                         {2, 128, 2048, 8, DType::F32},
                                         {1, 60, 136, 4, DType::F32},
                                         {2, 200, 4096, 8, DType::BF16},
                                         {1, 512, 264, 10, DType::BF16},
                                         {3, 128, 2048, 8, DType::BF16}}) {
    const std::string sh = "T=" + std::to_string(c.t) + " E=" + std::to_string(c.e) + " H=" + std::to_string(c.h) +
                           " K=" + std::to_string(c.k) + (c.norm_w == DType::F32 ? " normF32" : " normBF16");
    const auto x = rng.bf16_normal(c.t * c.h, 1.0f), res0 = rng.bf16_normal(c.t * c.h, 3.0f);
    auto nw = rng.bf16_normal(c.h, 0.2f);
    for (float& v : nw) v += 1.0f;
    const auto w = rng.bf16_normal(c.e * c.h, 0.05f);
    Tensor gx = gpu_tensor("x", DType::BF16, {c.t, c.h}, &x), gr = gpu_tensor("router", DType::BF16, {c.e, c.h}, &w);
    Tensor gnw = gpu_tensor("norm_w", c.norm_w, {c.h}, &nw);
    struct Out {
      Tensor residual, h, logits, ids, w;
    };
    auto out = [&] {
      return Out{gpu_tensor("residual", DType::BF16, {c.t, c.h}, &res0),
                 gpu_tensor("h", DType::BF16, {c.t, c.h}, nullptr),
                 gpu_tensor("logits", DType::F32, {c.t, c.e}, nullptr),
                 gpu_tensor("ids", DType::I32, {c.t, c.k}, nullptr), gpu_tensor("w", DType::F32, {c.t, c.k}, nullptr)};
    };
    auto same = [&](const Out& a, const Out& b, const std::string& what) {
      EXPECT_EQ(gpu_read(a.residual), gpu_read(b.residual)) << what << " residual " << sh;
      EXPECT_EQ(gpu_read(a.h), gpu_read(b.h)) << what << " h " << sh;
      EXPECT_EQ(gpu_read(a.logits), gpu_read(b.logits)) << what << " logits " << sh;
      EXPECT_EQ(gpu_read_i32(a.ids), gpu_read_i32(b.ids)) << what << " ids " << sh;
      EXPECT_EQ(gpu_read(a.w), gpu_read(b.w)) << what << " weights " << sh;
    };
    auto fused = [&](const Out& o) {
      gpu_->add_rms_norm_moe_gate(o.residual, gx, gnw, 1e-6f, o.h, gr, c.k, true, o.logits, o.ids, o.w);
    };
    const Out two = out();
    gpu_->add_rms_norm(two.residual, gx, gnw, 1e-6f, two.h);
    gpu_->moe_gate(two.h, gr, c.k, true, two.logits, two.ids, two.w);
    EXPECT_GT(compare_values(gpu_read(two.residual), res0).nmse, 1e-3) << sh << ": the add changed nothing";
    for (int rep = 0; rep < 3; ++rep) {
      const Out one = out();
      fused(one);
      same(one, two, "call " + std::to_string(rep));
    }
    const Out graphed = out();
    const CaptureRun run = capture_and_launch(cuda.stream(), [&] { fused(graphed); });
    EXPECT_TRUE(run.error.empty()) << sh << ": " << run.error;
    if (run.error.empty()) same(graphed, two, "graph");
  }
}

// T·K <= 256 takes the row-wise small-batch kernels, larger batches the grouped tensor-core GEMMs
// (shapes they do not cover: a row-wise fallback); none of them synchronizes with the host.
TEST_F(Ops, MoeExperts) {
  Rng rng(8);
  struct Case {
    int64_t t, h, inter;
    int e, k, first, count;
    DType out;
  };
  for (const Case& c : std::vector<Case>{{37, 64, 32, 8, 2, 2, 4, DType::BF16},
                                         {64, 256, 128, 16, 4, 0, 16, DType::BF16},
                                         {5, 128, 96, 32, 8, 8, 8, DType::F32},
                                         {1, 64, 64, 4, 2, 0, 4, DType::BF16},
                                         // T·K > 256: the grouped GEMM path instead of the small-batch kernels
                                         {100, 128, 64, 8, 4, 0, 8, DType::BF16},
                                         {80, 64, 48, 16, 4, 4, 8, DType::F32}}) {
    const std::string sh = "T=" + std::to_string(c.t) + " H=" + std::to_string(c.h) + " I=" + std::to_string(c.inter) +
                           " E=" + std::to_string(c.e) + " K=" + std::to_string(c.k) +
                           " local=" + std::to_string(c.first) + "+" + std::to_string(c.count);
    auto x = rng.bf16_normal(c.t * c.h), out0 = rng.bf16_normal(c.t * c.h, 0.5f);
    // Distinct experts per token, random weights.
    std::vector<int32_t> ids(c.t * c.k);
    std::vector<float> w(c.t * c.k);
    for (int64_t t = 0; t < c.t; ++t) {
      std::vector<int32_t> all(c.e);
      std::iota(all.begin(), all.end(), 0);
      std::shuffle(all.begin(), all.end(), rng.gen());
      for (int k = 0; k < c.k; ++k) {
        ids[t * c.k + k] = all[k];
        w[t * c.k + k] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng.gen());
      }
    }
    ExpertShard cs, gs;
    cs.n_experts = gs.n_experts = c.e;
    cs.first = gs.first = c.first;
    cs.count = gs.count = c.count;
    for (int e = 0; e < c.count; ++e) {
      auto g = rng.bf16_normal(c.inter * c.h, 0.1f), u = rng.bf16_normal(c.inter * c.h, 0.1f);
      auto d = rng.bf16_normal(c.h * c.inter, 0.1f);
      cs.gate.push_back(cpu_f32(g, {c.inter, c.h}));
      cs.up.push_back(cpu_f32(u, {c.inter, c.h}));
      cs.down.push_back(cpu_f32(d, {c.h, c.inter}));
      gs.gate.push_back(gpu_tensor("gate", DType::BF16, {c.inter, c.h}, &g));
      gs.up.push_back(gpu_tensor("up", DType::BF16, {c.inter, c.h}, &u));
      gs.down.push_back(gpu_tensor("down", DType::BF16, {c.h, c.inter}, &d));
    }
    Tensor co = cpu_f32(out0, {c.t, c.h});
    cpu_->moe_experts(cpu_f32(x, {c.t, c.h}), cpu_i32(ids, {c.t, c.k}), cpu_f32(w, {c.t, c.k}), cs, co);
    Tensor go = gpu_tensor("out", c.out, {c.t, c.h}, &out0);
    gpu_->moe_experts(gpu_tensor("x", DType::BF16, {c.t, c.h}, &x), gpu_i32("ids", ids, {c.t, c.k}),
                      gpu_tensor("w", DType::F32, {c.t, c.k}, &w), gs, go);
    // The CUDA path rounds gate/up/act to bf16 between the GEMMs (as the model runs).
    expect_close("moe_experts", sh, gpu_read(go), cpu_read(co), 2e-4, 0.1);
  }
}

// fill_zero: the kernel path (up to 1 MiB, 16-byte aligned start), a tail of 1..15 bytes, and the
// memset paths (larger, or a start off 16-byte alignment); bytes around the range stay as they were.
TEST_F(Ops, FillZero) {
  Rng rng(21);
  for (const auto& [offset, n] : std::vector<std::pair<int64_t, int64_t>>{
           {0, 1}, {0, 7}, {0, 8}, {0, 9}, {0, 4096}, {8, 100}, {1, 13}, {0, 262144}, {0, 262151}, {3, 300000}}) {
    const int64_t total = offset + n + 16;  // F32 elements
    auto v = rng.bf16_normal(total);
    for (float& x : v) x += 10.0f;  // nonzero
    Tensor buf = gpu_tensor("buf", DType::F32, {total}, &v);
    gpu_->fill_zero(buf.slice(offset, n));
    const std::vector<float> got = gpu_read(buf);
    int64_t wrong = 0;
    for (int64_t i = 0; i < total; ++i) wrong += (i >= offset && i < offset + n) ? got[i] != 0.0f : got[i] != v[i];
    EXPECT_EQ(wrong, 0) << "offset " << offset << " n " << n;
  }
}

TEST_F(Ops, RejectsBadArguments) {
  Tensor gx = gpu_tensor("x", DType::BF16, {4, 8}, nullptr);
  Tensor gw = gpu_tensor("w", DType::BF16, {7}, nullptr);
  EXPECT_THROW(gpu_->rms_norm(gx, gw, 1e-6f, gx), Error);  // weight length mismatch
  Tensor host(nullptr, DType::BF16, {4, 8}, Device::CPU);
  EXPECT_THROW(gpu_->add(gx, host), Error);  // host tensor handed to the GPU
  Tensor f16w = gpu_tensor("w16", DType::F16, {8, 8}, nullptr);
  Tensor out = gpu_tensor("out", DType::BF16, {4, 8}, nullptr);
  EXPECT_THROW(gpu_->linear(gx, f16w, out), Error);  // unsupported weight dtype names itself
  // linears: a product that would take the one skinny launch but whose output has the wrong width
  // is refused before anything runs.
  Tensor a1 = gpu_tensor("a1", DType::BF16, {1, 64}, nullptr);
  Tensor wq = gpu_tensor("wq", DType::BF16, {32, 64}, nullptr), wk = gpu_tensor("wk", DType::BF16, {16, 64}, nullptr);
  Tensor oq = gpu_tensor("oq", DType::BF16, {1, 32}, nullptr), ok = gpu_tensor("ok", DType::BF16, {1, 8}, nullptr);
  const Weight wqw(wq), wkw(wk);
  const Backend::LinearOut outs[] = {{&wqw, oq}, {&wkw, ok}};
  EXPECT_THROW(gpu_->linears(a1, outs), Error);
}

}  // namespace
}  // namespace cpinfer::gputest
