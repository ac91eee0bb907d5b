// The row-wise expert GEMMs of kernels/moe.cu for FP8 experts (codes + 128x128 block scales):
// decode-sized batches and shapes the block-scaled GEMMs do not take. Same scheme as the BF16
// kernels (one launch per GEMM covers every local expert, offsets read on the device, a warp owns a
// few output columns and streams their weight rows together) reading 1 byte per weight. The
// activations stay BF16 (no activation quantization here): W = code · scale exactly as the CPU
// reference computes it, the products and sums in fp32.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 8;
template <bool kGateUp>
constexpr int cols_per_warp() {
  return kGateUp ? 4 : 8;
}
template <bool kGateUp>
constexpr int cols_per_block() {
  return kWarps * cols_per_warp<kGateUp>();
}

// kGateUp: act[r, n] = silu(bf16(x[tok(r)] · gate[n])) · bf16(x[tok(r)] · up[n]) rounded to bf16
// (as the BF16 kernels); otherwise y[r, n] = act[r] · down[n] in F32. kVec: 8 codes per lane and
// step (k_dim % 8 == 0, 8-byte aligned rows); otherwise one element per lane and step.
template <bool kGateUp, bool kVec>
__global__ void __launch_bounds__(kWarps * 32)
    moe_small_gemm_fp8_kernel(const __nv_bfloat16* __restrict__ in, const int32_t* __restrict__ src_token,
                              const int32_t* __restrict__ offsets, const uint8_t* const* __restrict__ w1,
                              const uint8_t* const* __restrict__ w2, const float* const* __restrict__ s1,
                              const float* const* __restrict__ s2, int n_out, int k_dim, void* __restrict__ out,
                              const int32_t* __restrict__ active) {
  constexpr int kMats = kGateUp ? 2 : 1;
  constexpr int kColsPerWarp = cols_per_warp<kGateUp>();
  constexpr int kColsPerBlock = cols_per_block<kGateUp>();
  if (active && static_cast<int>(blockIdx.y) >= active[0]) return;
  const int e = active ? active[1 + blockIdx.y] : static_cast<int>(blockIdx.y);
  const int begin = offsets[e], end = offsets[e + 1];
  if (begin == end) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kColsPerWarp;
  if (n0 >= n_out) return;
  const int n_cols = min(kColsPerWarp, n_out - n0);
  const int sk = (k_dim + kFp8Blk - 1) / kFp8Blk;
  // Rows past n_out repeat the last valid one (read, never written), so the loads stay uniform.
  const uint8_t* rows[kMats][kColsPerWarp];
  const float* srows[kMats][kColsPerWarp];
#pragma unroll
  for (int c = 0; c < kColsPerWarp; ++c) {
    const int64_t n = n0 + min(c, n_cols - 1);
    rows[0][c] = w1[e] + n * k_dim;
    srows[0][c] = s1[e] + (n / kFp8Blk) * sk;
    if constexpr (kGateUp) {
      rows[1][c] = w2[e] + n * k_dim;
      srows[1][c] = s2[e] + (n / kFp8Blk) * sk;
    }
  }
  for (int r = begin; r < end; ++r) {
    const __nv_bfloat16* xr = in + static_cast<int64_t>(kGateUp ? src_token[r] : r) * k_dim;
    float dot[kMats][kColsPerWarp];
#pragma unroll
    for (int m = 0; m < kMats; ++m)
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) dot[m][c] = 0.0f;
    if constexpr (kVec) {
#pragma unroll 2
      for (int k = lane * 8; k < k_dim; k += 32 * 8) {
        float xv[8];
        load8(xr + k, xv);
        float wv[kMats][kColsPerWarp][8];
        float s[kMats][kColsPerWarp];
#pragma unroll
        for (int m = 0; m < kMats; ++m)
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c) {
            load8_fp8(rows[m][c] + k, wv[m][c]);
            s[m][c] = __ldg(srows[m][c] + k / kFp8Blk);  // the 8 codes lie in one block (8 | 128)
          }
#pragma unroll
        for (int m = 0; m < kMats; ++m)
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c) {
            float part = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) part += xv[i] * wv[m][c][i];
            dot[m][c] += part * s[m][c];
          }
      }
    } else {
      for (int k = lane; k < k_dim; k += 32) {
        const float xv = to_f32(xr[k]);
#pragma unroll
        for (int m = 0; m < kMats; ++m)
#pragma unroll
          for (int c = 0; c < kColsPerWarp; ++c)
            dot[m][c] += xv * (fp8x2_to_f32(rows[m][c][k]).x * __ldg(srows[m][c] + k / kFp8Blk));
      }
    }
#pragma unroll
    for (int m = 0; m < kMats; ++m)
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) dot[m][c] = warp_sum(dot[m][c]);
    if (lane == 0) {
#pragma unroll
      for (int c = 0; c < kColsPerWarp; ++c) {
        if (c >= n_cols) break;
        const int64_t o = static_cast<int64_t>(r) * n_out + n0 + c;
        if constexpr (kGateUp) {
          const float g = to_f32(from_f32<__nv_bfloat16>(dot[0][c]));
          const float u = to_f32(from_f32<__nv_bfloat16>(dot[kMats - 1][c]));
          static_cast<__nv_bfloat16*>(out)[o] = from_f32<__nv_bfloat16>(g / (1.0f + __expf(-g)) * u);
        } else {
          static_cast<float*>(out)[o] = dot[0][c];
        }
      }
    }
  }
}

template <bool kVec>
cudaError_t launch_both(const DevTensor& x, const int32_t* src_token, const int32_t* offsets, int experts,
                        const Fp8ExpertTables& t, int64_t inter, void* act, float* y, cudaStream_t stream,
                        const int32_t* active) {
  const int64_t hidden = x.cols();
  const dim3 grid1(static_cast<unsigned>((inter + cols_per_block<true>() - 1) / cols_per_block<true>()),
                   static_cast<unsigned>(experts));
  const dim3 grid2(static_cast<unsigned>((hidden + cols_per_block<false>() - 1) / cols_per_block<false>()),
                   static_cast<unsigned>(experts));
  const int n_i = static_cast<int>(inter), n_h = static_cast<int>(hidden);
  auto codes = [](const void* const* p) { return reinterpret_cast<const uint8_t* const*>(p); };
  auto scales = [](const void* const* p) { return reinterpret_cast<const float* const*>(p); };
  moe_small_gemm_fp8_kernel<true, kVec>
      <<<grid1, kWarps * 32, 0, stream>>>(x.ptr<const __nv_bfloat16>(), src_token, offsets, codes(t.gate), codes(t.up),
                                          scales(t.gate_scale), scales(t.up_scale), n_i, n_h, act, active);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  moe_small_gemm_fp8_kernel<false, kVec>
      <<<grid2, kWarps * 32, 0, stream>>>(static_cast<const __nv_bfloat16*>(act), nullptr, offsets, codes(t.down),
                                          nullptr, scales(t.down_scale), nullptr, n_h, n_i, y, active);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_rowwise_gemms_fp8(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                         int count, const Fp8ExpertTables& tables, int64_t inter, bool vectorized,
                                         void* act, float* y, cudaStream_t stream, const int32_t* active,
                                         int max_active) {
  const int64_t hidden = x.cols();
  if (count == 0) return cudaSuccess;
  if (count > 65535 || x.dtype != DType::BF16 || (vectorized && (hidden % 8 != 0 || inter % 8 != 0)))
    return cudaErrorInvalidValue;
  if (active && (max_active < 1 || max_active > count)) return cudaErrorInvalidValue;
  const int experts = active ? max_active : count;  // grid rows
  return vectorized ? launch_both<true>(x, src_token, offsets, experts, tables, inter, act, y, stream, active)
                    : launch_both<false>(x, src_token, offsets, experts, tables, inter, act, y, stream, active);
}

}  // namespace cpinfer::cuda
