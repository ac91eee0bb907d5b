// Fine-grained FP8 kernels outside the GEMMs: the per-(row, 128-column block) activation quantizer
// the block-scaled GEMMs read, the weight dequantizer of the fallback path and the copy of weight
// scales into cuBLASLt's padded layout. (The decode-sized product on the codes is skinny_gemm.cu's,
// the experts' moe_rowwise.cu's.)
#include <algorithm>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

// A warp per row and grid row blockIdx.y's share of its passes (a pass quantizes whole blocks, so
// the passes are independent): few rows (decode) spread each row over several warps, instead of
// one warp walking a 2048-column row in 8 dependent round trips. A pass covers 512 bytes of the
// row: lane l holds 16 bytes (kPer = 8 BF16 or 4 F32 values), so a 128-column block is kLanes = 16
// (BF16) or 32 (F32) consecutive lanes and its amax a reduction over them. The row's expert segment
// (binary search over offsets) is found once per row, not per block.
template <class T>
__global__ void __launch_bounds__(256)
    fp8_quantize_rows_kernel(const T* __restrict__ src, int64_t m, int kb_count, uint8_t* __restrict__ q,
                             float* __restrict__ scales, const int32_t* __restrict__ offsets, int count,
                             Fp8ActScales layout, int passes_per_warp) {
  constexpr int kPer = 16 / sizeof(T);
  constexpr int kLanes = kFp8Blk / kPer;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (r >= m) return;
  int64_t s_base, s_rows, s_r;  // the scale group of the row: first scale, its rows, the row in it
  if (offsets != nullptr) {
    if (r >= __ldg(offsets + count)) return;                            // past the rows this call has
    const int e = expert_of_tile(offsets, count, static_cast<int>(r));  // largest e with offsets[e] <= r
    const int64_t b = __ldg(offsets + e);
    s_base = fp8_segment_scale_base(b, e, kb_count);
    s_rows = __ldg(offsets + e + 1) - b;
    s_r = r - b;
  } else {
    s_base = 0;
    s_rows = m;
    s_r = r;
  }
  const int64_t k = static_cast<int64_t>(kb_count) * kFp8Blk;
  const T* const row = src + r * k;
  uint8_t* const qrow = q + r * k;
  const int n_pass = (kb_count * kLanes + 31) / 32;
  const int p0 = static_cast<int>(blockIdx.y) * passes_per_warp, p1 = min(n_pass, p0 + passes_per_warp);
#pragma unroll 2
  for (int p = p0; p < p1; ++p) {
    const int kb = (p * 32 + lane) / kLanes;  // this lane's block
    const bool active = kb < kb_count;        // F32 rows: every lane; BF16 rows of an odd kb_count: half
    const int64_t col = static_cast<int64_t>(p) * 32 * kPer + lane * kPer;
    float v[kPer];
    if (active) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + col);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = to_f32<T>(e[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = 0.0f;
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) amax = fmaxf(amax, fabsf(v[i]));  // (fmaxf drops NaN; the NaN's code stays NaN)
#pragma unroll
    for (int o = kLanes / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (!active) continue;
    const float s = fp8_block_scale(amax);
    uint32_t packed[kPer / 4];
#pragma unroll
    for (int w = 0; w < kPer / 4; ++w) {
      packed[w] = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) packed[w] |= static_cast<uint32_t>(f32_to_e4m3(v[4 * w + i] / s)) << (8 * i);
    }
    if constexpr (kPer == 8)
      *reinterpret_cast<uint2*>(qrow + col) = make_uint2(packed[0], packed[1]);
    else
      *reinterpret_cast<uint32_t*>(qrow + col) = packed[0];
    if (lane % kLanes == 0) scales[s_base + fp8_act_scale_index(s_r, kb, s_rows, kb_count, layout)] = s;
  }
}

template <class TO>
__global__ void fp8_dequantize_kernel(const uint8_t* __restrict__ codes, const float* __restrict__ scale, int64_t n,
                                      int64_t k, TO* __restrict__ out) {
  const int64_t sk = (k + kFp8Blk - 1) / kFp8Blk;
  const int64_t total = n * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k, c = i - r * k;
    const float2 f = fp8x2_to_f32(codes[i]);  // the low byte: this code
    out[i] = from_f32<TO>(f.x * __ldg(scale + (r / kFp8Blk) * sk + c / kFp8Blk));
  }
}

__global__ void fp8_pad_scales_kernel(const float* __restrict__ single, const void* const* __restrict__ table,
                                      int count, int64_t rows, int64_t cols, float* __restrict__ dst, int64_t ld) {
  const int64_t per = rows * ld, total = per * count;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / per, j = i - e * per, r = j / ld, c = j - r * ld;
    const float* src = table ? static_cast<const float*>(table[e]) : single;
    dst[i] = c < cols ? src[r * cols + c] : 0.0f;  // the padding is never a block of the operand
  }
}

}  // namespace

cudaError_t launch_fp8_quantize_rows(const DevTensor& src, uint8_t* q, float* scales, const int32_t* offsets, int count,
                                     cudaStream_t stream, Fp8ActScales layout) {
  const int64_t m = src.rows(), k = src.cols();
  if (k % kFp8Blk != 0 || !aligned16(src.data) || (offsets != nullptr && count < 1)) return cudaErrorInvalidValue;
  if (m == 0 || k == 0) return cudaSuccess;
  const int kb_count = static_cast<int>(k / kFp8Blk);
  constexpr int kThreads = 256;  // a warp per row (and share of its passes)
  // Rows past ~4K fill the GPU with a warp each; fewer rows split their passes over grid rows
  // (passes of 512 bytes: 2 BF16 blocks, 1 F32 block).
  const int64_t n_pass = static_cast<int64_t>((src.row_bytes() + 511) / 512);  // the kernel's n_pass
  const int64_t splits = std::clamp<int64_t>(4096 / m, 1, std::min<int64_t>(n_pass, 65535));
  const int per_warp = static_cast<int>((n_pass + splits - 1) / splits);
  const dim3 grid(static_cast<unsigned>((m + kThreads / 32 - 1) / (kThreads / 32)),
                  static_cast<unsigned>((n_pass + per_warp - 1) / per_warp));
  CPI_DISPATCH_ACT(src.dtype, "fp8 quantize src", T, {
    fp8_quantize_rows_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(src.data), m, kb_count, q, scales,
                                                               offsets, count, layout, per_warp);
  });
  return cudaGetLastError();
}

cudaError_t launch_fp8_dequantize(const DevTensor& codes, const DevTensor& scale, DevTensor out, cudaStream_t stream) {
  const int64_t n = codes.dim(0), k = codes.dim(1);
  if (n * k == 0) return cudaSuccess;
  const auto* cp = codes.ptr<const uint8_t>();
  const auto* sp = scale.ptr<const float>();
  CPI_DISPATCH_ACT(out.dtype, "fp8 dequantize out", TO, {
    fp8_dequantize_kernel<TO><<<grid_1d(n * k, 256), 256, 0, stream>>>(cp, sp, n, k, static_cast<TO*>(out.data));
  });
  return cudaGetLastError();
}

cudaError_t launch_fp8_pad_scales(const float* single, const void* const* table, int count, int64_t rows, int64_t cols,
                                  float* dst, int64_t ld, cudaStream_t stream) {
  if (ld < cols || count < 0 || (table == nullptr && count != 1)) return cudaErrorInvalidValue;
  if (rows * ld * count == 0) return cudaSuccess;
  fp8_pad_scales_kernel<<<grid_1d(rows * ld * count, 256), 256, 0, stream>>>(single, table, count, rows, cols, dst, ld);
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
