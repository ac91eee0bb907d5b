// out = a · wᵀ for one or two rows (decode: M <= kSkinnyMaxRows), BF16 a and w, fp32 accumulation, BF16
// or F32 out. At such M a GEMM is a read of w, once: each warp streams kCols rows of w by 16-byte
// loads (two steps in flight), multiplies them with all M rows of a (which stay in L1) and reduces
// across the warp. cuBLAS's kernels for these shapes read w at a fraction of the bandwidth, and the
// small projections of a decode step (k, v, the router: 0.5-2 MB) are bound by their latency.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kCols = 2;  // output columns per warp
constexpr int kColsPerBlock = kWarps * kCols;

template <int M, class TO>
__global__ void __launch_bounds__(kWarps * 32)
    skinny_gemm_kernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ w, TO* __restrict__ out,
                       int m, int n, int k) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * kColsPerBlock + warp * kCols;
  if (n0 >= n) return;
  const int n_cols = min(kCols, n - n0);
  const __nv_bfloat16* wr[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) wr[c] = w + static_cast<int64_t>(n0 + min(c, n_cols - 1)) * k;  // uniform loads
  float dot[M][kCols];
#pragma unroll
  for (int r = 0; r < M; ++r)
#pragma unroll
    for (int c = 0; c < kCols; ++c) dot[r][c] = 0.0f;
#pragma unroll 2
  for (int kk = lane * 8; kk < k; kk += 32 * 8) {
    float wv[kCols][8];
#pragma unroll
    for (int c = 0; c < kCols; ++c) load8(wr[c] + kk, wv[c]);
#pragma unroll
    for (int r = 0; r < M; ++r) {
      if (r >= m) break;
      float xv[8];
      load8(a + static_cast<int64_t>(r) * k + kk, xv);
#pragma unroll
      for (int c = 0; c < kCols; ++c)
#pragma unroll
        for (int i = 0; i < 8; ++i) dot[r][c] += xv[i] * wv[c][i];
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
    if (r >= m) break;
#pragma unroll
    for (int c = 0; c < kCols; ++c) dot[r][c] = warp_sum(dot[r][c]);
    if (lane == 0)
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (c < n_cols) out[static_cast<int64_t>(r) * n + n0 + c] = from_f32<TO>(dot[r][c]);
  }
}

template <int M>
cudaError_t launch_m(const DevTensor& a, const DevTensor& w, DevTensor out, cudaStream_t stream) {
  const int m = static_cast<int>(a.rows()), k = static_cast<int>(a.cols()), n = static_cast<int>(w.dim(0));
  const unsigned grid = static_cast<unsigned>((n + kColsPerBlock - 1) / kColsPerBlock);
  const auto* ap = a.ptr<const __nv_bfloat16>();
  const auto* wp = w.ptr<const __nv_bfloat16>();
  if (out.dtype == DType::F32)
    skinny_gemm_kernel<M, float><<<grid, kWarps * 32, 0, stream>>>(ap, wp, out.ptr<float>(), m, n, k);
  else
    skinny_gemm_kernel<M, __nv_bfloat16><<<grid, kWarps * 32, 0, stream>>>(ap, wp, out.ptr<__nv_bfloat16>(), m, n, k);
  return cudaGetLastError();
}

}  // namespace

bool skinny_gemm_supported(const DevTensor& a, const DevTensor& w, const DevTensor& out) {
  return a.dtype == DType::BF16 && w.dtype == DType::BF16 && (out.dtype == DType::BF16 || out.dtype == DType::F32) &&
         a.ndim == 2 && w.ndim == 2 && a.rows() >= 1 && a.rows() <= kSkinnyMaxRows && a.cols() % 8 == 0 &&
         a.cols() == w.cols() && a.cols() <= (int64_t{1} << 30) && w.dim(0) <= (int64_t{1} << 30) &&
         aligned16(a.data) && aligned16(w.data);
}

cudaError_t launch_skinny_gemm(const DevTensor& a, const DevTensor& w, DevTensor out, cudaStream_t stream) {
  if (!skinny_gemm_supported(a, w, out)) return cudaErrorInvalidValue;
  const int64_t m = a.rows();
  if (w.dim(0) == 0) return cudaSuccess;
  static_assert(kSkinnyMaxRows <= 2, "instantiate the row counts up to kSkinnyMaxRows");
  return m <= 1 ? launch_m<1>(a, w, out, stream) : launch_m<2>(a, w, out, stream);
}

}  // namespace cpinfer::cuda
