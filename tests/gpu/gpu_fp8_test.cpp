// CUDA linear() with FP8 weights (cuda_fp8.cpp) vs the CPU back-end's FP8 linear (exact
// dequantize-then-fp32), on every path the back-end picks (CudaBackend::fp8_linear_path):
//   Skinny (<= 2 rows: the codes streamed, activations unquantized): tight against the CPU;
//   SkinnyQuantized (<= 8 rows on Hopper, K % 128 == 0: activations quantized as BlockScaled's, the
//     products on the tensor cores): as BlockScaled below;
//   BlockScaled (activations quantized per (row, 128 columns), cuBLASLt block-scaled FP8 GEMM over
//     the rows padded to a multiple of 4): tight against the CPU run on activations quantized by the
//     same rule (fp8_test_util.h), and within the activation quantization's error of the
//     unquantized CPU result; on Hopper it must take every row count (1, 2, 3, 5, 17, 301, 4099:
//     the padding) of a model-like shape;
//   Dequantize (shapes cuBLASLt does not take: K % 128 != 0, N % 16 != 0; weights rounded to BF16):
//     tight against the CPU.
// Rows 1 to 4100; N and K multiples of 128 and not; BF16 and F32 outputs; the skinny kernel
// switched off for the small row counts so the other paths see them too; outputs inside guard
// bytes (the padded rows' products must not land past out); linears (q, k, v in one launch). Then:
// the cuBLASLt scale-layout probe runs lazily (not for BF16 work, not for FP8 products that do not
// need it; at begin_capture() once FP8 weights were used, so a capture can take the block-scaled
// path; a capture that would need it first fails with a clear error). Each case prints "[gpu_ops]
// linear.fp8.<path> shape nmse max_err". Without a GPU every test is skipped.
#include <cstring>
#include <limits>
#include <random>

#include "backends/cuda/cuda_backend.h"
#include "fp8_test_util.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

class Fp8Ops : public GpuOpsTest {
 protected:
  // An FP8 weight [n, k] of a trained layer's magnitude, quantized by the published rule, on both
  // back-ends (the GPU codes inside guard bytes, the scales F32).
  struct Fp8Weight {
    Weight cpu, gpu;
  };
  Fp8Weight fp8_weight(Rng& rng, int64_t n, int64_t k) {
    const std::vector<float> w = rng.bf16_normal(n * k, 1.0f / std::sqrt(static_cast<float>(k)));
    const Fp8Matrix q = quantize_weight(w, n, k);
    const int64_t sn = (n + 127) / 128, sk = (k + 127) / 128;
    Tensor c_codes = cpu_alloc(DType::F8E4M3, {n, k});
    std::memcpy(c_codes.data, q.codes.data(), q.codes.size());
    Fp8Weight out{Weight(c_codes), Weight(gpu_tensor("codes", DType::F8E4M3, {n, k}, nullptr))};
    out.cpu.scale = cpu_f32(q.scales, {sn, sk});
    gpu_->upload(out.gpu.data, q.codes.data(), q.codes.size());
    out.gpu.scale = gpu_tensor("scale", DType::F32, {sn, sk}, &q.scales);
    return out;
  }
  // An all-zero activation block and a NaN activation through linear() at m rows (below).
  void zero_blocks_and_nan(int64_t m);
};

const char* path_name(cuda::CudaBackend::Fp8Path p) {
  switch (p) {
    case cuda::CudaBackend::Fp8Path::Skinny:
      return "skinny";
    case cuda::CudaBackend::Fp8Path::BlockScaled:
      return "blockscaled";
    case cuda::CudaBackend::Fp8Path::Dequantize:
      return "dequantize";
    case cuda::CudaBackend::Fp8Path::SkinnyQuantized:
      return "skinny_quantized";
  }
  return "?";
}

TEST_F(Fp8Ops, LinearMatchesTheCpuOnEveryPath) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  Rng rng(41);
  struct Case {
    int64_t m, k, n;
    DType out;
  };
  int seen[4] = {0, 0, 0, 0};
  for (const Case& c : std::vector<Case>{{1, 2048, 4096, DType::BF16},  // q_proj at decode
                                         {2, 4096, 2048, DType::BF16},  // o_proj, two rows
                                         {1, 768, 2048, DType::F32},    // K/128 = 6 (padded scale rows)
                                         {3, 2048, 512, DType::BF16},   // k_proj, three rows
                                         {17, 2048, 4096, DType::BF16},
                                         {17, 768, 2048, DType::F32},
                                         {5, 2048, 512, DType::BF16},  // M % 4 = 1, 2, 3: padded rows
                                         {3, 768, 2048, DType::F32},
                                         {301, 2048, 512, DType::BF16},
                                         {4099, 768, 2048, DType::BF16},
                                         {300, 4096, 2048, DType::BF16},
                                         {300, 2048, 6144, DType::BF16},  // dense MLP gate
                                         {300, 6144, 2048, DType::F32},   // dense MLP down
                                         {4100, 2048, 512, DType::BF16},
                                         {33, 256, 200, DType::BF16},  // N % 16 != 0
                                         {2, 320, 64, DType::BF16},    // K % 128 != 0 (K % 16 == 0)
                                         {40, 320, 96, DType::F32},
                                         {5, 72, 40, DType::BF16},  // K % 16 != 0 either
                                         {1, 136, 130, DType::BF16},
                                         // Skinny weight passes (2048 codes at K <= 2048, else 4096): N
                                         // off the 4 (2) rows per warp, several passes with a short
                                         // last one and a partial last block, a one-chunk row, the
                                         // largest K (a's rows need the > 48 KB shared-memory opt-in).
                                         {1, 2048, 130, DType::BF16},
                                         {2, 1024, 1, DType::F32},
                                         {1, 4112, 70, DType::BF16},
                                         {2, 8336, 33, DType::F32},
                                         {1, 16, 5, DType::BF16},
                                         {2, 16384, 64, DType::BF16},
                                         // Decode at 8 rows (one group of the quantized skinny
                                         // kernel): q of the 30B-A3B shape, o, 7 rows into F32.
                                         {8, 2048, 4096, DType::BF16},
                                         {8, 4096, 2048, DType::BF16},
                                         {7, 2048, 768, DType::F32},
                                         // 9 to 16 rows (two groups, the kernel's most): q, o, k; a
                                         // second group of one row; K of 6 blocks (3 warps); N off
                                         // the 16-row tile.
                                         {16, 2048, 4096, DType::BF16},
                                         {16, 4096, 2048, DType::BF16},
                                         {12, 2048, 512, DType::F32},
                                         {9, 2048, 4096, DType::BF16},
                                         {11, 768, 2048, DType::F32},
                                         {13, 2048, 130, DType::BF16},
                                         // More tiles than the SMs hold blocks of 8 warps: the
                                         // launch halves a block's warps until all are resident
                                         // or one is left (2,000 tiles: one warp, 8 passes).
                                         {1, 2048, 32000, DType::BF16},
                                         {12, 2048, 32000, DType::F32}}) {
    // Weights of a trained layer's magnitude, quantized by the published rule; activations O(1).
    const Fp8Weight fw = fp8_weight(rng, c.n, c.k);
    const Weight &cw = fw.cpu, &gw = fw.gpu;
    const std::vector<float> a = rng.bf16_normal(c.m * c.k);
    // CPU references: FP8 weight on the CPU back-end, plain and with quantized activations.
    Tensor ref_out = cpu_alloc(DType::F32, {c.m, c.n});
    cpu_->linear(cpu_f32(a, {c.m, c.k}), cw, ref_out);
    const std::vector<float> ref = cpu_read(ref_out);
    std::vector<float> ref_q;
    if (c.k % 128 == 0) {
      Tensor qo = cpu_alloc(DType::F32, {c.m, c.n});
      cpu_->linear(cpu_f32(quantize_activations(a, c.m, c.k), {c.m, c.k}), cw, qo);
      ref_q = cpu_read(qo);
    }
    Tensor ga = gpu_tensor("a", DType::BF16, {c.m, c.k}, &a);
    for (bool skinny : {true, false}) {
      if (!skinny && c.m > cuda::kSkinnyFp8QuantizedMaxRows) continue;
      cuda.set_skinny_gemm(skinny);
      Tensor go = gpu_tensor("out", c.out, {c.m, c.n}, nullptr);
      const auto path = cuda.fp8_linear_path(ga, gw, go);
      ++seen[static_cast<int>(path)];
      // On Hopper the block-scaled GEMM must take every shape of the model's kind (BF16 out, K %
      // 128 == 0, N % 16 == 0: cuBLASLt's condition; any M, padded) that the skinny kernel does not.
      const bool model_shape = c.out == DType::BF16 && c.k % 128 == 0 && c.n % 16 == 0 &&
                               (!skinny || c.m > cuda::kSkinnyFp8QuantizedMaxRows);
      if (cuda.wgmma_supported() && model_shape)
        EXPECT_EQ(path, cuda::CudaBackend::Fp8Path::BlockScaled)
            << shape_of({c.m, c.k, c.n}) << ": cuBLASLt's block-scaled FP8 GEMM was not used";
      gpu_->linear(ga, gw, go);
      const std::vector<float> got = gpu_read(go);
      const std::string sh = shape_of({c.m, c.k, c.n}) + (c.out == DType::F32 ? " outF32" : "");
      const std::string op = std::string("linear.fp8.") + path_name(path);
      // Outputs are O(1): bf16 output rounding gives nmse ~1e-6, max error a few 1e-2.
      const double out_abs = c.out == DType::BF16 ? 0.08 : 0.02;
      if (path == cuda::CudaBackend::Fp8Path::BlockScaled || path == cuda::CudaBackend::Fp8Path::SkinnyQuantized) {
        ASSERT_FALSE(ref_q.empty()) << "a quantizing path ran with K % 128 != 0: " << sh;
        expect_close(op + ".vs_quantized_ref", sh, got, ref_q, 2e-5, out_abs);
        // e4m3 activations: nmse ~7e-4 against the unquantized product.
        expect_close(op + ".vs_exact_ref", sh, got, ref, 3e-3, 0.5);
      } else {
        // Skinny: fp32 products of the exact weights; Dequantize: weights rounded to BF16 (2^-9).
        expect_close(op, sh, got, ref, 2e-5, out_abs);
      }
    }
    cuda.set_skinny_gemm(true);
  }
  std::printf("[gpu_ops] linear.fp8 cases per path: skinny %d, blockscaled %d, dequantize %d, skinny_quantized %d\n",
              seen[0], seen[1], seen[2], seen[3]);
  if (cuda.wgmma_supported()) EXPECT_GT(seen[3], 0);
  EXPECT_GT(seen[0], 0);
  EXPECT_GT(seen[2], 0);
}

// linears: q, k and v of a decode step on FP8 weights in one skinny launch, each output against the
// CPU's FP8 linear; a BF16 weight among FP8 ones (one format per launch) takes linear() one by one;
// more rows than the skinny kernel takes (3 off Hopper, 17 on it) take the block-scaled path, on
// Hopper with one quantization of the activations for all the products (checked against
// activations quantized likewise).
TEST_F(Fp8Ops, LinearsInOneLaunch) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  Rng rng(43);
  struct Case {
    int64_t m, k;
    std::vector<int64_t> n;
    DType out;
    bool mixed;  // the last weight BF16
  };
  for (const Case& c : std::vector<Case>{{1, 2048, {4096, 512, 512}, DType::BF16, false},
                                         {2, 320, {130, 7, 64}, DType::F32, false},
                                         {2, 2048, {130, 7, 64}, DType::F32, false},  // segments off 16 rows
                                         {1, 4112, {33, 1}, DType::BF16, false},
                                         {2, 2048, {5}, DType::BF16, false},
                                         {1, 2048, {512, 256}, DType::BF16, true},
                                         {3, 2048, {512, 256}, DType::BF16, false},
                                         {8, 2048, {4096, 512, 512}, DType::BF16, false},
                                         {16, 2048, {4096, 512, 512}, DType::BF16, false},
                                         {10, 2048, {130, 7, 64}, DType::F32, false},
                                         {17, 2048, {512, 256}, DType::BF16, false},
                                         // More rows than the skinny kernels take, every product on
                                         // the block-scaled GEMM: one quantization of a for all;
                                         // with a BF16 weight among them, linear() one by one.
                                         {32, 2048, {4096, 512, 512}, DType::BF16, false},
                                         {19, 768, {2048, 256}, DType::F32, false},
                                         {21, 2048, {512, 256}, DType::BF16, true}}) {
    const std::vector<float> a = rng.bf16_normal(c.m * c.k);
    Tensor ga = gpu_tensor("a", DType::BF16, {c.m, c.k}, &a);
    std::vector<Fp8Weight> fws;
    std::vector<Weight> gws;
    std::vector<Tensor> gos, refs;
    bool all_blocked = !c.mixed && c.n.size() > 1;  // every product on the block-scaled GEMM
    for (size_t i = 0; i < c.n.size(); ++i) {
      const int64_t n = c.n[i];
      refs.push_back(cpu_alloc(DType::F32, {c.m, n}));
      gos.push_back(gpu_tensor("out", c.out, {c.m, n}, nullptr));
      if (c.mixed && i + 1 == c.n.size()) {
        const std::vector<float> w = rng.bf16_normal(n * c.k, 0.05f);
        gws.emplace_back(gpu_tensor("w_bf16", DType::BF16, {n, c.k}, &w));
        cpu_->linear(cpu_f32(a, {c.m, c.k}), cpu_f32(w, {n, c.k}), refs.back());
      } else {
        fws.push_back(fp8_weight(rng, n, c.k));
        gws.push_back(fws.back().gpu);
        const auto path = cuda.fp8_linear_path(ga, gws.back(), gos.back());
        all_blocked = all_blocked && path == cuda::CudaBackend::Fp8Path::BlockScaled;
        const bool quantized =
            path == cuda::CudaBackend::Fp8Path::BlockScaled || path == cuda::CudaBackend::Fp8Path::SkinnyQuantized;
        cpu_->linear(cpu_f32(quantized ? quantize_activations(a, c.m, c.k) : a, {c.m, c.k}), fws.back().cpu,
                     refs.back());
      }
    }
    std::vector<Backend::LinearOut> lo;
    for (size_t i = 0; i < gws.size(); ++i) lo.push_back({&gws[i], gos[i]});
    const int64_t calls = cuda.fp8_block_scaled_calls();
    gpu_->linears(ga, lo);
    // Products that all take the block-scaled GEMM share one quantization of a (one call), the
    // others take linear() each (one call per block-scaled product).
    if (all_blocked)
      EXPECT_EQ(cuda.fp8_block_scaled_calls() - calls, 1)
          << shape_of({c.m, c.k, c.n[0]}) << ": a quantized per product";
    for (size_t i = 0; i < gws.size(); ++i)
      expect_close(c.mixed ? "linears.fp8_and_bf16" : "linears.fp8", shape_of({c.m, c.k, c.n[i]}), gpu_read(gos[i]),
                   cpu_read(refs[i]), 2e-5, c.out == DType::BF16 ? 0.08 : 0.02);
  }
}

// An all-zero activation block gets scale 1 and codes 0, and NaN in an activation comes out NaN
// (not a silently finite number) on the block-scaled path (20 rows) and, on Hopper, the quantized
// skinny kernel with two groups of rows (12).
TEST_F(Fp8Ops, LinearZeroBlocksAndNaN) {
  for (const int64_t m : {20, 12}) zero_blocks_and_nan(m);  // block-scaled; on Hopper the skinny kernel's two groups
}

void Fp8Ops::zero_blocks_and_nan(int64_t m) {
  Rng rng(42);
  const int64_t k = 256, n = 128;
  std::vector<float> w = rng.bf16_normal(n * k, 0.0625f);
  const Fp8Matrix q = quantize_weight(w, n, k);
  std::vector<float> a = rng.bf16_normal(m * k);
  for (int64_t i = 0; i < 128; ++i) a[3 * k + i] = 0.0f;  // row 3, block 0: zeros
  Tensor g_codes = gpu_tensor("codes", DType::F8E4M3, {n, k}, nullptr);
  gpu_->upload(g_codes.data, q.codes.data(), q.codes.size());
  Weight gw(g_codes);
  gw.scale = gpu_tensor("scale", DType::F32, {1, 2}, &q.scales);
  Tensor c_codes = cpu_alloc(DType::F8E4M3, {n, k});
  std::memcpy(c_codes.data, q.codes.data(), q.codes.size());
  Weight cw(c_codes);
  cw.scale = cpu_f32(q.scales, {1, 2});
  Tensor ref_out = cpu_alloc(DType::F32, {m, n});
  cpu_->linear(cpu_f32(quantize_activations(a, m, k), {m, k}), cw, ref_out);
  Tensor ga = gpu_tensor("a", DType::BF16, {m, k}, &a);
  Tensor go = gpu_tensor("out", DType::F32, {m, n}, nullptr);
  gpu_->linear(ga, gw, go);
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  const auto path = cuda.fp8_linear_path(ga, gw, go);
  const bool blocked =
      path == cuda::CudaBackend::Fp8Path::BlockScaled || path == cuda::CudaBackend::Fp8Path::SkinnyQuantized;
  std::vector<float> want = cpu_read(ref_out);
  if (!blocked) {
    Tensor exact = cpu_alloc(DType::F32, {m, n});
    cpu_->linear(cpu_f32(a, {m, k}), cw, exact);
    want = cpu_read(exact);
  }
  expect_close(
      std::string(blocked ? "linear.fp8.zero_block." : "linear.fp8.zero_block(unquantized path).") + path_name(path),
      shape_of({m, k, n}), gpu_read(go), want, 2e-5, 0.02);
  a[5 * k + 7] = std::numeric_limits<float>::quiet_NaN();
  Tensor gan = gpu_tensor("a_nan", DType::BF16, {m, k}, &a);
  Tensor gon = gpu_tensor("out_nan", DType::F32, {m, n}, nullptr);
  gpu_->linear(gan, gw, gon);
  const std::vector<float> got = gpu_read(gon);
  int64_t nan_row5 = 0, finite_others = 0;
  for (int64_t j = 0; j < n; ++j) nan_row5 += std::isnan(got[5 * n + j]);
  for (int64_t i = 0; i < m; ++i)
    if (i != 5)
      for (int64_t j = 0; j < n; ++j) finite_others += std::isfinite(got[i * n + j]);
  EXPECT_EQ(nan_row5, n) << "a NaN activation must make its row's outputs NaN";
  EXPECT_EQ(finite_others, (m - 1) * n) << "a NaN in row 5 must not reach other rows";
}

// Host-only (runs without a GPU): the activation-scale layouts the quantizer writes and the GEMMs
// read. Every (row, block) of every MoE segment has its own slot inside the buffer the callers
// size with fp8_segment_scale_floats, each segment starts 16-byte aligned (cuBLASLt reads the
// scale pointer of each expert), and a segment's block has room for the padded layout.
TEST(Fp8ScaleLayouts, SegmentsAreDisjointAlignedAndInBounds) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 500; ++trial) {
    const int count = 1 + static_cast<int>(rng() % 20);
    const int64_t kb = 1 + static_cast<int64_t>(rng() % 20);
    std::vector<int64_t> n(count);
    int64_t rows = 0;
    for (auto& x : n) rows += x = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 50);
    for (auto layout : {cuda::Fp8ActScales::MMajor, cuda::Fp8ActScales::MMajorPad4, cuda::Fp8ActScales::KMajor}) {
      const int64_t total = cuda::fp8_segment_scale_floats(rows, count, kb);
      std::vector<int> used(static_cast<size_t>(total), 0);
      int64_t first = 0;
      for (int e = 0; e < count; ++e) {
        const int64_t base = cuda::fp8_segment_scale_base(first, e, kb);
        ASSERT_EQ(base % 4, 0) << "segment " << e << " is not 16-byte aligned";
        ASSERT_LE(base + cuda::fp8_act_scale_floats(n[e], kb), total);
        if (e + 1 < count)
          ASSERT_LE(base + cuda::fp8_act_scale_floats(n[e], kb), cuda::fp8_segment_scale_base(first + n[e], e + 1, kb));
        for (int64_t r = 0; r < n[e]; ++r)
          for (int64_t b = 0; b < kb; ++b) {
            const int64_t i = base + cuda::fp8_act_scale_index(r, b, n[e], kb, layout);
            ASSERT_GE(i, 0);
            ASSERT_LT(i, total);
            ASSERT_EQ(used[static_cast<size_t>(i)]++, 0) << "two (row, block) pairs share scale slot " << i;
          }
        first += n[e];
      }
    }
  }
}

// The cuBLASLt scale-layout probe (cuda_backend.h ensure_fp8_lt_probe) runs lazily: not at
// construction, not for BF16 work nor FP8 products that take no cuBLASLt GEMM; at begin_capture()
// once FP8 weights were used, so that the block-scaled path can be recorded (and replays what it
// computes eagerly); and a capture that would need it first fails with a clear error.
TEST_F(Fp8Ops, LtProbeIsLazyAndRunsBeforeACapture) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  EXPECT_FALSE(cuda.fp8_lt_probed()) << "the probe ran at construction";
  Rng rng(43);
  const int64_t m = 301, k = 2048, n = 512;
  const std::vector<float> a = rng.bf16_normal(m * k), wv = rng.bf16_normal(n * k, 1.0f / std::sqrt(float(k)));
  Tensor ga = gpu_tensor("a", DType::BF16, {m, k}, &a);
  Tensor bf16_w = gpu_tensor("w_bf16", DType::BF16, {n, k}, &wv);
  gpu_->linear(ga, bf16_w, gpu_tensor("out_bf16", DType::BF16, {m, n}, nullptr));
  gpu_->sync();
  EXPECT_FALSE(cuda.fp8_lt_probed()) << "a BF16 linear ran the FP8 probe";
  if (!cuda.wgmma_supported()) GTEST_SKIP() << "FP8 products take cuBLASLt only on compute capability 9.0";
  auto fp8_weight = [&](int64_t rows, int64_t cols) {
    const Fp8Matrix q = quantize_weight(rng.bf16_normal(rows * cols, 1.0f / std::sqrt(float(cols))), rows, cols);
    Tensor codes = gpu_tensor("codes", DType::F8E4M3, {rows, cols}, nullptr);
    gpu_->upload(codes.data, q.codes.data(), q.codes.size());
    Weight w(codes);
    w.scale = gpu_tensor("scale", DType::F32, {(rows + 127) / 128, (cols + 127) / 128}, &q.scales);
    return w;
  };
  // FP8 products that need no probe: two rows (skinny kernel), K % 128 != 0 (dequantized; this one
  // also grows the workspace past what the product below needs, so the capture allocates nothing).
  const Weight w = fp8_weight(n, k), w_odd = fp8_weight(4096, 320);
  const std::vector<float> a2 = rng.bf16_normal(2 * k), a_odd = rng.bf16_normal(8 * 320);
  gpu_->linear(gpu_tensor("a2", DType::BF16, {2, k}, &a2), w, gpu_tensor("o2", DType::BF16, {2, n}, nullptr));
  gpu_->linear(gpu_tensor("a_odd", DType::BF16, {8, 320}, &a_odd), w_odd,
               gpu_tensor("o_odd", DType::BF16, {8, 4096}, nullptr));
  gpu_->sync();
  EXPECT_FALSE(cuda.fp8_lt_probed()) << "an FP8 product without cuBLASLt ran the probe";
  // A capture on a fresh back-end that has seen no FP8 weight: the block-scaled product fails there
  // with the probe's error (and enqueues nothing).
  {
    auto fresh = make_cuda_backend(0);
    auto& fc = static_cast<cuda::CudaBackend&>(*fresh);
    Tensor out = gpu_tensor("out_fresh", DType::BF16, {m, n}, nullptr);
    fresh->begin_capture();
    std::string thrown;
    try {
      fresh->linear(ga, w, out);
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    try {
      fresh->end_capture();
    } catch (const std::exception&) {
    }
    cudaGetLastError();
    EXPECT_NE(thrown.find("probe"), std::string::npos) << "expected the probe's error, got: '" << thrown << "'";
    EXPECT_FALSE(fc.fp8_lt_probed());
  }
  // This back-end has used FP8 weights: begin_capture runs the probe first, the block-scaled
  // product is recorded, and the replay gives what the eager call gives.
  Tensor graphed = gpu_tensor("out_graphed", DType::BF16, {m, n}, nullptr);
  gpu_->begin_capture();
  EXPECT_TRUE(cuda.fp8_lt_probed()) << "begin_capture did not run the probe";
  EXPECT_EQ(cuda.fp8_linear_path(ga, w, graphed), cuda::CudaBackend::Fp8Path::BlockScaled);
  std::string thrown;
  try {
    gpu_->linear(ga, w, graphed);
  } catch (const std::exception& e) {
    thrown = e.what();
  }
  std::unique_ptr<OpGraph> graph = gpu_->end_capture();
  ASSERT_TRUE(thrown.empty()) << thrown;
  graph->replay();
  Tensor eager = gpu_tensor("out_eager", DType::BF16, {m, n}, nullptr);
  gpu_->linear(ga, w, eager);
  const std::vector<float> x = gpu_read(graphed), y = gpu_read(eager);
  size_t diff = 0;
  for (size_t i = 0; i < x.size(); ++i) diff += std::memcmp(&x[i], &y[i], 4) != 0;
  EXPECT_EQ(diff, 0u) << "the replayed block-scaled product differs from the eager one";
  EXPECT_EQ(compare_values(x, x).n_nan, 0) << "the replayed product left outputs unwritten";
}

TEST_F(Fp8Ops, Fp8WeightsSupportedOnHopperUnlessBf16IsAsked) {
  auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
  EXPECT_EQ(cuda.fp8_weights_supported(), cuda.wgmma_supported());
  BackendOptions o;
  o.fp8 = "bf16";
  EXPECT_FALSE(make_cuda_backend(0, o)->fp8_weights_supported());
}

}  // namespace
}  // namespace cpinfer::gputest
