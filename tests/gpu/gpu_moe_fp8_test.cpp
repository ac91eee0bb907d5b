// CUDA moe_experts with FP8 experts (cuda_moe_fp8.cpp) vs CPU references, on every path:
//   row-wise kernels (decode-sized batches, shapes off the 128 blocks): BF16 activations, against
//     the CPU back-end's FP8 moe_experts (exact dequantize-then-fp32) at the BF16 paths' tolerance;
//   block-scaled paths (the default grouped wgmma FP8 GEMMs; --moe-runner-backend cublas: cuBLASLt
//     per expert): against a host reference that applies the same activation quantization (x per
//     token, act per row, per 128 columns; g, u and act rounded to BF16 as the kernels do) at a
//     tight tolerance, and against the CPU back-end's unquantized result within the activation
//     quantization's error (fp8_test_util.h); the two block-scaled paths against each other.
// Shapes: Qwen3-30B-A3B's (H 2048, I 768, top-8 of 128 experts) on a 32-expert shard at 1024 and
// 4100 tokens (uniform and skewed routing, experts with no rows), and small ones: several M- and
// N-tiles, one expert taking every token, no local token, the decode size, odd widths. Then the
// default path is captured into a CUDA graph (it must not synchronize with the host) and replayed.
// Each case prints "[gpu_ops] moe.fp8.<path> ..."; without a GPU every test is skipped.
#include <algorithm>
#include <cstring>
#include <numeric>

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
  // rounded to BF16, act = bf16(silu(g) · u) quantized per row, y in fp32, out += Σ w · y.
  std::vector<float> quantized_reference(const Inputs& in, const Experts& ex, const std::vector<int64_t>& tokens) {
    const int64_t h = ex.h, im = ex.inter;
    std::vector<float> out;
    std::vector<float> act(im), y(h);
    for (int64_t t : tokens) {
      const std::vector<float> xq =
          quantize_activations(std::vector<float>(in.x.begin() + t * h, in.x.begin() + (t + 1) * h), 1, h);
      std::vector<double> acc(h, 0.0);
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
        for (int64_t n = 0; n < h; ++n) {
          float s = 0;
          for (int64_t c = 0; c < im; ++c) s += aq[c] * E.d[n * im + c];
          acc[n] += double(in.w[t * in.k + j]) * s;
        }
      }
      for (int64_t n = 0; n < h; ++n) out.push_back(static_cast<float>(in.out0[t * h + n] + acc[n]));
    }
    return out;
  }

  void set_path(const std::string& p) {
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    cuda.set_moe_gemm(cuda::CudaBackend::parse_moe_runner_backend(p));
  }

  std::vector<float> run_gpu(const std::string& path, const Inputs& in, const Experts& ex, DType out_dtype) {
    Tensor out = gpu_tensor("out", out_dtype, {in.t, ex.h}, &in.out0);
    set_path(path);
    gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out);
    set_path("auto");
    std::vector<float> got = gpu_read(out);
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
    const std::vector<float> quant = blocked ? quantized_reference(in, ex, tokens) : std::vector<float>{};
    const std::string sh = name + " T=" + std::to_string(t) + " H=" + std::to_string(ex.h) +
                           " I=" + std::to_string(ex.inter) + " E=" + std::to_string(ex.cpu.n_experts) +
                           " K=" + std::to_string(k) + " local=" + std::to_string(ex.cpu.first) + "+" +
                           std::to_string(ex.cpu.count) + (out_dtype == DType::F32 ? " outF32" : "");
    std::vector<std::vector<float>> all;
    for (const std::string path : {"auto", "cublas"}) {
      const std::vector<float> got = run_gpu(path, in, ex, out_dtype);
      const std::vector<float> s = sample(got);
      if (blocked) {
        const std::string op = "moe.fp8." + std::string(path == "auto" ? "grouped" : "cublaslt");
        expect_close(op + ".vs_quantized_ref", sh, s, quant, 5e-5, 0.1);
        // Two quantized operands (x, act): nmse ~2e-3 against the unquantized product.
        expect_close(op + ".vs_exact_ref", sh, s, exact, 1e-2, 1.0);
      } else {
        // bf16 rounding of g, u, act and out, as the BF16 paths (gpu_moe_test: 1e-4).
        expect_close("moe.fp8.rowwise." + path, sh, s, exact, 1e-4, 0.15);
      }
      all.push_back(got);
    }
    const Stats s = compare_values(all[0], all[1]);
    std::printf("[gpu_ops] moe.fp8 auto-vs-cublas %s nmse=%.3e (all rows)\n", sh.c_str(), s.nmse);
    EXPECT_LE(s.nmse, blocked ? 5e-5 : 0.0) << sh;  // the row-wise kernels run for both settings
    if (no_local) {
      const Stats unchanged = compare_values(all[0], std::vector<float>(in.out0));
      EXPECT_EQ(unchanged.max_err, 0.0) << "no local pair: out must stay as it was";
    }
  }
};

TEST_F(MoeFp8Test, Qwen3ShapeOnAShard) {
  Rng rng(51);
  const Experts ex = make_experts(rng, 128, 32, 32, 2048, 768);  // rank 1 of 4-way expert parallelism
  check_case("qwen3.shard4", rng, 1024, 8, ex, false, DType::BF16);
  check_case("qwen3.shard4.skew", rng, 4100, 8, ex, true, DType::F32);
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
       std::vector<Case>{{20, 256, 128, 8, 2, 0, 8, false, DType::BF16},         // 40 pairs: decode-size row-wise
                         {1, 256, 128, 8, 2, 0, 8, false, DType::F32},           // one token
                         {37, 256, 128, 8, 2, 2, 4, false, DType::BF16},         // 74 pairs: block-scaled
                         {513, 256, 384, 16, 8, 0, 16, false, DType::BF16},      // several M- and N-tiles per expert
                         {400, 128, 128, 4, 2, 3, 1, true, DType::F32},          // one local expert takes every token
                         {300, 128, 128, 8, 2, 2, 3, false, DType::BF16, true},  // no local pair: out unchanged
                         {300, 192, 128, 8, 2, 0, 8, true, DType::BF16},         // H % 128 != 0: row-wise
                         {300, 128, 96, 8, 2, 0, 8, true, DType::F32},           // I % 128 != 0: row-wise
                         {150, 136, 72, 4, 2, 0, 4, true, DType::BF16}}) {       // % 8 != 0: scalar row-wise
    const Experts ex = make_experts(rng, c.e, c.first, c.count, c.h, c.inter);
    check_case("small", rng, c.t, c.k, ex, c.skew, c.out, c.no_local, 1 << 20);
  }
}

// The default FP8 path must not synchronize with the host (decode graphs and overlapped NCCL
// exchanges depend on it): a global-mode capture fails on any synchronizing call. The replay must
// reproduce the eager output bit for bit.
TEST_F(MoeFp8Test, DefaultPathEnqueuesWithoutHostSync) {
  Rng rng(53);
  const Experts ex = make_experts(rng, 16, 0, 16, 256, 256);
  for (int64_t t : {16, 300}) {  // the row-wise (32 pairs) and the block-scaled (1200 pairs) path
    Inputs in = make_inputs(rng, t, 4, ex, true);
    Tensor eager = gpu_tensor("eager", DType::BF16, {t, ex.h}, &in.out0);
    Tensor graphed = gpu_tensor("graphed", DType::BF16, {t, ex.h}, &in.out0);
    gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, eager);  // warm-up: workspace, pointer tables
    gpu_->sync();
    cudaStream_t stream = static_cast<cuda::CudaBackend&>(*gpu_).stream();
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), cudaSuccess);
    std::string thrown;
    try {
      gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, graphed);
    } catch (const std::exception& e) {
      thrown = e.what();
    }
    cudaGraph_t graph = nullptr;
    const cudaError_t end = cudaStreamEndCapture(stream, &graph);
    cudaGetLastError();
    ASSERT_TRUE(thrown.empty()) << "T=" << t << ": moe_experts failed under stream capture: " << thrown;
    ASSERT_EQ(end, cudaSuccess) << "T=" << t << ": capture invalidated: " << cudaGetErrorString(end);
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    const std::vector<float> a = gpu_read(eager), b = gpu_read(graphed);
    size_t diff = 0;
    for (size_t i = 0; i < a.size(); ++i) diff += a[i] != b[i];
    EXPECT_EQ(diff, 0u) << "T=" << t << ": the replay differs from the eager call";
    EXPECT_GT(compare_values(b, in.out0).nmse, 1e-3) << "T=" << t << ": the captured call changed nothing";
  }
}

}  // namespace
}  // namespace cpinfer::gputest
