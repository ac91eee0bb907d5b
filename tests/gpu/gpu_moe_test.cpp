// CUDA moe_experts vs the CPU reference, on every large-batch path: the device-scheduled grouped
// tensor-core GEMMs (default: on compute capability 9.0 the warp-specialized wgmma kernels writing
// the expert outputs in BF16, else mma.sync), the mma.sync grouped kernels (--moe-runner-backend
// mma), where the GPU has them the other wgmma kernels (wgmma, wgmma128: F32 expert outputs), and the
// per-expert cuBLAS path (cublas); every path is also
// compared with cuBLAS and the wgmma paths with mma.sync on all rows. Shapes:
// Qwen3-30B-A3B (H 2048, I 768, 128 experts, top-8) at T = 64, 1024, 4100 with skewed routing
// (experts with no rows, one expert chosen by every token), a 32-expert shard that does not start
// at 0, and small / odd shapes that take the row-wise fallback or the masked edges of the tiles.
// Each case prints "[gpu_moe] path shape nmse max_err"; a failure names the path, the case and the
// first bad (token, column). Then: each device-scheduled path (default, mma, wgmma128, wgmma where
// supported) is captured into a CUDA graph in global capture mode (which fails on any host
// synchronization) and replayed, and its output must equal the eager one bit for bit. Without a
// GPU every test is skipped.
#include <algorithm>
#include <cstdlib>
#include <numeric>

#include "backends/cuda/cuda_backend.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

// Deterministic bf16-rounded uniform values in [-scale, scale): fast enough for the 600M weights
// of a full 128-expert Qwen3 layer.
std::vector<float> hash_uniform(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = (seed << 40) + i + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    v[i] = bf16_to_f32(f32_to_bf16((2.0f * u - 1.0f) * scale));
  }
  return v;
}

enum class Routing {
  Uniform,  // K distinct random experts of all E per token
  Skewed,   // one hot local expert in every token; a third of the local experts never chosen
  NoLocal,  // no token chooses a local expert: the shard gets 0 rows, out must be 0
};

// ids [T, K] (distinct per token), weights [T, K] in [0.05, 1).
void make_routing(Rng& rng, int64_t t, int e, int k, int first, int count, Routing routing, std::vector<int32_t>* ids,
                  std::vector<float>* w) {
  ids->assign(t * k, 0);
  w->assign(t * k, 0.0f);
  std::vector<int32_t> pool;
  int hot = -1;
  for (int x = 0; x < e; ++x) {
    const bool local = x >= first && x < first + count;
    if (routing == Routing::Skewed && local && (x - first) % 3 == 2) continue;  // never chosen: 0 rows
    if (routing == Routing::NoLocal && local) continue;
    pool.push_back(x);
  }
  if (routing == Routing::Skewed) hot = first + std::min(1, count - 1);
  if (hot >= 0) pool.erase(std::remove(pool.begin(), pool.end(), hot), pool.end());
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int32_t> p = pool;
    std::shuffle(p.begin(), p.end(), rng.gen());
    if (hot >= 0) p.insert(p.begin() + rng.integer(0, k - 1), hot);
    for (int j = 0; j < k; ++j) {
      (*ids)[i * k + j] = p[j];
      (*w)[i * k + j] = std::uniform_real_distribution<float>(0.05f, 1.0f)(rng.gen());
    }
  }
}

class MoeTest : public GpuOpsTest {
 protected:
  // One set of experts [first, first + count) of width inter over hidden, on both back-ends.
  struct Experts {
    int64_t h = 0, inter = 0;
    ExpertShard cpu, gpu;
  };
  Experts make_experts(int e, int first, int count, int64_t h, int64_t inter, uint64_t seed) {
    Experts x;
    x.h = h;
    x.inter = inter;
    for (ExpertShard* s : {&x.cpu, &x.gpu}) {
      s->n_experts = e;
      s->first = first;
      s->count = count;
    }
    // Scale so that gate/up outputs and y are O(1): 1.7 / sqrt(K) for uniform weights.
    const float sg = 1.7f / std::sqrt(static_cast<float>(h)), sd = 1.7f / std::sqrt(static_cast<float>(inter));
    for (int i = 0; i < count; ++i) {
      const uint64_t s = seed * 100003 + static_cast<uint64_t>(first + i) * 3;
      auto g = hash_uniform(inter * h, s, sg), u = hash_uniform(inter * h, s + 1, sg);
      auto d = hash_uniform(h * inter, s + 2, sd);
      x.cpu.gate.push_back(cpu_f32(g, {inter, h}));
      x.cpu.up.push_back(cpu_f32(u, {inter, h}));
      x.cpu.down.push_back(cpu_f32(d, {h, inter}));
      x.gpu.gate.push_back(gpu_tensor("gate", DType::BF16, {inter, h}, &g));
      x.gpu.up.push_back(gpu_tensor("up", DType::BF16, {inter, h}, &u));
      x.gpu.down.push_back(gpu_tensor("down", DType::BF16, {h, inter}, &d));
    }
    return x;
  }
  // The sub-shard [first, first + count) of `all` (which starts at all.cpu.first).
  static Experts sub_shard(const Experts& all, int first, int count) {
    Experts x;
    x.h = all.h;
    x.inter = all.inter;
    for (auto [dst, src] : {std::pair{&x.cpu, &all.cpu}, std::pair{&x.gpu, &all.gpu}}) {
      dst->n_experts = src->n_experts;
      dst->first = first;
      dst->count = count;
      const int o = first - src->first;
      dst->gate.assign(src->gate.begin() + o, src->gate.begin() + o + count);
      dst->up.assign(src->up.begin() + o, src->up.begin() + o + count);
      dst->down.assign(src->down.begin() + o, src->down.begin() + o + count);
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
  Inputs make_inputs(Rng& rng, int64_t t, int k, const Experts& ex, Routing routing) {
    Inputs in;
    in.t = t;
    in.k = k;
    in.x = rng.bf16_normal(t * ex.h);
    in.out0 = rng.bf16_normal(t * ex.h, 0.5f);
    make_routing(rng, t, ex.cpu.n_experts, k, ex.cpu.first, ex.cpu.count, routing, &in.ids, &in.w);
    in.gx = gpu_tensor("x", DType::BF16, {t, ex.h}, &in.x);
    in.gids = gpu_i32("ids", in.ids, {t, k});
    in.gw = gpu_tensor("w", DType::F32, {t, k}, &in.w);
    return in;
  }

  // The CPU reference on the rows `tokens` only (a token's output depends on its own row alone).
  std::vector<float> reference(const Inputs& in, const Experts& ex, const std::vector<int64_t>& tokens) {
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

  // Runs the CUDA op on `path` (a --moe-runner-backend value) into a fresh out [T + 2, H] whose last two
  // rows are sentinels outside the view; returns the T rows, checks the sentinels.
  std::vector<float> run_gpu(const std::string& path, const Inputs& in, const Experts& ex, DType out_dtype) {
    const int64_t t = in.t, h = ex.h;
    std::vector<float> init = in.out0;
    const auto sentinel = hash_uniform(2 * h, 777, 3.0f);
    init.insert(init.end(), sentinel.begin(), sentinel.end());
    Tensor full = gpu_tensor("out", out_dtype, {t + 2, h}, &init);
    Tensor out(full.data, out_dtype, {t, h}, Device::CUDA);
    set_path(path);
    gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out);
    set_path("auto");
    std::vector<float> got = gpu_read(full);
    int64_t bad = 0;
    for (int64_t i = 0; i < 2 * h; ++i) {
      // The sentinel went through the output dtype once on upload.
      const float want = out_dtype == DType::BF16 ? bf16_to_f32(f32_to_bf16(sentinel[i])) : sentinel[i];
      bad += got[t * h + i] != want;
    }
    EXPECT_EQ(bad, 0) << path << ": " << bad << " elements of the sentinel rows after out were written";
    got.resize(t * h);
    return got;
  }

  bool wgmma() { return static_cast<cuda::CudaBackend&>(*gpu_).wgmma_supported(); }
  // Selects the large-batch path (a --moe-runner-backend value) on the CUDA back-end.
  void set_path(const std::string& path) {
    auto& cuda = static_cast<cuda::CudaBackend&>(*gpu_);
    cuda.set_moe_gemm(cuda::CudaBackend::parse_moe_runner_backend(path));
  }
  // The large-batch paths (--moe-runner-backend values) this GPU runs, in run order: cuBLAS first (the
  // reference of the all-rows comparisons), the default (on Hopper the warp-specialized wgmma kernels: 'wgmma-ws'),
  // mma.sync, and on Hopper cuBLAS again, the 128 x 128 wgmma tiles, cuBLAS again and the
  // wgmma kernels that are not warp-specialized. The grouped paths share
  // the act / y scratch of the workspace, so each wgmma run follows a cuBLAS run, whose different
  // workspace layout leaves garbage there: rows a kernel fails to write cannot inherit the
  // previous path's correct values.
  std::vector<std::string> paths() {
    std::vector<std::string> p = {"cublas", "auto", "mma"};
    if (wgmma()) {
      p.push_back("cublas");
      p.push_back("wgmma128");
      p.push_back("cublas");
      p.push_back("wgmma");
    }
    return p;
  }
  // The first element where got and want differ by more than tol·(1 + |want|), as
  // "index i (token t, column c): got g, want w", or "" when none does.
  static std::string first_bad(const std::vector<float>& got, const std::vector<float>& want, int64_t h,
                               const std::vector<int64_t>* tokens, double tol) {
    for (size_t i = 0; i < want.size(); ++i) {
      const double d = std::fabs(static_cast<double>(got[i]) - want[i]);
      if (std::isfinite(got[i]) && d <= tol * (1.0 + std::fabs(want[i]))) continue;
      const int64_t row = static_cast<int64_t>(i) / h;
      const int64_t tok = tokens ? (*tokens)[row] : row;
      return "first bad index " + std::to_string(i) + " (token " + std::to_string(tok) + ", column " +
             std::to_string(static_cast<int64_t>(i) % h) + "): got " + std::to_string(got[i]) + ", want " +
             std::to_string(want[i]);
    }
    return "";
  }

  // Every path vs the CPU reference on a sample of tokens (all when T <= max_ref), and vs cuBLAS
  // (wgmma paths also vs mma.sync) on every row.
  void check_case(const std::string& name, Rng& rng, int64_t t, int k, const Experts& ex, Routing routing,
                  DType out_dtype, int64_t max_ref = 192) {
    Inputs in = make_inputs(rng, t, k, ex, routing);
    std::vector<int64_t> tokens;
    if (t <= max_ref) {
      tokens.resize(t);
      std::iota(tokens.begin(), tokens.end(), 0);
    } else {
      tokens = {0, 1, t / 2, t - 2, t - 1};
      while (static_cast<int64_t>(tokens.size()) < max_ref) tokens.push_back(rng.integer(0, static_cast<int>(t - 1)));
    }
    const std::vector<float> ref = reference(in, ex, tokens);
    int64_t local_pairs = 0;
    for (int32_t id : in.ids) local_pairs += id >= ex.cpu.first && id < ex.cpu.first + ex.cpu.count;
    const std::string sh = name + " T=" + std::to_string(t) + " H=" + std::to_string(ex.h) +
                           " I=" + std::to_string(ex.inter) + " E=" + std::to_string(ex.cpu.n_experts) +
                           " K=" + std::to_string(k) + " local=" + std::to_string(ex.cpu.first) + "+" +
                           std::to_string(ex.cpu.count) + " rows=" + std::to_string(local_pairs) +
                           (out_dtype == DType::F32 ? " outF32" : "");
    const std::vector<std::string> ps = paths();
    std::vector<std::vector<float>> results;
    for (const std::string& path : ps) {
      std::vector<float> got = run_gpu(path, in, ex, out_dtype);
      std::vector<float> sampled(tokens.size() * ex.h);
      for (size_t i = 0; i < tokens.size(); ++i)
        std::copy_n(got.begin() + tokens[i] * ex.h, ex.h, sampled.begin() + i * ex.h);
      // bf16 rounding of g, u, act (and of out) gives nmse ~1e-6; outputs are O(1).
      expect_close("moe." + path, sh, sampled, ref, 1e-4, 0.15);
      const Stats s = compare_values(sampled, ref);
      if (s.n_nan != 0 || s.nmse > 1e-4 || s.max_err > 0.15)
        ADD_FAILURE() << "path " << path << " vs the CPU reference, " << sh << ": "
                      << first_bad(sampled, ref, ex.h, &tokens, 0.05);
      results.push_back(std::move(got));
    }
    auto compare_paths = [&](size_t a, size_t b) {
      const Stats s = compare_values(results[a], results[b]);
      std::printf("[gpu_moe] %s-vs-%s %-60s nmse=%.3e max_err=%.3e (all %lld rows)\n", ps[a].c_str(), ps[b].c_str(),
                  sh.c_str(), s.nmse, s.max_err, static_cast<long long>(t));
      EXPECT_EQ(s.n_nan, 0) << ps[a] << " vs " << ps[b] << ": " << sh;
      EXPECT_LE(s.nmse, 2e-5) << "paths " << ps[a] << " and " << ps[b] << " disagree: " << sh << "; "
                              << first_bad(results[a], results[b], ex.h, nullptr, 0.05);
    };
    const size_t cublas = 0, mma = 2;
    for (size_t i = 1; i < ps.size(); ++i)
      if (ps[i] != "cublas") compare_paths(i, cublas);
    if (wgmma()) {  // 'grouped' runs the wgmma kernels here
      compare_paths(1, mma);
      compare_paths(ps.size() - 1, mma);
    }
  }

  // Eager call, then the same call captured in global mode and replayed: must not sync, must match.
  void capture_and_replay(const std::string& path, const Inputs& in, const Experts& ex);
};

TEST_F(MoeTest, Qwen3ShapeFullLayer) {
  Rng rng(11);
  const Experts ex = make_experts(128, 0, 128, 2048, 768, 1);
  check_case("qwen3.decode", rng, 1, 8, ex, Routing::Uniform, DType::BF16);  // 8 pairs: the row-wise kernels
  check_case("qwen3.decode", rng, 8, 8, ex, Routing::Skewed, DType::F32);    // 64 pairs, several rows per expert
  check_case("qwen3", rng, 64, 8, ex, Routing::Uniform, DType::BF16);        // 512 pairs: 4 rows per expert
  check_case("qwen3.skew", rng, 1024, 8, ex, Routing::Skewed, DType::BF16);
  check_case("qwen3.skew", rng, 4100, 8, ex, Routing::Skewed, DType::BF16);
  check_case("qwen3", rng, 4100, 8, ex, Routing::Uniform, DType::F32);
}

// The MoE block with the next sub-layer's residual add + RMSNorm in its weighted sum
// (Backend::moe_experts_add_rms_norm) equals the two ops bit for bit on every path: one token (the
// router's pairs), a decode batch (segments), grouped GEMMs, cuBLAS, a shard no token chooses (zeros),
// and an H off the 8-element vectors (the scalar kernels).
TEST_F(MoeTest, AddRmsNormAfterTheExpertsEqualsTheTwoOps) {
  Rng rng(21);
  const Experts ex = make_experts(128, 0, 128, 2048, 768, 4);
  for (int64_t t : {1, 8, 64, 300}) {
    const Inputs in = make_inputs(rng, t, 8, ex, Routing::Skewed);
    for (const std::string& path : paths()) {
      set_path(path);
      expect_moe_norm_fused_exact("qwen3 T=" + std::to_string(t) + " " + path, in.gx, in.gids, in.gw, ex.gpu, rng);
    }
    set_path("auto");
  }
  // No local pair: out = 0, the residual unchanged, h its norm.
  const Experts rest = sub_shard(ex, 120, 8);
  const Inputs none = make_inputs(rng, 3, 8, rest, Routing::NoLocal);
  expect_moe_norm_fused_exact("no local pair", none.gx, none.gids, none.gw, rest.gpu, rng, /*no_local=*/true);
  const Experts odd = make_experts(16, 0, 16, 100, 36, 5);
  for (int64_t t : {1, 5}) {
    const Inputs in = make_inputs(rng, t, 4, odd, Routing::Uniform);
    expect_moe_norm_fused_exact("H=100 T=" + std::to_string(t), in.gx, in.gids, in.gw, odd.gpu, rng);
  }
}

TEST_F(MoeTest, Qwen3ShapeShardedExperts) {
  Rng rng(12);
  // Experts 32..63 of 128 (4-way expert parallelism, rank 1) and 64..127 (2-way, rank 1).
  const Experts ex = make_experts(128, 32, 96, 2048, 768, 2);
  check_case("qwen3.shard4", rng, 1024, 8, sub_shard(ex, 32, 32), Routing::Uniform, DType::BF16);
  check_case("qwen3.shard4.skew", rng, 1500, 8, sub_shard(ex, 32, 32), Routing::Skewed, DType::BF16);
  check_case("qwen3.shard2", rng, 777, 8, sub_shard(ex, 64, 64), Routing::Skewed, DType::F32);
  check_case("qwen3.shard4.decode", rng, 1, 8, sub_shard(ex, 32, 32), Routing::Uniform, DType::BF16);
}

TEST_F(MoeTest, SmallAndOddShapes) {
  Rng rng(13);
  struct Case {
    int64_t t, h, inter;
    int e, k, first, count;
    Routing routing;
    DType out;
  };
  for (const Case& c : std::vector<Case>{
           {37, 64, 32, 8, 2, 2, 4, Routing::Uniform, DType::BF16},       // decode-size: row-wise kernels
           {300, 64, 32, 8, 2, 0, 8, Routing::Skewed, DType::BF16},       // I % 64 != 0: row-wise fallback
           {300, 64, 64, 8, 4, 0, 8, Routing::Skewed, DType::BF16},       // tensor cores, H < one N-tile
           {301, 192, 128, 16, 4, 4, 8, Routing::Skewed, DType::F32},     // H % 128 != 0: masked N edge
           {513, 256, 192, 16, 8, 0, 16, Routing::Uniform, DType::BF16},  // several M- and N-tiles
           {200, 72, 40, 8, 2, 1, 6, Routing::Uniform, DType::BF16},      // % 8 only: vector fallback
           {150, 37, 19, 4, 2, 0, 4, Routing::Skewed, DType::F32},        // odd: scalar fallback
           {90, 130, 70, 6, 3, 3, 3, Routing::Skewed, DType::BF16},       // odd, shard at the end
           {1, 128, 64, 4, 2, 0, 4, Routing::Uniform, DType::BF16},       // one token: the router's pairs
           {1, 64, 32, 8, 2, 2, 4, Routing::Uniform, DType::F32},         // one token, a shard: pairs off it
           {1, 37, 19, 4, 2, 1, 2, Routing::Skewed, DType::BF16},         // one token, odd: scalar kernels
           {1, 128, 64, 8, 2, 2, 3, Routing::NoLocal, DType::BF16},       // one token, no local expert
           {6, 2056, 1032, 8, 4, 0, 8, Routing::Uniform, DType::BF16},    // decode-size, rows of two passes
           {8, 2048, 768, 4, 4, 0, 4, Routing::Uniform, DType::F32},      // 8 rows per expert: four row groups
           {400, 128, 64, 4, 2, 3, 1, Routing::Skewed, DType::BF16},      // one local expert gets every token
           {300, 128, 64, 8, 2, 2, 3, Routing::NoLocal, DType::BF16}}) {  // 0 local rows: out = 0
    const Experts ex = make_experts(c.e, c.first, c.count, c.h, c.inter, 3 + c.t);
    check_case("small", rng, c.t, c.k, ex, c.routing, c.out, 1 << 20);
  }
}

// The grouped path must not synchronize with the host: global-mode stream capture fails on any
// synchronizing call (cudaStreamSynchronize, a pageable cudaMemcpy, ...). The warm-up call grows
// the workspace and uploads the expert pointer table (both synchronize, once); the captured call
// then must enqueue only kernels. The replayed graph must reproduce the eager output exactly (the
// per-row arithmetic does not depend on the order of rows inside an expert segment).
TEST_F(MoeTest, GroupedPathEnqueuesWithoutHostSync) {
  Rng rng(14);
  const Experts ex = make_experts(128, 0, 128, 2048, 768, 4);
  Inputs in = make_inputs(rng, 1024, 8, ex, Routing::Skewed);
  // The default (warp-specialized wgmma on Hopper), the mma.sync kernels, and the other wgmma kernels.
  std::vector<std::string> ps = {"auto", "mma"};
  if (wgmma()) {
    ps.push_back("wgmma128");
    ps.push_back("wgmma");
  }
  for (const std::string& path : ps) {
    SCOPED_TRACE("--moe-runner-backend " + path);
    capture_and_replay(path, in, ex);
  }
  set_path("auto");
}

void MoeTest::capture_and_replay(const std::string& path, const Inputs& in, const Experts& ex) {
  set_path(path);
  const size_t nodes = expect_graph_matches_eager(
      "moe_experts (" + path + ")", in.t, ex.h, in.out0, static_cast<cuda::CudaBackend&>(*gpu_).stream(),
      [&](Tensor out) { gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out); });
  EXPECT_LE(nodes, 8u) << "expected permute + 2 GEMM kernels + unpermute, not per-expert launches";
}

// The detector itself: the cuBLAS path reads the offsets back on the host, so capturing it must
// fail. (If this passes, GroupedPathEnqueuesWithoutHostSync really checks for syncs.) ctest runs
// every test in its own process, so a stream left odd by the failed capture harms no other test.
TEST_F(MoeTest, CaptureCatchesTheCublasPathSync) {
  Rng rng(15);
  const Experts ex = make_experts(16, 0, 16, 256, 128, 5);
  Inputs in = make_inputs(rng, 256, 4, ex, Routing::Uniform);
  Tensor out = gpu_tensor("out", DType::BF16, {in.t, ex.h}, &in.out0);
  set_path("cublas");
  gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out);  // warm-up
  gpu_->sync();
  cudaStream_t stream = static_cast<cuda::CudaBackend&>(*gpu_).stream();
  const CaptureRun run = capture_and_launch(stream, [&] { gpu_->moe_experts(in.gx, in.gids, in.gw, ex.gpu, out); });
  set_path("auto");
  std::printf("[gpu_moe] cuBLAS path under capture: %s\n", run.error.empty() ? "recorded" : run.error.c_str());
  EXPECT_FALSE(run.error.empty()) << "capturing a host-synchronizing path should fail";
}

// --moe-runner-backend wgmma on a GPU without wgmma is an error, not a silent fallback: for the
// setter and for the back-end's construction.
// The permute on its own, against a host count: the one-block kernel (small calls, or no scratch)
// and the two kernels over many blocks (above 4,096 pairs, with scratch) must both give the exact
// offsets, tile_start and active lists, and pair_row / src_token that put every local pair in a
// distinct row of its expert's segment (in any order) and every other pair at -1. Sizes around the
// one-block limit and the 2,048-pair blocks, past 256 blocks (larger blocks then), shards that do
// not start at 0, experts with no rows.
TEST_F(MoeTest, PermuteOverManyBlocksIsExact) {
  cudaStream_t stream = static_cast<cuda::CudaBackend&>(*gpu_).stream();
  Rng rng(31);
  struct Case {
    int64_t t;
    int k, e, first, count;
    Routing routing;
  };
  const Case cases[] = {{1, 8, 128, 0, 128, Routing::Uniform},    {300, 8, 128, 0, 128, Routing::Skewed},
                        {512, 8, 128, 0, 128, Routing::Uniform},  {513, 8, 128, 0, 128, Routing::Uniform},
                        {2049, 8, 128, 32, 40, Routing::Skewed},  {4100, 8, 128, 0, 128, Routing::Skewed},
                        {777, 4, 60, 7, 33, Routing::Uniform},    {1500, 8, 128, 96, 32, Routing::NoLocal},
                        {9000, 6, 300, 0, 300, Routing::Uniform}, {70000, 8, 128, 0, 128, Routing::Uniform}};
  for (const Case& c : cases) {
    std::vector<int32_t> ids;
    std::vector<float> w;
    make_routing(rng, c.t, c.e, c.k, c.first, c.count, c.routing, &ids, &w);
    const int64_t n_pairs = c.t * c.k;
    // The host's answer.
    std::vector<int32_t> per(c.count, 0);
    for (int32_t id : ids)
      if (id >= c.first && id < c.first + c.count) ++per[id - c.first];
    std::vector<int32_t> off(c.count + 1, 0), tiles(c.count + 1, 0), active{0};
    for (int e = 0; e < c.count; ++e) {
      off[e + 1] = off[e] + per[e];
      tiles[e + 1] = tiles[e] + (per[e] + cuda::kMoeGemmTileM - 1) / cuda::kMoeGemmTileM;
      if (per[e] > 0) {
        active.push_back(e);
        ++active[0];
      }
    }
    const Tensor gids = gpu_i32("ids", ids, {c.t, c.k});
    for (bool scratch : {false, true}) {
      SCOPED_TRACE("T=" + std::to_string(c.t) + " k=" + std::to_string(c.k) + " experts [" + std::to_string(c.first) +
                   ", +" + std::to_string(c.count) + ") " + (scratch ? "with" : "without") + " block scratch");
      auto buf = [&](size_t ints) { return Buffer(*gpu_, std::max<size_t>(ints * 4, 16)); };
      Buffer d_off = buf(c.count + 1), d_tiles = buf(c.count + 1), d_active = buf(c.count + 1), d_src = buf(n_pairs),
             d_row = buf(n_pairs), d_scratch = buf(cuda::moe_permute_scratch_ints(n_pairs, c.count));
      auto i32 = [](Buffer& b) { return static_cast<int32_t*>(b.data()); };
      ASSERT_EQ(cuda::launch_moe_permute_tiled(cuda::dev(gids), c.first, c.count, i32(d_off), i32(d_src), i32(d_row),
                                               cuda::kMoeGemmTileM, i32(d_tiles), stream, i32(d_active),
                                               scratch ? i32(d_scratch) : nullptr),
                cudaSuccess);
      gpu_->sync();
      auto read = [&](Buffer& b, size_t n) {
        std::vector<int32_t> v(n);
        gpu_->download(v.data(), b.data(), n * 4);
        return v;
      };
      EXPECT_EQ(read(d_off, c.count + 1), off);
      EXPECT_EQ(read(d_tiles, c.count + 1), tiles);
      const std::vector<int32_t> got_active = read(d_active, c.count + 1);
      EXPECT_EQ(std::vector<int32_t>(got_active.begin(), got_active.begin() + active.size()), active);
      const std::vector<int32_t> row = read(d_row, n_pairs), src = read(d_src, n_pairs);
      std::vector<char> taken(n_pairs, 0);
      int64_t bad = 0;
      for (int64_t p = 0; p < n_pairs; ++p) {
        const int e = ids[p] - c.first;
        if (e < 0 || e >= c.count) {
          bad += row[p] != -1;
          continue;
        }
        const int32_t r = row[p];
        if (r < off[e] || r >= off[e + 1] || taken[r] || src[r] != p / c.k) {
          ++bad;
          continue;
        }
        taken[r] = 1;
      }
      EXPECT_EQ(bad, 0) << "pairs in the wrong row (or a row taken twice)";
    }
  }
}

TEST_F(MoeTest, WgmmaSettingNeedsHopper) {
  if (wgmma()) GTEST_SKIP() << "this GPU runs the wgmma kernels (covered by the cases above)";
  for (const char* v : {"wgmma", "wgmma128", "wgmma-ws"}) {
    EXPECT_THROW(set_path(v), Error) << v;
    BackendOptions o;
    o.moe = v;
    EXPECT_THROW(make_cuda_backend(0, o), Error) << v;
  }
}

TEST_F(MoeTest, RejectsBadMoeGemmSetting) {
  EXPECT_THROW(set_path("cutlass"), Error);
  BackendOptions o;
  o.moe = "cutlass";
  EXPECT_THROW(make_cuda_backend(0, o), Error);
  o.moe = "auto";
  o.attention = "flash";
  EXPECT_THROW(make_cuda_backend(0, o), Error);
}

}  // namespace
}  // namespace cpinfer::gputest
