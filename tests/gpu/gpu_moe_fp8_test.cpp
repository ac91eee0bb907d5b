// CUDA moe_experts with FP8 experts (cuda_moe_fp8.cpp) vs CPU references, on every path:
//   row-wise kernels (decode-sized batches, shapes off the 128 blocks): BF16 activations, against
//     the CPU back-end's FP8 moe_experts (exact dequantize-then-fp32) at the BF16 paths' tolerance;
//   block-scaled paths, each against a host reference that applies the same activation
//     quantization (x per token, act per row, per 128 columns; g, u and act rounded to BF16 as the
//     kernels do; y rounded to BF16 where the path writes it so) at a tight tolerance, against the
//     CPU back-end's unquantized result within the activation quantization's error
//     (fp8_test_util.h), and against each other on all rows:
//       auto    the default: the warp-specialized grouped wgmma FP8 kernels, y in BF16;
//       wgmma   the first grouped wgmma FP8 kernels (--moe-runner-backend wgmma), y in F32;
//       cublas  cuBLASLt's block-scaled GEMM per expert over rows padded to a multiple of 4.
// Out has two sentinel rows after it that no path may write. Shapes: Qwen3-30B-A3B's (H 2048, I 768,
// top-8 of 128 experts) on a 32-expert shard at 1024 and 4100 tokens (uniform and skewed routing:
// ragged segments, experts with no rows, one expert in every token) and at 1 and 8 tokens (decode:
// the row-wise weight passes), and small ones: token counts that are not tile multiples, K = 128,
// 256, 384 (1 to 3 scale blocks: the ws kernel's odd and even step counts), an odd number of
// N-tiles, several M- and N-tiles per expert, one expert taking every token, no local token, the
// decode size, widths off the 128 blocks, rows of several row-wise passes. Then: the ws kernels
// against the first kernels bit for bit through the launcher (same values in the same order: the
// quantized act, F32 y; 1 to 4 N-tiles per CTA, act quantized in the gate‖up epilogue at 2 and 4);
// every device-scheduled path (row-wise, first and ws grouped kernels) captured into a CUDA graph
// in global mode (fails on any host synchronization) and replayed bit for bit; capturing the
// cuBLASLt path fails (the detector works). Each case prints "[gpu_ops] moe.fp8.<path> ...";
// without a GPU every test is skipped.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <numeric>
#include <tuple>

#include "backends/cuda/cuda_backend.h"
#include "fp8_test_util.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

struct Fp8Expert {
  Fp8Matrix gate, up, down;    // [I, H], [I, H], [H, I]
  std::vector<float> g, u, d;  // their dequantized values (fp32)
};

class MoeFp8Test : public GpuOpsTest {
 protected:
  struct Experts {
    int64_t h = 0, inter = 0;
    std::vector<Fp8Expert> host;
    ExpertShard cpu, gpu;
  };

  Weight cpu_weight(const Fp8Matrix& m) {
    Tensor codes = cpu_alloc(DType::F8E4M3, {m.n, m.k});
    std::memcpy(codes.data, m.codes.data(), m.codes.size());
    Weight w(codes);
    w.scale = cpu_f32(m.scales, {(m.n + 127) / 128, (m.k + 127) / 128});
    return w;
  }
  Weight gpu_weight(const Fp8Matrix& m) {
    Tensor codes = gpu_tensor("codes", DType::F8E4M3, {m.n, m.k}, nullptr);
    gpu_->upload(codes.data, m.codes.data(), m.codes.size());
    Weight w(codes);
    w.scale = gpu_tensor("scale", DType::F32, {(m.n + 127) / 128, (m.k + 127) / 128}, &m.scales);
    return w;
  }

  // Experts [first, first + count) of e, weights of a trained layer's magnitude quantized by the
  // published rule.
  Experts make_experts(Rng& rng, int e, int first, int count, int64_t h, int64_t inter) {
    Experts x;
    x.h = h;
    x.inter = inter;
    for (ExpertShard* s : {&x.cpu, &x.gpu}) {
      s->n_experts = e;
      s->first = first;
      s->count = count;
    }
    for (int i = 0; i < count; ++i) {
      Fp8Expert ex;
      ex.gate = quantize_weight(rng.bf16_normal(inter * h, 1.0f / std::sqrt(float(h))), inter, h);
      ex.up = quantize_weight(rng.bf16_normal(inter * h, 1.0f / std::sqrt(float(h))), inter, h);
      ex.down = quantize_weight(rng.bf16_normal(h * inter, 1.0f / std::sqrt(float(inter))), h, inter);
      ex.g = ex.gate.dequantized();
      ex.u = ex.up.dequantized();
      ex.d = ex.down.dequantized();
      x.cpu.gate.push_back(cpu_weight(ex.gate));
      x.cpu.up.push_back(cpu_weight(ex.up));
      x.cpu.down.push_back(cpu_weight(ex.down));
      x.gpu.gate.push_back(gpu_weight(ex.gate));
      x.gpu.up.push_back(gpu_weight(ex.up));
      x.gpu.down.push_back(gpu_weight(ex.down));
      x.host.push_back(std::move(ex));
    }
    return x;
  }

  struct Inputs {
    int64_t t = 0;
    int k = 0;
    std::vector<float> x, out0, w;
    std::vector<int32_t> ids;
    Tensor gx, gids, gw;
  };
  // Routing: K distinct experts per token; skew: one hot local expert in every token and every
  // third local expert never chosen; no_local: no local expert chosen.
  Inputs make_inputs(Rng& rng, int64_t t, int k, const Experts& ex, bool skew, bool no_local = false) {
    Inputs in;
    in.t = t;
    in.k = k;
    in.x = rng.bf16_normal(t * ex.h);
    in.out0 = rng.bf16_normal(t * ex.h, 0.5f);
    const int first = ex.cpu.first, count = ex.cpu.count;
    std::vector<int32_t> pool;
    for (int e = 0; e < ex.cpu.n_experts; ++e) {
      const bool local = e >= first && e < first + count;
      if ((skew && local && (e - first) % 3 == 2) || (no_local && local)) continue;
      pool.push_back(e);
    }
    const int hot = skew ? first + std::min(1, count - 1) : -1;
    if (hot >= 0) pool.erase(std::remove(pool.begin(), pool.end(), hot), pool.end());
    for (int64_t i = 0; i < t; ++i) {
      std::vector<int32_t> p = pool;
      std::shuffle(p.begin(), p.end(), rng.gen());
      if (hot >= 0) p.insert(p.begin() + rng.integer(0, k - 1), hot);
      for (int j = 0; j < k; ++j) {
        in.ids.push_back(p[j]);
        in.w.push_back(std::uniform_real_distribution<float>(0.05f, 1.0f)(rng.gen()));
      }
    }
    in.gx = gpu_tensor("x", DType::BF16, {t, ex.h}, &in.x);
    in.gids = gpu_i32("ids", in.ids, {t, k});
    in.gw = gpu_tensor("w", DType::F32, {t, k}, &in.w);
    return in;
  }

  // The CPU back-end's FP8 moe_experts on the rows `tokens` (unquantized activations).
  std::vector<float> exact_reference(const Inputs& in, const Experts& ex, const std::vector<int64_t>& tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size()), h = ex.h;
    std::vector<float> x(n * h), o(n * h), w(n * in.k);
    std::vector<int32_t> ids(n * in.k);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = tokens[i];
      std::copy_n(in.x.begin() + t * h, h, x.begin() + i * h);
      std::copy_n(in.out0.begin() + t * h, h, o.begin() + i * h);
      std::copy_n(in.ids.begin() + t * in.k, in.k, ids.begin() + i * in.k);
      std::copy_n(in.w.begin() + t * in.k, in.k, w.begin() + i * in.k);
    }
    Tensor co = cpu_f32(o, {n, h});
    cpu_->moe_experts(cpu_f32(x, {n, h}), cpu_i32(ids, {n, in.k}), cpu_f32(w, {n, in.k}), ex.cpu, co);
    return cpu_read(co);
  }

  // What the block-scaled paths compute, on the rows `tokens`: x quantized per token, g and u
  // rounded to BF16, act = bf16(silu(g) · u) quantized per row, y in fp32, out += Σ w · y; and the
  // same with each y rounded to BF16 first (y_bf16: the paths that write y in BF16).
  struct QuantizedRef {
    std::vector<float> y_f32, y_bf16;
  };
  QuantizedRef quantized_reference(const Inputs& in, const Experts& ex, const std::vector<int64_t>& tokens) {
    const int64_t h = ex.h, im = ex.inter;
    QuantizedRef ref;
    std::vector<float> act(im);
    for (int64_t t : tokens) {
      const std::vector<float> xq =
          quantize_activations(std::vector<float>(in.x.begin() + t * h, in.x.begin() + (t + 1) * h), 1, h);
      std::vector<double> acc(h, 0.0), acc_b(h, 0.0);
      for (int j = 0; j < in.k; ++j) {
        const int e = in.ids[t * in.k + j] - ex.cpu.first;
        if (e < 0 || e >= ex.cpu.count) continue;
        const Fp8Expert& E = ex.host[e];
        for (int64_t n = 0; n < im; ++n) {
          float g = 0, u = 0;
          for (int64_t c = 0; c < h; ++c) {
            g += xq[c] * E.g[n * h + c];
            u += xq[c] * E.u[n * h + c];
          }
          g = bf16_round(g);
          u = bf16_round(u);
          act[n] = bf16_round(g / (1.0f + std::exp(-g)) * u);
        }
        const std::vector<float> aq = quantize_activations(act, 1, im);
        const double wt = in.w[t * in.k + j];
        for (int64_t n = 0; n < h; ++n) {
          float y = 0;
          for (int64_t c = 0; c < im; ++c) y += aq[c] * E.d[n * im + c];
          acc[n] += wt * y;
          acc_b[n] += wt * bf16_round(y);
        }
      }
      for (int64_t n = 0; n < h; ++n) {
        ref.y_f32.push_back(static_cast<float>(acc[n]));  // out is written, not added to
        ref.y_bf16.push_back(static_cast<float>(acc_b[n]));
      }
    }
    return ref;
  }

  bool hopper() { return static_cast<cuda::CudaBackend&>(*gpu_).wgmma_supported(); }
  void set_path(const std::string& p) {
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    cuda.set_moe_gemm(cuda::CudaBackend::parse_moe_runner_backend(p));
  }
  // The --moe-runner-backend settings to run, in order. The paths share the workspace, and each
  // grouped run follows a cuBLASLt run whose other layout leaves different bytes in the act / y
  // scratch: rows a kernel fails to write cannot inherit another path's correct values.
  std::vector<std::string> paths() {
    if (!hopper()) return {"auto", "cublas"};  // both the row-wise kernels
    return {"cublas", "auto", "cublas", "wgmma"};
  }

  // Runs the CUDA op on `path` into a fresh out [T + 2, H] whose last two rows are sentinels
  // outside the view; returns the T rows, checks the sentinels.
  std::vector<float> run_gpu(const std::string& path, const Inputs& in, const Experts& ex, DType out_dtype) {
    const int64_t t = in.t, h = ex.h;
    std::vector<float> init = in.out0;
    for (int64_t i = 0; i < 2 * h; ++i) init.push_back(bf16_round(0.25f * static_cast<float>(i % 7) - 0.5f));
    Tensor full = gpu_tensor("out", out_dtype, {t + 2, h}, &init);
    Tensor out(full.data, out_dtype, {t, h}, Device::CUDA);
    set_path(path);
    gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out);
    set_path("auto");
    std::vector<float> got = gpu_read(full);
    int64_t bad = 0;
    for (int64_t i = 0; i < 2 * h; ++i) bad += got[t * h + i] != init[t * h + i];
    EXPECT_EQ(bad, 0) << path << ": " << bad << " elements of the sentinel rows after out were written";
    got.resize(t * h);
    return got;
  }

  void check_case(const std::string& name, Rng& rng, int64_t t, int k, const Experts& ex, bool skew, DType out_dtype,
                  bool no_local = false, int64_t max_ref = 48) {
    Inputs in = make_inputs(rng, t, k, ex, skew, no_local);
    std::vector<int64_t> tokens;
    if (t <= max_ref) {
      tokens.resize(t);
      std::iota(tokens.begin(), tokens.end(), 0);
    } else {
      tokens = {0, 1, t / 2, t - 2, t - 1};
      while (static_cast<int64_t>(tokens.size()) < max_ref) tokens.push_back(rng.integer(0, static_cast<int>(t - 1)));
    }
    auto sample = [&](const std::vector<float>& all) {
      std::vector<float> s(tokens.size() * ex.h);
      for (size_t i = 0; i < tokens.size(); ++i)
        std::copy_n(all.begin() + tokens[i] * ex.h, ex.h, s.begin() + i * ex.h);
      return s;
    };
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    const bool blocked = cuda.moe_fp8_blocked(t * k, ex.cpu.count, ex.h, ex.inter, true);
    const std::vector<float> exact = exact_reference(in, ex, tokens);
    const QuantizedRef quant = blocked ? quantized_reference(in, ex, tokens) : QuantizedRef{};
    const std::string sh = name + " T=" + std::to_string(t) + " H=" + std::to_string(ex.h) +
                           " I=" + std::to_string(ex.inter) + " E=" + std::to_string(ex.cpu.n_experts) +
                           " K=" + std::to_string(k) + " local=" + std::to_string(ex.cpu.first) + "+" +
                           std::to_string(ex.cpu.count) + (out_dtype == DType::F32 ? " outF32" : "");
    const std::vector<std::string> ps = paths();
    std::vector<std::vector<float>> all;
    for (const std::string& path : ps) {
      const std::vector<float> got = run_gpu(path, in, ex, out_dtype);
      const std::vector<float> s = sample(got);
      if (blocked) {
        const std::string op = "moe.fp8." + std::string(path == "auto"    ? "ws"
                                                        : path == "wgmma" ? "grouped"
                                                                          : "cublaslt");
        expect_close(op + ".vs_quantized_ref", sh, s, path == "auto" ? quant.y_bf16 : quant.y_f32, 5e-5, 0.1);
        // Two quantized operands (x, act): nmse ~2e-3 against the unquantized product.
        expect_close(op + ".vs_exact_ref", sh, s, exact, 1e-2, 1.0);
      } else {
        // bf16 rounding of g, u, act and out, as the BF16 paths (gpu_moe_test: 1e-4).
        expect_close("moe.fp8.rowwise." + path, sh, s, exact, 1e-4, 0.15);
      }
      all.push_back(got);
    }
    // All rows, each path against the first cuBLASLt run (on Hopper) or the default: the
    // block-scaled paths differ by fp32 summation order and the rounding of y only; the row-wise
    // kernels run for every setting and must agree exactly.
    for (size_t i = 1; i < ps.size(); ++i) {
      const Stats st = compare_values(all[i], all[0]);
      std::printf("[gpu_ops] moe.fp8 %s-vs-%s %s nmse=%.3e (all rows)\n", ps[i].c_str(), ps[0].c_str(), sh.c_str(),
                  st.nmse);
      EXPECT_EQ(st.n_nan, 0) << ps[i] << " " << sh;
      EXPECT_LE(st.nmse, blocked ? 5e-5 : 0.0) << ps[i] << " vs " << ps[0] << ": " << sh;
    }
    if (no_local) {
      const Stats zero = compare_values(all[0], std::vector<float>(in.out0.size(), 0.0f));
      EXPECT_EQ(zero.max_err, 0.0) << "no local pair: out must be 0";
    }
  }

  // Eager call, then the same call captured in global mode and replayed: must not sync, must match.
  void capture_and_replay(const std::string& path, const Inputs& in, const Experts& ex);
};

TEST_F(MoeFp8Test, Qwen3ShapeOnAShard) {
  Rng rng(51);
  const Experts ex = make_experts(rng, 128, 32, 32, 2048, 768);  // rank 1 of 4-way expert parallelism
  check_case("qwen3.shard4", rng, 1024, 8, ex, false, DType::BF16);
  check_case("qwen3.shard4.skew", rng, 4100, 8, ex, true, DType::F32);
  // Decode: the row-wise weight passes at the real shape, one token and the largest row-wise batch.
  check_case("qwen3.shard4.decode", rng, 1, 8, ex, false, DType::BF16);
  check_case("qwen3.shard4.decode.skew", rng, 8, 8, ex, true, DType::F32);
}

// The FP8 experts with the next sub-layer's residual add + RMSNorm in their weighted sum equal
// moe_experts + add_rms_norm bit for bit on every path (row-wise pairs and segments, the grouped
// kernels, cuBLASLt).
TEST_F(MoeFp8Test, AddRmsNormAfterTheExpertsEqualsTheTwoOps) {
  Rng rng(52);
  const Experts ex = make_experts(rng, 128, 0, 32, 2048, 768);
  for (int64_t t : {1, 8, 300}) {
    const Inputs in = make_inputs(rng, t, 8, ex, t == 8);
    for (const std::string& path : paths()) {
      set_path(path);
      expect_moe_norm_fused_exact("fp8 T=" + std::to_string(t) + " " + path, in.gx, in.gids, in.gw, ex.gpu, rng);
    }
    set_path("auto");
  }
}

TEST_F(MoeFp8Test, SmallAndOddShapes) {
  Rng rng(52);
  struct Case {
    int64_t t, h, inter;
    int e, k, first, count;
    bool skew;
    DType out;
    bool no_local = false;
  };
  for (const Case& c :
       std::vector<Case>{{20, 256, 128, 8, 2, 0, 8, false, DType::BF16},     // 40 pairs: decode-size row-wise
                         {1, 256, 128, 8, 2, 0, 8, false, DType::F32},       // one token
                         {32, 256, 128, 4, 2, 0, 4, true, DType::BF16},      // 64 pairs: segments of > 8 rows
                         {3, 2176, 256, 4, 2, 0, 4, false, DType::F32},      // 17 K blocks: two weight passes
                         {24, 2176, 256, 4, 2, 0, 4, true, DType::F32},      // and segments of > 8 rows
                         {37, 256, 128, 8, 2, 2, 4, false, DType::BF16},     // 74 pairs: block-scaled, K steps 2 / 1
                         {513, 256, 384, 16, 8, 0, 16, false, DType::BF16},  // several M- and N-tiles per expert
                         {301, 384, 384, 8, 3, 1, 6, true, DType::F32},      // 3 K steps both ways, 3 down N-tiles
                         {1000, 128, 256, 8, 2, 0, 8, true, DType::BF16},    // 1 and 2 K steps, 1 down N-tile
                         {400, 128, 128, 4, 2, 3, 1, true, DType::F32},      // one local expert takes every token
                         {300, 128, 128, 8, 2, 2, 3, false, DType::BF16, true},  // no local pair: out unchanged
                         {300, 192, 128, 8, 2, 0, 8, true, DType::BF16},         // H % 128 != 0: row-wise
                         {300, 128, 96, 8, 2, 0, 8, true, DType::F32},           // I % 128 != 0: row-wise
                         {150, 136, 72, 4, 2, 0, 4, true, DType::BF16},          // % 16 != 0: scalar row-wise
                         // Row-wise weight passes: several passes with a short last one and partial
                         // scale blocks (H 2064, I 2096), and down columns past H in a block (H 176).
                         {2, 2064, 2096, 4, 2, 0, 4, false, DType::F32},
                         {3, 176, 48, 8, 2, 0, 8, true, DType::BF16}}) {
    const Experts ex = make_experts(rng, c.e, c.first, c.count, c.h, c.inter);
    check_case("small", rng, c.t, c.k, ex, c.skew, c.out, c.no_local, 1 << 20);
  }
}

// The ws kernels compute what the first kernels compute, in the same order: the quantized act
// (codes and segmented scales, whole buffers) and y (F32) bit for bit, through the launcher as the
// back-end calls it, with 1, 2, 3, 4 and 8 N-tiles per CTA, gate‖up on 128 x 128 tiles (n192 off)
// and on the default 128 x 192 tiles (where I % 384 == 0; I = 256 keeps 128 x 128). Where a CTA
// computes whole 128-column blocks of act (N-tiles per CTA a multiple of 2 on 128 x 128, of 4 on
// 128 x 192) the gate‖up kernel quantizes act in its epilogue and takes no act scratch; the first
// kernels and the other counts write act and quantize it after the GEMM.
TEST_F(MoeFp8Test, WsKernelsEqualTheFirstKernelsBitForBit) {
  if (!hopper()) GTEST_SKIP() << "the grouped FP8 kernels need compute capability 9.0";
  Rng rng(54);
  struct Case {
    int64_t t, h, inter;
    int e, k;
  };
  for (const Case& c : std::vector<Case>{{1000, 2048, 768, 32, 8}, {301, 384, 384, 8, 3}, {77, 128, 256, 4, 2}}) {
    const Experts ex = make_experts(rng, c.e, 0, c.e, c.h, c.inter);
    Inputs in = make_inputs(rng, c.t, c.k, ex, true);
    const int64_t n_pairs = c.t * c.k, kbh = c.h / 128, kbi = c.inter / 128;
    cudaStream_t stream = static_cast<cuda::CudaBackend&>(*gpu_).stream();
    // Device tables: gate, up, down codes, then their scales.
    std::vector<const void*> ptrs;
    for (int which = 0; which < 6; ++which)
      for (int e = 0; e < c.e; ++e) {
        const ExpertShard& s = ex.gpu;
        const Weight& w = which % 3 == 0 ? s.gate[e] : which % 3 == 1 ? s.up[e] : s.down[e];
        ptrs.push_back(which < 3 ? w.data : w.scale.data);
      }
    Buffer table(*gpu_, ptrs.size() * sizeof(void*));
    gpu_->upload(table.data(), ptrs.data(), ptrs.size() * sizeof(void*));
    const auto* tp = static_cast<const void* const*>(table.data());
    // The ws kernels' TMA descriptors of the codes (without them the launcher runs the first kernels).
    std::vector<unsigned char> maps(3 * static_cast<size_t>(c.e) * cuda::kTmaDescBytes);
    ASSERT_TRUE(cuda::encode_moe_fp8_weight_maps(ptrs.data(), c.e, c.h, c.inter, maps.data()));
    Buffer map_buf(*gpu_, maps.size());
    gpu_->upload(map_buf.data(), maps.data(), maps.size());
    // And the 128 x 192 gate‖up tiles' (MoeFp8GemmArgs::n192; I = 256 ends in a partial tile).
    std::vector<unsigned char> maps192(2 * static_cast<size_t>(c.e) * cuda::kTmaDescBytes);
    ASSERT_TRUE(cuda::encode_moe_fp8_gateup192_maps(ptrs.data(), c.e, c.h, c.inter, maps192.data()));
    Buffer map192_buf(*gpu_, maps192.size());
    gpu_->upload(map192_buf.data(), maps192.data(), maps192.size());
    auto bytes = [&](size_t n) { return Buffer(*gpu_, std::max<size_t>(n, 16)); };
    const size_t aq_bytes = static_cast<size_t>(n_pairs * c.inter),
                 as_bytes = static_cast<size_t>(cuda::fp8_segment_scale_floats(n_pairs, c.e, kbi) * 4);
    Buffer offsets = bytes((c.e + 1) * 4), tile_start = bytes((c.e + 1) * 4), src_token = bytes(n_pairs * 4),
           pair_row = bytes(n_pairs * 4), xq = bytes(c.t * c.h), xs = bytes(cuda::fp8_act_scale_floats(c.t, kbh) * 4),
           aq = bytes(aq_bytes), as = bytes(as_bytes);
    ASSERT_EQ(
        cuda::launch_moe_permute_tiled(cuda::dev(in.gids), 0, c.e, static_cast<int32_t*>(offsets.data()),
                                       static_cast<int32_t*>(src_token.data()), static_cast<int32_t*>(pair_row.data()),
                                       cuda::kMoeGemmTileM, static_cast<int32_t*>(tile_start.data()), stream),
        cudaSuccess);
    ASSERT_EQ(cuda::launch_fp8_quantize_rows(cuda::dev(in.gx), static_cast<uint8_t*>(xq.data()),
                                             static_cast<float*>(xs.data()), nullptr, 0, stream),
              cudaSuccess);
    cuda::MoeFp8GemmArgs a;
    a.xq = static_cast<const uint8_t*>(xq.data());
    a.x_scale = static_cast<const float*>(xs.data());
    a.n_tokens = c.t;
    a.src_token = static_cast<const int32_t*>(src_token.data());
    a.offsets = static_cast<const int32_t*>(offsets.data());
    a.tile_start = static_cast<const int32_t*>(tile_start.data());
    a.count = c.e;
    a.tables = cuda::Fp8ExpertTables{tp, tp + c.e, tp + 2 * c.e, tp + 3 * c.e, tp + 4 * c.e, tp + 5 * c.e};
    a.tables.weight_maps = map_buf.data();
    a.tables.gateup_maps192 = map192_buf.data();
    a.hidden = c.h;
    a.inter = c.inter;
    a.n_pairs = n_pairs;
    a.aq = static_cast<uint8_t*>(aq.data());
    a.act_scale = static_cast<float*>(as.data());
    Tensor act = gpu_tensor("act", DType::BF16, {n_pairs, c.inter}, nullptr);
    // One run: aq and its scales (both first set to 0xff bytes, so what a path leaves unwritten
    // compares equal only if the other leaves it too), then y.
    auto run = [&](Tensor& y, std::vector<unsigned char>& q, std::vector<unsigned char>& qs) {
      ASSERT_EQ(cudaMemsetAsync(aq.data(), 0xff, aq_bytes, stream), cudaSuccess);
      ASSERT_EQ(cudaMemsetAsync(as.data(), 0xff, as_bytes, stream), cudaSuccess);
      a.act = cuda::moe_fp8_gate_up_needs_act(a) ? act.data : nullptr;
      a.y = y.data;
      ASSERT_EQ(cuda::launch_moe_grouped_gemm_fp8_wgmma(a, true, stream), cudaSuccess);
      ASSERT_EQ(cuda::launch_moe_grouped_gemm_fp8_wgmma(a, false, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      q.resize(aq_bytes);
      qs.resize(as_bytes);
      gpu_->download(q.data(), aq.data(), aq_bytes);
      gpu_->download(qs.data(), as.data(), as_bytes);
    };
    Tensor y0 = gpu_tensor("y_first", DType::F32, {n_pairs, c.h}, nullptr);
    std::vector<unsigned char> want_q, want_qs, got_q, got_qs;
    a.warp_specialized = false;
    ASSERT_TRUE(cuda::moe_fp8_gate_up_needs_act(a));
    run(y0, want_q, want_qs);
    const std::vector<float> want_y = gpu_read(y0);
    size_t unwritten = 0;
    for (unsigned char b : want_q) unwritten += b == 0xff;  // 0xff is a NaN code: no finite act has it
    EXPECT_EQ(unwritten, 0u) << "the first kernels left codes of act rows unwritten";
    size_t nan = 0;
    for (float v : want_y) nan += !std::isfinite(v);  // every row is a pair's: the first kernels wrote them all
    EXPECT_EQ(nan, 0u) << "y: the first kernels left rows unwritten";
    // Elements of `unit` bytes of got and want that differ, and the first of them (n if none).
    auto count_diff = [](const void* got, const void* want, size_t n, size_t unit, size_t& first) {
      size_t diff = 0;
      first = n;
      for (size_t i = 0; i < n; ++i)
        if (std::memcmp(static_cast<const char*>(got) + i * unit, static_cast<const char*>(want) + i * unit, unit) !=
                0 &&
            diff++ == 0)
          first = i;
      return diff;
    };
    for (int v = 0; v < 10; ++v) {
      const int per_cta = std::array<int, 5>{1, 2, 3, 4, 8}[v % 5];
      const bool n192 = v >= 5;
      Tensor y1 = gpu_tensor("y_ws", DType::F32, {n_pairs, c.h}, nullptr);
      a.warp_specialized = true;
      a.n_per_cta = per_cta;
      a.n192 = n192;
      // 128 x 192 tiles where I % 384 == 0, act quantized in windows of 4 N-tiles; else 128 x 128, in pairs.
      const bool tiles192 = n192 && c.inter % 384 == 0;
      EXPECT_EQ(cuda::moe_fp8_gate_up_needs_act(a), per_cta % (tiles192 ? 4 : 2) != 0) << "per_cta=" << per_cta;
      run(y1, got_q, got_qs);
      const std::vector<float> got_y = gpu_read(y1);
      struct Cmp {
        const char* what;
        const void *got, *want;
        size_t n, unit;
      };
      for (const Cmp& m : {Cmp{"act codes", got_q.data(), want_q.data(), aq_bytes, 1},
                           Cmp{"act scales", got_qs.data(), want_qs.data(), as_bytes / 4, 4},
                           Cmp{"y", got_y.data(), want_y.data(), want_y.size(), 4}}) {
        size_t first = 0;
        const size_t diff = count_diff(m.got, m.want, m.n, m.unit, first);
        std::printf("[gpu_ops] moe.fp8.ws%s-vs-first %s T=%lld H=%lld I=%lld E=%d K=%d per_cta=%d: %zu of %zu differ\n",
                    tiles192 ? "192" : "", m.what, static_cast<long long>(c.t), static_cast<long long>(c.h),
                    static_cast<long long>(c.inter), c.e, c.k, per_cta, diff, m.n);
        EXPECT_EQ(diff, 0u) << m.what << " T=" << c.t << " H=" << c.h << " I=" << c.inter << " per_cta=" << per_cta
                            << " n192=" << n192 << ": first difference at " << first;
      }
    }
  }
}

// The device-scheduled FP8 paths must not synchronize with the host (decode graphs and overlapped
// NCCL exchanges depend on it): a global-mode capture fails on any synchronizing call. The replay
// must reproduce the eager output bit for bit. The row-wise kernels (T = 16: 64 pairs), and on
// Hopper the ws (default) and the first grouped kernels at a ragged T = 301.
TEST_F(MoeFp8Test, DeviceScheduledPathsEnqueueWithoutHostSync) {
  Rng rng(53);
  const Experts ex = make_experts(rng, 16, 0, 16, 256, 256);
  capture_and_replay("auto", make_inputs(rng, 16, 4, ex, true), ex);
  if (hopper()) {
    Inputs in = make_inputs(rng, 301, 4, ex, true);
    for (const char* path : {"auto", "wgmma"}) {
      SCOPED_TRACE(std::string("--moe-runner-backend ") + path);
      capture_and_replay(path, in, ex);
    }
  }
  set_path("auto");
}

void MoeFp8Test::capture_and_replay(const std::string& path, const Inputs& in, const Experts& ex) {
  set_path(path);
  const size_t nodes =
      expect_graph_matches_eager("FP8 moe_experts (" + path + ", T=" + std::to_string(in.t) + ")", in.t, ex.h, in.out0,
                                 static_cast<cuda::CudaBackend&>(*gpu_).stream(),
                                 [&](Tensor out) { gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out); });
  EXPECT_LE(nodes, 8u) << "expected permute, quantize, 2 GEMM kernels, quantize, unpermute; no per-expert launches";
}

// The detector itself: the cuBLASLt path reads the expert offsets back on the host, so capturing
// it must fail (if this passes, the test above really checks for host synchronizations).
TEST_F(MoeFp8Test, CaptureCatchesTheCublasLtPathSync) {
  if (!hopper()) GTEST_SKIP() << "FP8 experts take cuBLASLt only on compute capability 9.0";
  Rng rng(55);
  const Experts ex = make_experts(rng, 16, 0, 16, 256, 128);
  Inputs in = make_inputs(rng, 256, 4, ex, false);
  Tensor out = gpu_tensor("out", DType::BF16, {in.t, ex.h}, &in.out0);
  set_path("cublas");
  gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out);  // warm-up (and the cuBLASLt probe)
  gpu_->sync();
  cudaStream_t stream = static_cast<cuda::CudaBackend&>(*gpu_).stream();
  const CaptureRun run = capture_and_launch(stream, [&] { gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out); });
  set_path("auto");
  EXPECT_FALSE(run.error.empty()) << "capturing a host-synchronizing path should fail";
}

}  // namespace
}  // namespace cpinfer::gputest
