// moe_bench: times the MoE expert block of CudaBackend::moe_experts at the Qwen3-30B-A3B shape
// (hidden 2048, expert width 768, 128 experts, top-8, random routing, random bf16 weights made on
// the device), on its large-batch paths, through the same kernel launchers the back-end uses:
//   grouped: moe_permute (+ tile prefix) -> grouped gate‖up+SiLU GEMM -> grouped down GEMM ->
//            moe_unpermute; all enqueued, no host synchronization (the default path). Timed with
//            each kernel pair: mma (mma.sync, kernels/moe_gemm.cu, any GPU) and, on compute
//            capability 9.0, the wgmma kernels of kernels/moe_gemm_wgmma.cu: wgmma (128 x 256
//            tiles, 2 N-tiles per CTA: --moe-runner-backend wgmma), wgmma128 (128 x 128, 1 per
//            CTA: --moe-runner-backend wgmma128), ws (the warp-specialized kernels, 128 x 256,
//            y in BF16: the back-end's default there, --moe-runner-backend auto or wgmma-ws; ws.f32
//            writes y in F32) and tuning variants (.jN: N-tiles per CTA; .np: a CTA per item
//            instead of persistent CTAs; .mix: 128 x 256 gate‖up, 128 x 128 down);
//   cublas:  moe_permute -> offsets to the host (stream sync) -> gather rows -> per-expert cuBLAS
//            gate, up -> silu_mul -> per-expert cuBLAS down -> moe_unpermute
//            (--moe-runner-backend cublas in the back-end).
//   fp8.*:   on compute capability 9.0 with H and I multiples of 128, the same experts quantized
//            per 128x128 block to e4m3 (moe_bench_fp8.cuh) through the FP8 MoE block of
//            cuda_moe_fp8.cpp: x quantized -> grouped FP8 gate‖up, act quantized (in its epilogue
//            where a CTA computes whole 128-column blocks of act) -> grouped FP8 down (the "gemm"
//            columns include both quantizations): fp8.ws (the back-end's default: warp-specialized
//            kernels, gate‖up on 128 x 192 tiles where I % 384 == 0, 4 N-tiles per CTA, y in
//            BF16), fp8.ws.jN (N N-tiles per CTA), fp8.ws.np (a CTA per item, not persistent),
//            fp8.ws.f32 (y in F32), fp8.ws128 (gate‖up on 128 x 128 tiles, N-tiles per CTA as
//            moe_fp8_n_per_cta), fp8.ws.dN (the down GEMM with N N-tiles per CTA), fp8.wgmma (the first FP8 kernels,
//            --moe-runner-backend wgmma). Each is compared with the BF16 ws path's output (the FP8 rounding of weights
//            and activations: nmse of a few 1e-3; checked <= 2e-2), fp8.ws.f32 with fp8.wgmma and the fp8.ws variants
//            with each other bit for bit; the "vs bf16" ratio is the path's time over the BF16 ws path's (issue 15's
//            target for the default: <= 0.65).
// Also a dense cuBLAS floor: the same FLOPs as three dense GEMMs over all rows with one expert's
// weights (what a perfectly balanced single expert would cost), and with FP8 paths its FP8 twin on
// cuBLASLt's block-scaled FP8 GEMM (moe_bench_fp8.cuh, Floor).
// CUDA-event timing, warm-up, median of --reps; each path's line ends with the medians of the SM clock and
// the board power read (NVML, bench/gpu_clock.h) after its timed runs. FLOPs = 2 · 3 · rows · H · I (rows = local
// pairs). "gemm" columns time only the expert GEMMs (grouped: the two grouped kernels; cublas: the per-expert calls +
// silu_mul, after the host sync). Each size checks that every grouped output agrees with cuBLAS (nmse <= 1e-4) and the
// wgmma ones with mma; the exit status is 1 otherwise.
//
//   moe_bench [--tokens 4096,16384,32768] [--reps 10] [--experts 128] [--local 128] [--first 0]
//             [--hidden 2048] [--inter 768] [--topk 8] [--paths ws,fp8.ws]
// --paths times only the named paths (and cuBLAS; mma, the wgmma paths' check, always; ws, the FP8
// paths' reference, with any FP8 path): a quick A/B without the tuning variants.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "backends/cuda/kernels/kernels.h"
#include "bench_util.cuh"
#include "gpu_clock.h"
#include "moe_bench_fp8.cuh"

using cpinfer::DType;
using cpinfer::cuda::DevTensor;
namespace cc = cpinfer::cuda;

namespace {

constexpr const char* kBenchName = "moe_bench";
#define CUBLAS_BENCH_CHECK(call)                                                              \
  do {                                                                                        \
    cublasStatus_t s_ = (call);                                                               \
    if (s_ != CUBLAS_STATUS_SUCCESS) {                                                        \
      std::fprintf(stderr, "moe_bench: %s failed: status %d\n", #call, static_cast<int>(s_)); \
      std::exit(1);                                                                           \
    }                                                                                         \
  } while (0)

void fill(__nv_bfloat16* p, int64_t n, uint32_t seed, float scale) {
  fill_random_bf16<<<2048, 256>>>(p, n, seed, scale);
  BENCH_CHECK(cudaGetLastError());
}

// The medians of the SM clock (MHz) and board power (W) read after a path's timed runs.
std::string clock_str(const ClockSamples& c) {
  if (c.empty()) return "";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%4u MHz %3u W", c.median_mhz(), c.median_w());
  return buf;
}

DevTensor view(void* p, DType dt, std::initializer_list<int64_t> dims) {
  DevTensor t;
  t.data = p;
  t.dtype = dt;
  for (int64_t d : dims) t.shape[t.ndim++] = d;
  return t;
}

void* dmalloc(size_t bytes) {
  void* p = nullptr;
  BENCH_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
  return p;
}

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> v;
  for (const char* p = s; *p;) {
    v.push_back(std::strtoll(p, nullptr, 10));
    p = std::strchr(p, ',');
    if (!p) break;
    ++p;
  }
  return v;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

float bf16_bits_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Row-major out[M, N] = a[M, K] · w[N, K]ᵀ, fp32 compute (as CudaBackend::gemm).
void gemm(cublasHandle_t h, const void* a, const void* w, void* out, cudaDataType out_type, int m, int n, int k) {
  const float alpha = 1.0f, beta = 0.0f;
  CUBLAS_BENCH_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, w, CUDA_R_16BF, k, a, CUDA_R_16BF, k,
                                  &beta, out, out_type, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> tokens_list = {4096, 16384, 32768};
  int reps = 10, n_experts = 128, local = -1, first = 0, top_k = 8;
  int64_t hidden = 2048, inter = 768;
  std::vector<std::string> only;  // --paths
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "moe_bench: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokens")
      tokens_list = parse_list(next());
    else if (a == "--reps")
      reps = std::atoi(next());
    else if (a == "--experts")
      n_experts = std::atoi(next());
    else if (a == "--local")
      local = std::atoi(next());
    else if (a == "--first")
      first = std::atoi(next());
    else if (a == "--hidden")
      hidden = std::atoll(next());
    else if (a == "--inter")
      inter = std::atoll(next());
    else if (a == "--topk")
      top_k = std::atoi(next());
    else if (a == "--paths") {
      std::string list = next();
      for (size_t b = 0; b <= list.size();) {
        const size_t e = std::min(list.find(',', b), list.size());
        if (e > b) only.push_back(list.substr(b, e - b));
        b = e + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: moe_bench [--tokens 4096,16384,32768] [--reps 10] [--experts 128] [--local 128] "
                   "[--first 0] [--hidden 2048] [--inter 768] [--topk 8] [--paths ws,fp8.ws]\n");
      return 2;
    }
  }
  const int count = local < 0 ? n_experts - first : local;
  if (count <= 0 || first < 0 || first + count > n_experts || top_k > n_experts || reps < 1) {
    std::fprintf(stderr, "moe_bench: bad expert shard / top-k / reps\n");
    return 2;
  }
  if (!cc::moe_grouped_gemm_supported(hidden, inter)) {
    std::fprintf(stderr, "moe_bench: H=%lld I=%lld is not a grouped-GEMM shape (multiples of 64)\n",
                 static_cast<long long>(hidden), static_cast<long long>(inter));
    return 2;
  }
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    std::printf("moe_bench: no CUDA device, nothing to time\n");
    return 0;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("moe_bench on %s (%d SMs): H=%lld I=%lld E=%d local=%d+%d top-%d, median of %d reps\n", prop.name,
              prop.multiProcessorCount, static_cast<long long>(hidden), static_cast<long long>(inter), n_experts, first,
              count, top_k, reps);

  // The grouped kernel pairs: mma.sync, or the wgmma kernels with a tile config (tile N of the
  // gate‖up and of the down GEMM, N-tiles per CTA, warp-specialized, y in BF16). "ws" is the
  // back-end's default on Hopper, "wgmma" and "wgmma128" its --moe-runner-backend wgmma and
  // wgmma128; the others are for tuning.
  struct GroupedPath {
    const char* name;
    bool wgmma;
    cc::MoeWgmmaConfig cfg;
  };
  std::vector<GroupedPath> gpaths = {{"mma", false, {}}};
  if (prop.major == 9 && prop.minor == 0) {
    gpaths.push_back({"wgmma", true, {}});
    gpaths.push_back({"wgmma.j1", true, {256, 256, 1}});
    gpaths.push_back({"wgmma.j3", true, {256, 256, 3}});
    gpaths.push_back({"wgmma.mix", true, {256, 128, 2}});
    gpaths.push_back({"wgmma128", true, {128, 128, 1}});
    gpaths.push_back({"wgmma128.j2", true, {128, 128, 2}});
    gpaths.push_back({"ws", true, {256, 256, 2, true, true}});
    gpaths.push_back({"ws.j1", true, {256, 256, 1, true, true}});
    gpaths.push_back({"ws.j4", true, {256, 256, 4, true, true}});
    gpaths.push_back({"ws.np", true, {256, 256, 2, true, true, false}});
    gpaths.push_back({"ws.f32", true, {256, 256, 2, true, false}});
  } else {
    std::printf("(not compute capability 9.0: no wgmma columns)\n");
  }
  auto wanted = [&](const std::string& name) {
    return only.empty() || std::find(only.begin(), only.end(), name) != only.end();
  };

  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const GpuClock clock;
  cublasHandle_t blas;
  CUBLAS_BENCH_CHECK(cublasCreate(&blas));
  CUBLAS_BENCH_CHECK(cublasSetStream(blas, stream));

  // Weights: per expert gate [I, H], up [I, H], down [H, I], one allocation.
  const int64_t mat = inter * hidden;
  auto* wbuf = static_cast<__nv_bfloat16*>(dmalloc(static_cast<size_t>(count) * 3 * mat * 2));
  fill(wbuf, static_cast<int64_t>(count) * 3 * mat, 12345u, 1.7f / std::sqrt(static_cast<float>(hidden)));
  std::vector<const void*> ptr_host(3 * count);
  for (int e = 0; e < count; ++e) {
    ptr_host[e] = wbuf + (3 * e + 0) * mat;
    ptr_host[count + e] = wbuf + (3 * e + 1) * mat;
    ptr_host[2 * count + e] = wbuf + (3 * e + 2) * mat;
  }
  auto* ptr_dev = static_cast<const void**>(dmalloc(ptr_host.size() * sizeof(void*)));
  BENCH_CHECK(cudaMemcpy(ptr_dev, ptr_host.data(), ptr_host.size() * sizeof(void*), cudaMemcpyHostToDevice));
  const void* const* gate_p = ptr_dev;
  const void* const* up_p = ptr_dev + count;
  const void* const* down_p = ptr_dev + 2 * count;
  // FP8 copies of the same experts (compute capability 9.0, H and I multiples of 128).
  namespace f8 = moe_bench_fp8;
  const bool fp8 = prop.major == 9 && prop.minor == 0 && cc::moe_fp8_grouped_supported(hidden, inter);
  std::vector<f8::Path> fpaths = fp8 ? std::vector<f8::Path>{{"fp8.ws", true, true, 0},
                                                             {"fp8.ws.j1", true, true, 1},
                                                             {"fp8.ws.j2", true, true, 2},
                                                             {"fp8.ws.j4", true, true, 4},
                                                             {"fp8.ws.j8", true, true, 8},
                                                             {"fp8.ws.np", true, true, 0, false},
                                                             {"fp8.ws.f32", true, false, 0},
                                                             {"fp8.wgmma", false, false, 2},
                                                             {"fp8.ws128", true, true, 0, true, true},
                                                             {"fp8.ws.d2", true, true, 0, true, false, 2},
                                                             {"fp8.ws.d4", true, true, 0, true, false, 4},
                                                             {"fp8.ws.d8", true, true, 0, true, false, 8}}
                                     : std::vector<f8::Path>{};
  // --paths: every name must be a path of this card; mma stays (the wgmma paths' check), ws with any
  // FP8 path (their reference).
  for (const std::string& name : only) {
    const bool known =
        std::any_of(gpaths.begin(), gpaths.end(), [&](const GroupedPath& g) { return name == g.name; }) ||
        std::any_of(fpaths.begin(), fpaths.end(), [&](const f8::Path& f) { return name == f.name; });
    if (!known) {
      std::fprintf(stderr, "moe_bench: --paths: no path '%s' on this card\n", name.c_str());
      return 2;
    }
  }
  fpaths.erase(std::remove_if(fpaths.begin(), fpaths.end(), [&](const f8::Path& f) { return !wanted(f.name); }),
               fpaths.end());
  gpaths.erase(std::remove_if(gpaths.begin(), gpaths.end(),
                              [&](const GroupedPath& g) {
                                const std::string name = g.name;
                                return !(name == "mma" || wanted(name) || (name == "ws" && !fpaths.empty()));
                              }),
               gpaths.end());
  const size_t n_gp = gpaths.size();
  const size_t n_fp = fpaths.size();
  f8::Experts fp8_w;
  if (fp8) fp8_w = f8::make_experts(ptr_host, count, hidden, inter);
  size_t ws_path = 0;  // the BF16 default (ws): what the FP8 paths are compared with
  for (size_t p = 0; p < n_gp; ++p)
    if (std::string(gpaths[p].name) == "ws") ws_path = p;

  cudaEvent_t ev[4];
  for (auto& e : ev) BENCH_CHECK(cudaEventCreate(&e));
  auto elapsed = [&](cudaEvent_t a, cudaEvent_t b) {
    float ms = 0.0f;
    BENCH_CHECK(cudaEventElapsedTime(&ms, a, b));
    return static_cast<double>(ms);
  };
  std::mt19937 gen(7);
  int bad = 0;
  std::printf(
      "per size: one line per path: total ms (TF/s), gemm-only ms (TF/s), speedup over cublas (total, gemm),\n"
      "check vs cublas (and vs mma for wgmma paths)\n");

  for (int64_t n_tokens : tokens_list) {
    const int64_t n_pairs = n_tokens * top_k;
    // Random routing: top_k distinct experts per token, uniform; random positive weights.
    std::vector<int32_t> ids(n_pairs);
    std::vector<float> w(n_pairs);
    std::vector<int32_t> all(n_experts);
    std::iota(all.begin(), all.end(), 0);
    std::uniform_real_distribution<float> wd(0.05f, 1.0f);
    for (int64_t t = 0; t < n_tokens; ++t) {
      for (int k = 0; k < top_k; ++k) {  // partial Fisher-Yates
        std::swap(all[k], all[k + gen() % (n_experts - k)]);
        ids[t * top_k + k] = all[k];
        w[t * top_k + k] = wd(gen);
      }
    }
    std::vector<int64_t> per(count, 0);
    for (int32_t id : ids)
      if (id >= first && id < first + count) ++per[id - first];
    const int64_t rows = std::accumulate(per.begin(), per.end(), int64_t{0});
    const int64_t min_rows = *std::min_element(per.begin(), per.end());
    const int64_t max_rows = *std::max_element(per.begin(), per.end());

    // Device buffers (the back-end's workspace layout for the grouped path, plus the cuBLAS rows).
    auto* x = static_cast<__nv_bfloat16*>(dmalloc(n_tokens * hidden * 2));
    fill(x, n_tokens * hidden, 99u + static_cast<uint32_t>(n_tokens), 1.0f);
    auto* ids_d = static_cast<int32_t*>(dmalloc(n_pairs * 4));
    auto* w_d = static_cast<float*>(dmalloc(n_pairs * 4));
    BENCH_CHECK(cudaMemcpy(ids_d, ids.data(), n_pairs * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(w_d, w.data(), n_pairs * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaDeviceSynchronize());  // the fills ran on the legacy stream, the work runs on `stream`
    auto* offsets = static_cast<int32_t*>(dmalloc((count + 1) * 4));
    auto* tile_start = static_cast<int32_t*>(dmalloc((count + 1) * 4));
    auto* src_token = static_cast<int32_t*>(dmalloc(n_pairs * 4));
    auto* pair_row = static_cast<int32_t*>(dmalloc(n_pairs * 4));
    // The permute's per-block counts (the back-end's MoeScratch::permute).
    auto* perm = static_cast<int32_t*>(dmalloc(std::max<int64_t>(1, cc::moe_permute_scratch_ints(n_pairs, count)) * 4));
    void* act = dmalloc(n_pairs * inter * 2);
    auto* y = static_cast<float*>(dmalloc(n_pairs * hidden * 4));
    void* xp = dmalloc(n_pairs * hidden * 2);
    void* gp = dmalloc(n_pairs * inter * 2);
    void* upb = dmalloc(n_pairs * inter * 2);
    std::vector<__nv_bfloat16*> out_g(n_gp);
    for (auto& o : out_g) o = static_cast<__nv_bfloat16*>(dmalloc(n_tokens * hidden * 2));
    auto* out_c = static_cast<__nv_bfloat16*>(dmalloc(n_tokens * hidden * 2));
    int32_t* host_off = nullptr;
    BENCH_CHECK(cudaMallocHost(&host_off, (count + 1) * 4));

    const DevTensor xt = view(x, DType::BF16, {n_tokens, hidden});
    const DevTensor idt = view(ids_d, DType::I32, {n_tokens, top_k});
    const DevTensor wt = view(w_d, DType::F32, {n_tokens, top_k});
    const DevTensor yt = view(y, DType::F32, {n_pairs, hidden});

    auto run_grouped = [&](size_t path, __nv_bfloat16* out, bool timed) {
      BENCH_CHECK(cc::launch_moe_permute_tiled(idt, first, count, offsets, src_token, pair_row, cc::kMoeGemmTileM,
                                               tile_start, stream, nullptr, perm));
      if (timed) BENCH_CHECK(cudaEventRecord(ev[1], stream));
      if (!gpaths[path].wgmma)
        BENCH_CHECK(cc::launch_moe_grouped_gemms(xt, src_token, offsets, tile_start, n_pairs, count, gate_p, up_p,
                                                 down_p, inter, act, y, stream));
      else
        BENCH_CHECK(cc::launch_moe_grouped_gemms_wgmma(xt, src_token, offsets, tile_start, n_pairs, count, gate_p, up_p,
                                                       down_p, inter, act, y, gpaths[path].cfg, stream));
      if (timed) BENCH_CHECK(cudaEventRecord(ev[2], stream));
      const DevTensor y_path =
          gpaths[path].wgmma && gpaths[path].cfg.y_bf16 ? view(y, DType::BF16, {n_pairs, hidden}) : yt;
      BENCH_CHECK(cc::launch_moe_unpermute(y_path, wt, pair_row, view(out, DType::BF16, {n_tokens, hidden}), stream));
    };
    f8::Scratch fs;
    if (fp8) fs = f8::make_scratch(n_tokens, n_pairs, count, hidden, inter);
    std::vector<__nv_bfloat16*> out_f(n_fp);
    for (auto& o : out_f) o = static_cast<__nv_bfloat16*>(dmalloc(n_tokens * hidden * 2));
    auto run_fp8 = [&](size_t path, __nv_bfloat16* out, bool timed) {
      BENCH_CHECK(cc::launch_moe_permute_tiled(idt, first, count, offsets, src_token, pair_row, cc::kMoeGemmTileM,
                                               tile_start, stream, nullptr, perm));
      if (timed) BENCH_CHECK(cudaEventRecord(ev[1], stream));
      BENCH_CHECK(f8::enqueue_gemms(fpaths[path], fp8_w, fs, xt, src_token, offsets, tile_start, n_pairs, count, inter,
                                    act, y, stream));
      if (timed) BENCH_CHECK(cudaEventRecord(ev[2], stream));
      const DevTensor y_path = fpaths[path].y_bf16 ? view(y, DType::BF16, {n_pairs, hidden}) : yt;
      BENCH_CHECK(cc::launch_moe_unpermute(y_path, wt, pair_row, view(out, DType::BF16, {n_tokens, hidden}), stream));
    };
    auto run_cublas = [&](__nv_bfloat16* out, bool timed) {
      BENCH_CHECK(cc::launch_moe_permute(idt, first, count, offsets, src_token, pair_row, stream));
      BENCH_CHECK(cudaMemcpyAsync(host_off, offsets, (count + 1) * 4, cudaMemcpyDeviceToHost, stream));
      BENCH_CHECK(cudaStreamSynchronize(stream));
      const int64_t n_rows = host_off[count];
      BENCH_CHECK(cc::launch_gather_rows(xt, view(src_token, DType::I32, {n_rows}),
                                         view(xp, DType::BF16, {n_rows, hidden}), stream));
      if (timed) BENCH_CHECK(cudaEventRecord(ev[1], stream));
      for (int e = 0; e < count; ++e) {
        const int64_t b = host_off[e], n = host_off[e + 1] - host_off[e];
        if (n == 0) continue;
        gemm(blas, static_cast<char*>(xp) + b * hidden * 2, ptr_host[e], static_cast<char*>(gp) + b * inter * 2,
             CUDA_R_16BF, static_cast<int>(n), static_cast<int>(inter), static_cast<int>(hidden));
        gemm(blas, static_cast<char*>(xp) + b * hidden * 2, ptr_host[count + e],
             static_cast<char*>(upb) + b * inter * 2, CUDA_R_16BF, static_cast<int>(n), static_cast<int>(inter),
             static_cast<int>(hidden));
      }
      BENCH_CHECK(cc::launch_silu_mul(view(gp, DType::BF16, {n_rows, inter}), view(upb, DType::BF16, {n_rows, inter}),
                                      view(act, DType::BF16, {n_rows, inter}), stream));
      for (int e = 0; e < count; ++e) {
        const int64_t b = host_off[e], n = host_off[e + 1] - host_off[e];
        if (n == 0) continue;
        gemm(blas, static_cast<char*>(act) + b * inter * 2, ptr_host[2 * count + e], y + b * hidden, CUDA_R_32F,
             static_cast<int>(n), static_cast<int>(hidden), static_cast<int>(inter));
      }
      if (timed) BENCH_CHECK(cudaEventRecord(ev[2], stream));
      BENCH_CHECK(cc::launch_moe_unpermute(yt, wt, pair_row, view(out, DType::BF16, {n_tokens, hidden}), stream));
    };

    // Correctness: every path from out = 0, compared on the host with cuBLAS (wgmma also with mma).
    for (auto* o : out_g) BENCH_CHECK(cudaMemsetAsync(o, 0, n_tokens * hidden * 2, stream));
    BENCH_CHECK(cudaMemsetAsync(out_c, 0, n_tokens * hidden * 2, stream));
    // The paths share the act / y scratch: NaN-fill it before each, so rows a path fails to write
    // show up as non-finite outputs instead of the previous path's values.
    auto check_run = [&](const char* name, auto&& run) {
      BENCH_CHECK(cudaMemsetAsync(act, 0xFF, n_pairs * inter * 2, stream));
      BENCH_CHECK(cudaMemsetAsync(y, 0xFF, n_pairs * hidden * 4, stream));
      run();
      BENCH_CHECK(cudaStreamSynchronize(stream));
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) {
        std::fprintf(stderr, "moe_bench: path %s at T=%lld failed: %s\n", name, static_cast<long long>(n_tokens),
                     cudaGetErrorString(err));
        std::exit(1);
      }
    };
    for (size_t p = 0; p < n_gp; ++p) check_run(gpaths[p].name, [&] { run_grouped(p, out_g[p], false); });
    for (size_t p = 0; p < n_fp; ++p) {
      BENCH_CHECK(cudaMemsetAsync(out_f[p], 0, n_tokens * hidden * 2, stream));
      check_run(fpaths[p].name, [&] { run_fp8(p, out_f[p], false); });
    }
    run_cublas(out_c, false);
    BENCH_CHECK(cudaStreamSynchronize(stream));
    BENCH_CHECK(cudaGetLastError());
    std::vector<std::vector<uint16_t>> hg(n_gp, std::vector<uint16_t>(n_tokens * hidden));
    std::vector<uint16_t> hc(n_tokens * hidden);
    for (size_t p = 0; p < n_gp; ++p)
      BENCH_CHECK(cudaMemcpy(hg[p].data(), out_g[p], hc.size() * 2, cudaMemcpyDeviceToHost));
    BENCH_CHECK(cudaMemcpy(hc.data(), out_c, hc.size() * 2, cudaMemcpyDeviceToHost));
    // nmse of a vs b, max |a - b|, non-finite count, first index with |a - b| > 0.05 (1 + |b|).
    struct Cmp {
      double nmse = 0.0, max_err = 0.0;
      int64_t non_finite = 0, first_bad = -1;
      bool ok() const { return non_finite == 0 && nmse <= 1e-4; }
    };
    auto compare = [&](const std::vector<uint16_t>& ha, const std::vector<uint16_t>& hb) {
      Cmp c;
      double num = 0.0, den = 0.0;
      for (size_t i = 0; i < ha.size(); ++i) {
        const double a = bf16_bits_to_f32(ha[i]), b = bf16_bits_to_f32(hb[i]);
        if (!std::isfinite(a) || !std::isfinite(b)) {
          ++c.non_finite;
          if (c.first_bad < 0) c.first_bad = static_cast<int64_t>(i);
          continue;
        }
        num += (a - b) * (a - b);
        den += b * b;
        c.max_err = std::max(c.max_err, std::fabs(a - b));
        if (c.first_bad < 0 && std::fabs(a - b) > 0.05 * (1.0 + std::fabs(b))) c.first_bad = static_cast<int64_t>(i);
      }
      c.nmse = den > 0 ? num / den : (num > 0 ? 1.0 : 1e9);  // all-zero outputs are a failure
      return c;
    };
    std::vector<std::string> check(n_gp);
    for (size_t p = 0; p < n_gp; ++p) {
      std::vector<std::pair<const char*, Cmp>> cmps = {{"cublas", compare(hg[p], hc)}};
      if (gpaths[p].wgmma) cmps.push_back({"mma", compare(hg[p], hg[0])});
      for (const auto& [other, c] : cmps) {
        char buf[256];
        std::snprintf(buf, sizeof buf, "%svs %s: %s nmse=%.2e max_err=%.3e", check[p].empty() ? "" : "; ", other,
                      c.ok() ? "OK" : "MISMATCH", c.nmse, c.max_err);
        check[p] += buf;
        if (!c.ok()) {
          ++bad;
          const int64_t i = c.first_bad;
          std::snprintf(buf, sizeof buf, " (non-finite %lld, first bad index %lld = token %lld col %lld)",
                        static_cast<long long>(c.non_finite), static_cast<long long>(i),
                        static_cast<long long>(i < 0 ? -1 : i / hidden),
                        static_cast<long long>(i < 0 ? -1 : i % hidden));
          check[p] += buf;
        }
      }
    }

    // FP8: against the BF16 ws output (the same experts up to e4m3 rounding), and bit for bit where
    // the paths compute the same values (the ws variants among themselves; ws with F32 y and the
    // first kernels).
    std::vector<std::vector<uint16_t>> hf(n_fp, std::vector<uint16_t>(n_tokens * hidden));
    for (size_t p = 0; p < n_fp; ++p)
      BENCH_CHECK(cudaMemcpy(hf[p].data(), out_f[p], hc.size() * 2, cudaMemcpyDeviceToHost));
    std::vector<std::string> fcheck(n_fp);
    auto same_as = [&](size_t p, const char* other_name) {
      for (size_t q = 0; q < n_fp; ++q) {
        if (std::string(fpaths[q].name) != other_name || q == p) continue;
        size_t diff = 0;
        for (size_t i = 0; i < hf[p].size(); ++i) diff += hf[p][i] != hf[q][i];
        char buf[160];
        std::snprintf(buf, sizeof buf, "; vs %s: %s (%zu differ)", other_name, diff ? "MISMATCH" : "bit-equal", diff);
        fcheck[p] += buf;
        bad += diff != 0;
      }
    };
    for (size_t p = 0; p < n_fp; ++p) {
      Cmp c = compare(hf[p], hg[ws_path]);
      const bool ok = c.non_finite == 0 && c.nmse <= 2e-2;
      char buf[160];
      std::snprintf(buf, sizeof buf, "vs bf16 ws: %s nmse=%.2e", ok ? "OK" : "MISMATCH", c.nmse);
      fcheck[p] = buf;
      bad += !ok;
      const std::string name = fpaths[p].name;
      if (name.rfind("fp8.ws.j", 0) == 0 || name == "fp8.ws.np" || name == "fp8.ws128" ||
          name.rfind("fp8.ws.d", 0) == 0)
        same_as(p, "fp8.ws");
      if (name == "fp8.wgmma") same_as(p, "fp8.ws.f32");
    }

    // Timing: warm-up, then reps of each path (alternating, so clocks and L2 treat them alike).
    std::vector<std::vector<double>> g_total(n_gp), g_gemm(n_gp);
    std::vector<std::vector<double>> f_total(n_fp), f_gemm(n_fp);
    std::vector<double> c_total, c_gemm, dense;
    // The SM clock and board power read after each timed run (NVML; 0 where it is not loaded): the
    // tensor-core paths run below the card's top clock where the power limit holds them, the more
    // so the busier their tensor pipe, so a time is read together with its clock.
    std::vector<ClockSamples> g_clk(n_gp), f_clk(n_fp);
    for (int r = 0; r < 2; ++r) {
      for (size_t p = 0; p < n_gp; ++p) run_grouped(p, out_g[p], false);
      for (size_t p = 0; p < n_fp; ++p) run_fp8(p, out_f[p], false);
      run_cublas(out_c, false);
    }
    // The FP8 dense floor from the rows the warm-up's cuBLAS run left in xp and act.
    f8::Floor floor;
    std::vector<double> fp8_dense, fp8_dense_gu;
    if (fp8) {
      floor = f8::make_floor(fp8_w, rows, hidden, inter, xp, act, stream);
      if (!floor.ok()) std::fprintf(stderr, "moe_bench: cuBLASLt has no block-scaled FP8 GEMM for the floor\n");
    }
    // One timed run: total from ev[0] to ev[3], the GEMMs between ev[1] and ev[2] (the run records them).
    ClockSamples c_clk;
    auto time_run = [&](auto&& run, std::vector<double>& total, std::vector<double>& gemm_ms, ClockSamples& clk) {
      BENCH_CHECK(cudaEventRecord(ev[0], stream));
      run();
      BENCH_CHECK(cudaEventRecord(ev[3], stream));
      BENCH_CHECK(cudaEventSynchronize(ev[3]));
      total.push_back(elapsed(ev[0], ev[3]));
      gemm_ms.push_back(elapsed(ev[1], ev[2]));
      clk.read(clock);
    };
    for (int r = 0; r < reps; ++r) {
      for (size_t p = 0; p < n_fp; ++p) time_run([&] { run_fp8(p, out_f[p], true); }, f_total[p], f_gemm[p], f_clk[p]);
      for (size_t p = 0; p < n_gp; ++p)
        time_run([&] { run_grouped(p, out_g[p], true); }, g_total[p], g_gemm[p], g_clk[p]);
      time_run([&] { run_cublas(out_c, true); }, c_total, c_gemm, c_clk);
      // Dense floor: gate, up, down over all rows with expert 0's weights.
      BENCH_CHECK(cudaEventRecord(ev[0], stream));
      gemm(blas, xp, ptr_host[0], gp, CUDA_R_16BF, static_cast<int>(rows), static_cast<int>(inter),
           static_cast<int>(hidden));
      gemm(blas, xp, ptr_host[count], upb, CUDA_R_16BF, static_cast<int>(rows), static_cast<int>(inter),
           static_cast<int>(hidden));
      gemm(blas, act, ptr_host[2 * count], y, CUDA_R_32F, static_cast<int>(rows), static_cast<int>(hidden),
           static_cast<int>(inter));
      BENCH_CHECK(cudaEventRecord(ev[3], stream));
      BENCH_CHECK(cudaEventSynchronize(ev[3]));
      dense.push_back(elapsed(ev[0], ev[3]));
      if (floor.ok()) {
        BENCH_CHECK(cudaEventRecord(ev[0], stream));
        bool ran = f8::run_floor(floor, true, gp, y, stream);
        BENCH_CHECK(cudaEventRecord(ev[1], stream));
        ran = ran && f8::run_floor(floor, false, gp, y, stream);
        BENCH_CHECK(cudaEventRecord(ev[3], stream));
        BENCH_CHECK(cudaEventSynchronize(ev[3]));
        if (!ran) {
          std::fprintf(stderr, "moe_bench: the FP8 dense floor's cuBLASLt call failed\n");
          std::exit(1);
        }
        fp8_dense.push_back(elapsed(ev[0], ev[3]));
        fp8_dense_gu.push_back(elapsed(ev[0], ev[1]));
      }
    }
    BENCH_CHECK(cudaGetLastError());
    const double flops = 2.0 * 3.0 * static_cast<double>(rows) * hidden * inter;
    auto tf = [&](double ms) { return ms > 0 ? flops / (ms * 1e-3) / 1e12 : 0.0; };
    const double ct = median(c_total), cg = median(c_gemm), dn = median(dense);
    std::printf("T=%lld rows=%lld rows/expert %lld-%lld\n", static_cast<long long>(n_tokens),
                static_cast<long long>(rows), static_cast<long long>(min_rows), static_cast<long long>(max_rows));
    for (size_t p = 0; p < n_gp; ++p) {
      const double gt = median(g_total[p]), gg = median(g_gemm[p]);
      std::printf(
          "  %-11s total %8.3f ms (%6.1f TF/s)  gemm %8.3f ms (%6.1f TF/s, %3.0f%% of dense)  vs cublas %5.2fx "
          "%5.2fx  %s  %s\n",
          gpaths[p].name, gt, tf(gt), gg, tf(gg), 100.0 * dn / gg, ct / gt, cg / gg, clock_str(g_clk[p]).c_str(),
          check[p].c_str());
    }
    const double bt = median(g_total[ws_path]), bg = median(g_gemm[ws_path]);
    for (size_t p = 0; p < n_fp; ++p) {
      const double ft = median(f_total[p]), fg = median(f_gemm[p]);
      std::printf(
          "  %-11s total %8.3f ms (%6.1f TF/s)  gemm+quant %8.3f ms (%6.1f TF/s)  vs bf16 ws %5.2fx %5.2fx  %s  %s\n",
          fpaths[p].name, ft, tf(ft), fg, tf(fg), ft / bt, fg / bg, clock_str(f_clk[p]).c_str(), fcheck[p].c_str());
    }
    if (n_fp > 0)
      std::printf(
          "  FP8 / BF16 MoE block (fp8.ws / ws, the back-end defaults): %.3f / %.3f ms = %.2fx (target <= 0.65)\n",
          median(f_total[0]), bt, median(f_total[0]) / bt);
    if (!fp8_dense.empty()) {
      const double fd = median(fp8_dense), fgu = median(fp8_dense_gu);
      std::printf(
          "  FP8 dense floor (cuBLASLt block-scaled, same FLOPs, one expert, no quantization): %.3f ms = %.1f TF/s "
          "(gate+up %.3f ms = %.1f TF/s, down %.3f ms = %.1f TF/s); %s gemm+quant at %.0f%% of it\n",
          fd, tf(fd), fgu, 2.0 * tf(fgu) / 3.0, fd - fgu, tf(fd - fgu) / 3.0, fpaths[0].name,
          100.0 * fd / median(f_gemm[0]));
    }
    std::printf("  %-11s total %8.3f ms (%6.1f TF/s)  gemm %8.3f ms (%6.1f TF/s)  %s\n", "cublas", ct, tf(ct), cg,
                tf(cg), clock_str(c_clk).c_str());
    std::printf(
        "  dense cuBLAS floor (same FLOPs, one expert): %.3f ms = %.1f TF/s; cuBLAS per-expert GEMMs at %.0f%% "
        "of it\n",
        dn, tf(dn), 100.0 * dn / cg);
    std::fflush(stdout);

    for (void* p : {static_cast<void*>(x), static_cast<void*>(ids_d), static_cast<void*>(w_d),
                    static_cast<void*>(offsets), static_cast<void*>(tile_start), static_cast<void*>(src_token),
                    static_cast<void*>(pair_row), act, static_cast<void*>(y), xp, gp, upb, static_cast<void*>(out_c)})
      BENCH_CHECK(cudaFree(p));
    for (auto* o : out_g) BENCH_CHECK(cudaFree(o));
    for (auto* o : out_f) BENCH_CHECK(cudaFree(o));
    if (fp8) f8::free_scratch(fs);
    f8::free_floor(floor);
    BENCH_CHECK(cudaFreeHost(host_off));
  }
  std::printf(
      "total = permute..unpermute incl. the cuBLAS path's host sync; gemm = the expert GEMMs only; "
      "speedup = cublas / path\n");
  if (fp8) f8::free_experts(fp8_w);
  cublasDestroy(blas);
  cudaStreamDestroy(stream);
  if (bad) {
    std::fprintf(stderr,
                 "moe_bench: %d comparison(s) where a grouped path disagrees with cuBLAS or mma (see MISMATCH)\n", bad);
    return 1;
  }
  return 0;
}
