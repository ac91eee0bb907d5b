// out = a · wᵀ for one or two rows (decode: M <= kSkinnyMaxRows; up to kSkinnyFp8QuantizedMaxRows on
// the quantized FP8 path below), BF16 a, fp32 accumulation, BF16 or F32 out; w BF16 or FP8 (e4m3
// codes + one F32 scale per 128 x 128 block, W = code · scale: the codes are read as they are, 1
// byte per weight). At such M a GEMM is a read of w, once: each warp streams C rows of w through
// warp_dots (gemv.cuh: a pass of copies in flight before the first multiply) and reduces across the
// warp. One launch may cover up to kSkinnyMaxSegs products of the same a and weight format (q, k
// and v of a decode step): the warps are numbered across the segments, so the small ones (k, v:
// 2 MB in BF16) share the grid with the large one instead of each paying a launch and a
// latency-bound tail. cuBLAS's kernels for these shapes read w at a fraction of the bandwidth.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8_mma.cuh"
#include "backends/cuda/kernels/gemv.cuh"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

constexpr int kWarps = 4;

struct Segs {
  const void* w[kSkinnyMaxSegs];
  const float* scale[kSkinnyMaxSegs];  // FP8: the weight's [ceil(N/128), ceil(K/128)] block scales
  void* out[kSkinnyMaxSegs];
  int n[kSkinnyMaxSegs];
  int warp_end[kSkinnyMaxSegs];  // prefix sums of the segments' warp counts
  int count;
};

template <class T>
__device__ __forceinline__ T pick(const T (&v)[kSkinnyMaxSegs], int i) {
  T r = v[0];  // constant indices: the parameters stay in the constant bank
#pragma unroll
  for (int s = 1; s < kSkinnyMaxSegs; ++s)
    if (i == s) r = v[s];
  return r;
}

// Global warp gw's segment, the segment's first warp, and whether gw has rows (the last block's
// spare warps only join the barriers).
struct WarpSeg {
  int seg, first;
  bool active;
};
__device__ __forceinline__ WarpSeg warp_segment(const Segs& s, int gw) {
  int seg = 0;
#pragma unroll
  for (int i = 0; i + 1 < kSkinnyMaxSegs; ++i)
    if (i + 1 < s.count && gw >= s.warp_end[i]) seg = i + 1;
  return {seg, seg > 0 ? pick(s.warp_end, seg - 1) : 0, gw < pick(s.warp_end, seg)};
}

// Shared memory: a's M rows, then each warp's buffer.
template <class F, int M, int C, int CH>
size_t smem_bytes(int k) {
  return (static_cast<size_t>(M) * k / 8 + static_cast<size_t>(kWarps) * warp_dots_chunks<F, C, CH>()) * 16;
}

template <class F, int M, int C, int CH, class TO>
__global__ void __launch_bounds__(kWarps * 32)
    skinny_gemm_kernel(const __nv_bfloat16* __restrict__ a, const __grid_constant__ Segs s, int m, int k) {
  extern __shared__ uint4 smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = static_cast<int>(blockIdx.x) * kWarps + warp;
  const WarpSeg ws = warp_segment(s, gw);
  const int seg = ws.seg;
  const bool active = ws.active;
  const int n = pick(s.n, seg), n0 = (gw - ws.first) * C, n_cols = active ? min(C, n - n0) : 1;
  const void* const w = pick(s.w, seg);
  const float* const scale = pick(s.scale, seg);
  WeightRows<C> wr;
#pragma unroll
  for (int c = 0; c < C; ++c) wr.template set<F>(c, w, scale, n0 + min(c, n_cols - 1), k);
  const __nv_bfloat16* xr[M];
#pragma unroll
  for (int r = 0; r < M; ++r) xr[r] = a + static_cast<int64_t>(min(r, m - 1)) * k;
  float dot[M][C];
#pragma unroll
  for (int r = 0; r < M; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) dot[r][c] = 0.0f;
  warp_dots<F, M, C, CH>(wr, xr, smem, k, lane, smem + M * (k / 8) + warp * warp_dots_chunks<F, C, CH>(), active, dot);
  if (!active) return;
  TO* const out = static_cast<TO*>(pick(s.out, seg));
#pragma unroll
  for (int r = 0; r < M; ++r) {
    if (r >= m) break;
#pragma unroll
    for (int c = 0; c < C; ++c) dot[r][c] = warp_sum(dot[r][c]);
    if (lane == 0)
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (c < n_cols) out[static_cast<int64_t>(r) * n + n0 + c] = from_f32<TO>(dot[r][c]);
  }
}

// FP8 weights with the activations quantized (quantized = true), on the tensor cores
// (kernels/fp8_mma.cuh): a block's 16 mma rows are 16 rows of one segment's weight (its warps split
// K), the columns the m rows of a in G groups of 8; the tiles are numbered across the segments
// (warp_end counts tiles here).
constexpr int kMmaRows = 16;
template <class TO, int G>
__global__ void __launch_bounds__(fp8mma::max_warps<G>() * 32)
    skinny_fp8_mma_kernel(const __nv_bfloat16* __restrict__ a, const __grid_constant__ Segs s, int m, int k) {
  __shared__ fp8mma::Reduce red;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const int n_warps = static_cast<int>(blockDim.x >> 5);
  const WarpSeg ts = warp_segment(s, static_cast<int>(blockIdx.x));  // the grid is the tiles: all active
  const int seg = ts.seg;
  const int n = pick(s.n, seg), n0 = (static_cast<int>(blockIdx.x) - ts.first) * kMmaRows, kb = k / kFp8Blk;
  const auto* const w = static_cast<const uint8_t*>(pick(s.w, seg));
  const float* const scale = pick(s.scale, seg);
  const int na = min(n0 + g, n - 1), nb = min(n0 + g + 8, n - 1);  // past n: the last row, never written
  const fp8mma::Rows rows{w + static_cast<int64_t>(na) * k, w + static_cast<int64_t>(nb) * k,
                          scale + static_cast<int64_t>(na / kFp8Blk) * kb,
                          scale + static_cast<int64_t>(nb / kFp8Blk) * kb};
  fp8mma::Pass pass;
  fp8mma::load_pass(pass, rows, warp * fp8mma::kChunk, kb, lane);  // the codes are constant: before the wait
  pdl_wait();
  pdl_trigger();
  float acc[G][4];
  const __nv_bfloat16* x[G];  // this lane's activation row g of each group
#pragma unroll
  for (int i = 0; i < G; ++i) {
    acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    const int row = i * fp8mma::kCols + g;
    x[i] = row < m ? a + static_cast<int64_t>(row) * k : nullptr;
  }
  fp8mma::warp_product<G>(rows, kb, x, warp, n_warps, lane, pass, acc);
  if (!fp8mma::block_sum<G>(red, warp, n_warps, lane, acc)) return;
  TO* const out = static_cast<TO*>(pick(s.out, seg));
#pragma unroll
  for (int i = 0; i < G; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = i * fp8mma::kCols + 2 * tq + j;
      if (c >= m) continue;
      if (n0 + g < n) out[static_cast<int64_t>(c) * n + n0 + g] = from_f32<TO>(acc[i][j]);
      if (n0 + g + 8 < n) out[static_cast<int64_t>(c) * n + n0 + g + 8] = from_f32<TO>(acc[i][2 + j]);
    }
}

// Each warp's first pass is loaded before the wait for the previous kernel, which only a resident
// block can do: where the tiles outnumber the blocks the SMs hold at once (q‖k‖v of the 30B-A3B shape:
// 320 tiles of 8 warps, two such blocks an SM), the warps per block are halved until they fit, each
// warp taking more passes.
template <class TO, int G>
cudaError_t launch_mma_g(const __nv_bfloat16* a, const Segs& s, int tiles, int m, int k, cudaStream_t stream) {
  const auto kernel = skinny_fp8_mma_kernel<TO, G>;
  int warps = fp8mma::warps<G>(k), sms = 0;
  cudaError_t err = current_device_sms(sms);
  if (err != cudaSuccess) return err;
  while (warps > 1) {
    int per_sm = 0;
    if ((err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps * 32, 0)) != cudaSuccess)
      return err;
    if (static_cast<int64_t>(per_sm) * sms >= tiles) break;
    warps /= 2;
  }
  return launch_k(kernel, static_cast<unsigned>(tiles), warps * 32, 0, stream, a, s, m, k);
}

template <class TO>
cudaError_t launch_mma(const __nv_bfloat16* a, Segs s, int m, int k, cudaStream_t stream) {
  int tiles = 0;
  for (int i = 0; i < s.count; ++i) s.warp_end[i] = tiles += (s.n[i] + kMmaRows - 1) / kMmaRows;
  static_assert(kSkinnyFp8QuantizedMaxRows == fp8mma::kMaxGroups * fp8mma::kCols, "one or two groups of 8 rows");
  if (m <= fp8mma::kCols) return launch_mma_g<TO, 1>(a, s, tiles, m, k, stream);
  return launch_mma_g<TO, 2>(a, s, tiles, m, k, stream);
}

// Columns per warp and chunks per pass: 16 copies of 16 bytes in flight per lane (BF16: two weight
// rows of K = 2048, or one of 4096; FP8: four rows of 2048 codes, or two of 4096) and 8 KB of
// shared memory per warp. An FP8 chunk holds twice the weights: twice the rows, half the chunks.
template <class F, int M, class TO>
cudaError_t launch_m(const __nv_bfloat16* a, Segs s, int m, int k, cudaStream_t stream) {
  constexpr int kX = F::kPerChunk / 8;
  auto go = [&](auto kernel, int cols, size_t smem) {
    int warps = 0;
    for (int i = 0; i < s.count; ++i) s.warp_end[i] = warps += (s.n[i] + cols - 1) / cols;
    const unsigned grid = static_cast<unsigned>((warps + kWarps - 1) / kWarps);
    return launch_k(kernel, grid, kWarps * 32, smem, stream, a, s, m, k);
  };
  if (k <= 2048) return go(skinny_gemm_kernel<F, M, 2 * kX, 8 / kX, TO>, 2 * kX, smem_bytes<F, M, 2 * kX, 8 / kX>(k));
  return go(skinny_gemm_kernel<F, M, kX, 16 / kX, TO>, kX, smem_bytes<F, M, kX, 16 / kX>(k));
}

template <class F>
cudaError_t launch_f(const DevTensor& a, const Segs& s, DType out_dtype, cudaStream_t stream) {
  const int m = static_cast<int>(a.rows()), k = static_cast<int>(a.cols());
  const auto* ap = a.ptr<const __nv_bfloat16>();
  static_assert(kSkinnyMaxRows <= 2, "instantiate the row counts up to kSkinnyMaxRows");
  if (out_dtype == DType::F32)
    return m <= 1 ? launch_m<F, 1, float>(ap, s, m, k, stream) : launch_m<F, 2, float>(ap, s, m, k, stream);
  return m <= 1 ? launch_m<F, 1, __nv_bfloat16>(ap, s, m, k, stream)
                : launch_m<F, 2, __nv_bfloat16>(ap, s, m, k, stream);
}

}  // namespace

bool skinny_gemm_supported(const DevTensor& a, const DevTensor& w, const DevTensor& out, int64_t max_rows) {
  // K bounded by the shared memory that holds a's rows (kSkinnyMaxRows x 16K BF16 = 64 KB); FP8
  // codes come 16 to a chunk.
  const int64_t k_align = w.dtype == DType::F8E4M3 ? 16 : 8;
  return a.dtype == DType::BF16 && (w.dtype == DType::BF16 || w.dtype == DType::F8E4M3) &&
         (out.dtype == DType::BF16 || out.dtype == DType::F32) && a.ndim == 2 && w.ndim == 2 && a.rows() >= 1 &&
         a.rows() <= max_rows && a.cols() % k_align == 0 && a.cols() == w.cols() && a.cols() <= 16384 &&
         w.dim(0) <= (int64_t{1} << 30) && aligned16(a.data) && aligned16(w.data);
}

cudaError_t launch_skinny_gemms(const DevTensor& a, const DevTensor* w, const DevTensor* scale, DevTensor* out,
                                int count, cudaStream_t stream, bool quantized) {
  if (count < 1 || count > kSkinnyMaxSegs) return cudaErrorInvalidValue;
  const bool fp8 = w[0].dtype == DType::F8E4M3;
  Segs s{};
  int64_t cols = 0;
  const int64_t max_rows = quantized ? kSkinnyFp8QuantizedMaxRows : kSkinnyMaxRows;
  for (int i = 0; i < count; ++i) {
    if (!skinny_gemm_supported(a, w[i], out[i], max_rows) || out[i].dtype != out[0].dtype || w[i].dtype != w[0].dtype ||
        (fp8 && (scale == nullptr || scale[i].data == nullptr)))
      return cudaErrorInvalidValue;
    s.w[i] = w[i].data;
    s.scale[i] = fp8 ? scale[i].ptr<const float>() : nullptr;
    s.out[i] = out[i].data;
    s.n[i] = static_cast<int>(w[i].dim(0));
    cols += w[i].dim(0);
  }
  s.count = count;
  if (cols == 0 || a.cols() == 0) return cols == 0 ? cudaSuccess : cudaErrorInvalidValue;
  if (cols > (int64_t{1} << 30)) return cudaErrorInvalidValue;
  if (quantized) {
    if (!fp8 || !skinny_fp8_quantized_supported(a.cols())) return cudaErrorInvalidValue;
    const int m = static_cast<int>(a.rows()), k = static_cast<int>(a.cols());
    const auto* ap = a.ptr<const __nv_bfloat16>();
    return out[0].dtype == DType::F32 ? launch_mma<float>(ap, s, m, k, stream)
                                      : launch_mma<__nv_bfloat16>(ap, s, m, k, stream);
  }
  return fp8 ? launch_f<Fp8Weights>(a, s, out[0].dtype, stream) : launch_f<Bf16Weights>(a, s, out[0].dtype, stream);
}

bool skinny_fp8_quantized_supported(int64_t k) { return fp8mma::supported(k); }

cudaError_t launch_skinny_gemm(const DevTensor& a, const DevTensor& w, const DevTensor* scale, DevTensor out,
                               cudaStream_t stream, bool quantized) {
  return launch_skinny_gemms(a, &w, scale, &out, 1, stream, quantized);
}

}  // namespace cpinfer::cuda
