// moe_bench's FP8 experts (compute capability 9.0): the BF16 expert weights quantized per 128x128
// block to e4m3 codes + F32 scales (DeepSeek-V3 / Qwen3-FP8's format: scale = amax / 448), and the
// back-end's FP8 MoE block (cuda_moe_fp8.cpp, grouped path) enqueued through the same launchers:
// moe_permute (+ tile prefix) -> x quantized per (token, 128 columns) -> grouped gate‖up+SiLU FP8
// GEMM with act quantized per (row, 128 columns) per expert segment (in the ws kernel's epilogue
// where it can, else by the quantizer after it) -> grouped down FP8 GEMM -> moe_unpermute, with no
// host synchronization.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <exception>
#include <memory>
#include <vector>

#include "backends/cuda/fp8_lt.h"
#include "backends/cuda/kernels/kernels.h"
#include "bench_util.cuh"

namespace moe_bench_fp8 {

// One 128x128 block of w [rows, cols] (rows, cols multiples of 128) per CTA of 128 threads:
// scales[block row, block col] = amax / 448 (1 for an all-zero block), codes = e4m3(w / scale),
// saturating to the finite range.
__global__ inline void quantize_blocks_e4m3(const __nv_bfloat16* w, int64_t cols, uint8_t* codes, float* scales) {
  __shared__ float part[4];
  const int64_t r = blockIdx.y * 128 + threadIdx.x, c0 = blockIdx.x * 128;
  const __nv_bfloat16* row = w + r * cols + c0;
  float amax = 0.0f;
  for (int c = 0; c < 128; ++c) amax = fmaxf(amax, fabsf(__bfloat162float(row[c])));
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = amax;
  __syncthreads();
  amax = fmaxf(fmaxf(part[0], part[1]), fmaxf(part[2], part[3]));
  const float s = amax > 0.0f ? amax / 448.0f : 1.0f;
  if (threadIdx.x == 0) scales[blockIdx.y * gridDim.x + blockIdx.x] = s;
  uint8_t* out = codes + r * cols + c0;
  for (int c = 0; c < 128; ++c)
    out[c] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(__bfloat162float(row[c]) / s, __NV_SATFINITE, __NV_E4M3));
}

// The FP8 copies of `count` experts whose BF16 gate, up [I, H] and down [H, I] are the pointers of
// `bf16` (gate[e], up[e], down[e] at e, count + e, 2·count + e), and their device tables.
struct Experts {
  uint8_t* codes = nullptr;      // [count][3][I·H]
  float* scales = nullptr;       // [count][3][(I/128)·(H/128)]
  const void** table = nullptr;  // device: gate, up, down codes, then gate, up, down scales [count] each
  void* maps = nullptr;          // device: the codes' TMA descriptors (the ws kernels')
  void* maps192 = nullptr;       // device: gate's and up's descriptors for the 128 x 192 tiles
  cpinfer::cuda::Fp8ExpertTables tables;
};

inline Experts make_experts(const std::vector<const void*>& bf16, int count, int64_t hidden, int64_t inter) {
  constexpr const char* kBenchName = "moe_bench";
  Experts x;
  const int64_t mat = inter * hidden, sc = (inter / 128) * (hidden / 128);
  BENCH_CHECK(cudaMalloc(&x.codes, static_cast<size_t>(count) * 3 * mat));
  BENCH_CHECK(cudaMalloc(&x.scales, static_cast<size_t>(count) * 3 * sc * 4));
  std::vector<const void*> host(6 * static_cast<size_t>(count));
  for (int e = 0; e < count; ++e)
    for (int m = 0; m < 3; ++m) {  // gate, up: [I, H]; down: [H, I]
      const int64_t rows = m < 2 ? inter : hidden, cols = m < 2 ? hidden : inter;
      uint8_t* codes = x.codes + (3 * static_cast<int64_t>(e) + m) * mat;
      float* scales = x.scales + (3 * static_cast<int64_t>(e) + m) * sc;
      quantize_blocks_e4m3<<<dim3(static_cast<unsigned>(cols / 128), static_cast<unsigned>(rows / 128)), 128>>>(
          static_cast<const __nv_bfloat16*>(bf16[m * count + e]), cols, codes, scales);
      host[m * count + e] = codes;
      host[(3 + m) * count + e] = scales;
    }
  BENCH_CHECK(cudaGetLastError());
  BENCH_CHECK(cudaMalloc(&x.table, host.size() * sizeof(void*)));
  BENCH_CHECK(cudaMemcpy(x.table, host.data(), host.size() * sizeof(void*), cudaMemcpyHostToDevice));
  const void* const* t = x.table;
  x.tables = {t, t + count, t + 2 * count, t + 3 * count, t + 4 * count, t + 5 * count};
  // The TMA descriptors of the ws kernels (n of them, written by encode) copied to the device;
  // null where they cannot be encoded.
  auto device_maps = [&](size_t n, auto encode) -> void* {
    std::vector<unsigned char> maps(n * cpinfer::cuda::kTmaDescBytes);
    if (!encode(host.data(), count, hidden, inter, maps.data())) return nullptr;
    void* d = nullptr;
    BENCH_CHECK(cudaMalloc(&d, maps.size()));
    BENCH_CHECK(cudaMemcpy(d, maps.data(), maps.size(), cudaMemcpyHostToDevice));
    return d;
  };
  x.tables.weight_maps = x.maps =
      device_maps(3 * static_cast<size_t>(count), cpinfer::cuda::encode_moe_fp8_weight_maps);
  x.tables.gateup_maps192 = x.maps192 =
      device_maps(2 * static_cast<size_t>(count), cpinfer::cuda::encode_moe_fp8_gateup192_maps);
  return x;
}

inline void free_experts(Experts& x) {
  cudaFree(x.codes);
  cudaFree(x.scales);
  cudaFree(x.table);
  cudaFree(x.maps);
  cudaFree(x.maps192);
  x = Experts{};
}

// A grouped FP8 path: the ws kernels (the back-end's default, y in BF16) or the first kernels
// (--moe-runner-backend wgmma, y in F32), and the N-tiles per CTA.
struct Path {
  const char* name;
  bool ws;
  bool y_bf16;
  int n_per_cta;            // 0: the launcher's default (moe_fp8_n_per_cta for the ws kernels)
  bool persistent = true;   // ws: one CTA per SM walks the items
  bool tiles128 = false;    // ws: gate‖up on 128 x 128 tiles (MoeFp8GemmArgs::n192 = false)
  int down_n_per_cta = -1;  // >= 0: the down GEMM's N-tiles per CTA (0: the launcher's default), else n_per_cta
};

// Scratch of one token count: quantized x and act with their scales.
struct Scratch {
  uint8_t* xq = nullptr;
  float* xs = nullptr;
  uint8_t* aq = nullptr;
  float* as = nullptr;
};

inline Scratch make_scratch(int64_t n_tokens, int64_t n_pairs, int count, int64_t hidden, int64_t inter) {
  constexpr const char* kBenchName = "moe_bench";
  namespace cc = cpinfer::cuda;
  Scratch s;
  BENCH_CHECK(cudaMalloc(&s.xq, static_cast<size_t>(n_tokens * hidden)));
  BENCH_CHECK(cudaMalloc(&s.xs, static_cast<size_t>(cc::fp8_act_scale_floats(n_tokens, hidden / 128)) * 4));
  BENCH_CHECK(cudaMalloc(&s.aq, static_cast<size_t>(n_pairs * inter)));
  BENCH_CHECK(cudaMalloc(&s.as, static_cast<size_t>(cc::fp8_segment_scale_floats(n_pairs, count, inter / 128)) * 4));
  return s;
}

inline void free_scratch(Scratch& s) {
  cudaFree(s.xq);
  cudaFree(s.xs);
  cudaFree(s.aq);
  cudaFree(s.as);
  s = Scratch{};
}

// Everything after the permutation (which the caller enqueues, with offsets / tile_start /
// src_token from it): x quantized, the two grouped FP8 GEMMs, the first leaving act quantized (act
// is its BF16 scratch where it writes act first). y has room for n_pairs x H F32 and receives BF16
// where p.y_bf16.
inline cudaError_t enqueue_gemms(const Path& p, const Experts& w, const Scratch& s, const cpinfer::cuda::DevTensor& x,
                                 const int32_t* src_token, const int32_t* offsets, const int32_t* tile_start,
                                 int64_t n_pairs, int count, int64_t inter, void* act, void* y, cudaStream_t stream) {
  namespace cc = cpinfer::cuda;
  const int64_t n_tokens = x.shape[0], hidden = x.shape[1];
  cudaError_t err = cc::launch_fp8_quantize_rows(x, s.xq, s.xs, nullptr, 0, stream);
  if (err != cudaSuccess) return err;
  cc::MoeFp8GemmArgs a;
  a.xq = s.xq;
  a.x_scale = s.xs;
  a.n_tokens = n_tokens;
  a.src_token = src_token;
  a.offsets = offsets;
  a.tile_start = tile_start;
  a.count = count;
  a.tables = w.tables;
  a.hidden = hidden;
  a.inter = inter;
  a.n_pairs = n_pairs;
  a.act = act;
  a.aq = s.aq;
  a.act_scale = s.as;
  a.y = y;
  a.y_bf16 = p.y_bf16;
  a.warp_specialized = p.ws;
  a.n_per_cta = p.n_per_cta;
  a.persistent = p.persistent;
  a.n192 = !p.tiles128;
  if ((err = cc::launch_moe_grouped_gemm_fp8_wgmma(a, true, stream)) != cudaSuccess) return err;
  if (p.down_n_per_cta >= 0) a.n_per_cta = p.down_n_per_cta;
  return cc::launch_moe_grouped_gemm_fp8_wgmma(a, false, stream);
}

// The FP8 dense floor (the FP8 twin of moe_bench's dense cuBLAS floor): gate, up and down as three
// dense GEMMs over all rows with expert 0's codes, on cuBLASLt's block-scaled FP8 GEMM — the
// back-end's dense FP8 path (cuda_fp8.cpp: weight scales per 128x128 block, BLK128x128_32F;
// activation scales per (row, 128 columns), VEC128_32F, M-major) — from the path's own quantized
// rows (x rows gathered as the cuBLAS path gathers them, act as its SiLU leaves it). The same FLOPs
// as the grouped FP8 GEMMs with no expert boundaries: how far they are from a dense FP8 GEMM.
using LtGemm = std::unique_ptr<cpinfer::cuda::Fp8LtCall>;  // the back-end's GEMM (backends/cuda/fp8_lt.h)

struct Floor {
  cublasLtHandle_t lt = nullptr;
  void* ws = nullptr;
  uint8_t *xq = nullptr, *aq = nullptr;
  float *xs = nullptr, *as = nullptr, *down_scale = nullptr;
  LtGemm gate, down;  // gate: [rows, I] = xq · gateᵀ (up: the same shape); down: [rows, H] = aq · downᵀ
  const uint8_t *w_gate = nullptr, *w_up = nullptr, *w_down = nullptr;
  const float *s_gate = nullptr, *s_up = nullptr;
  bool ok() const { return gate && gate->has_algo() && down && down->has_algo(); }
};

constexpr size_t kFloorWorkspace = size_t{32} << 20;

// Row-major out[m, n] (BF16) = a[m, k] · w[n, k]ᵀ on the back-end's descriptors, the pointers
// aligned to 256 bytes (cudaMalloc's).
inline LtGemm make_lt_gemm(cublasLtHandle_t lt, int64_t m, int64_t n, int64_t k) {
  try {
    return std::make_unique<cpinfer::cuda::Fp8LtCall>(lt, m, n, k, cpinfer::DType::BF16, 256, 256, 256,
                                                      kFloorWorkspace);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe_bench: %s\n", e.what());
    return nullptr;
  }
}

// x_rows [rows, H] and act [rows, I] BF16 (rows a multiple of 4, H and I of 128) are quantized
// here, once; w's expert 0 gives the weights.
inline Floor make_floor(const Experts& w, int64_t rows, int64_t hidden, int64_t inter, const void* x_rows,
                        const void* act, cudaStream_t stream) {
  constexpr const char* kBenchName = "moe_bench";
  namespace cc = cpinfer::cuda;
  Floor f;
  if (rows <= 0 || rows % 4 != 0) return f;
  const int64_t kbh = hidden / 128, kbi = inter / 128, ld_i = (kbi + 3) / 4 * 4;
  if (kbh % 4 != 0) return f;  // gate's and up's scale rows as stored must be 16-byte aligned
  if (cublasLtCreate(&f.lt) != CUBLAS_STATUS_SUCCESS) return f;
  BENCH_CHECK(cudaMalloc(&f.ws, kFloorWorkspace));
  BENCH_CHECK(cudaMalloc(&f.xq, static_cast<size_t>(rows * hidden)));
  BENCH_CHECK(cudaMalloc(&f.aq, static_cast<size_t>(rows * inter)));
  BENCH_CHECK(cudaMalloc(&f.xs, static_cast<size_t>(cc::fp8_act_scale_floats(rows, kbh)) * 4));
  BENCH_CHECK(cudaMalloc(&f.as, static_cast<size_t>(cc::fp8_act_scale_floats(rows, kbi)) * 4));
  BENCH_CHECK(cudaMalloc(&f.down_scale, static_cast<size_t>(kbh * ld_i) * 4));
  const int64_t mat = inter * hidden, sc = kbi * kbh;  // make_experts' layout: expert 0's gate, up, down
  f.w_gate = w.codes;
  f.w_up = w.codes + mat;
  f.w_down = w.codes + 2 * mat;
  f.s_gate = w.scales;
  f.s_up = w.scales + sc;
  cc::DevTensor xt, at;
  xt.data = const_cast<void*>(x_rows);
  at.data = const_cast<void*>(act);
  xt.dtype = at.dtype = cpinfer::DType::BF16;
  xt.ndim = at.ndim = 2;
  xt.shape[0] = at.shape[0] = rows;
  xt.shape[1] = hidden;
  at.shape[1] = inter;
  BENCH_CHECK(cc::launch_fp8_quantize_rows(xt, f.xq, f.xs, nullptr, 0, stream));
  BENCH_CHECK(cc::launch_fp8_quantize_rows(at, f.aq, f.as, nullptr, 0, stream));
  BENCH_CHECK(cc::launch_fp8_pad_scales(w.scales + 2 * sc, nullptr, 1, kbh, kbi, f.down_scale, ld_i, stream));
  BENCH_CHECK(cudaStreamSynchronize(stream));
  f.gate = make_lt_gemm(f.lt, rows, inter, hidden);
  f.down = make_lt_gemm(f.lt, rows, hidden, inter);
  return f;
}

// gate and up into out_i [rows, I] BF16 (one after the other), or down into out_h [rows, H] BF16.
inline bool run_floor(Floor& f, bool gate_up, void* out_i, void* out_h, cudaStream_t stream) {
  auto one = [&](LtGemm& g, const void* w, const float* w_scale, const void* a, const float* a_scale, void* out) {
    return g->enqueue(f.lt, w, w_scale, a, a_scale, out, f.ws, stream) == CUBLAS_STATUS_SUCCESS;
  };
  if (!f.ok()) return false;
  if (gate_up)
    return one(f.gate, f.w_gate, f.s_gate, f.xq, f.xs, out_i) && one(f.gate, f.w_up, f.s_up, f.xq, f.xs, out_i);
  return one(f.down, f.w_down, f.down_scale, f.aq, f.as, out_h);
}

inline void free_floor(Floor& f) {
  for (void* p : {f.ws, static_cast<void*>(f.xq), static_cast<void*>(f.aq), static_cast<void*>(f.xs),
                  static_cast<void*>(f.as), static_cast<void*>(f.down_scale)})
    cudaFree(p);
  if (f.lt) cublasLtDestroy(f.lt);
  f = Floor{};
}

}  // namespace moe_bench_fp8
