// Row-wise and element-wise kernels: embedding, (add +) RMSNorm, SiLU·mul, add, convert, gather and
// scatter of rows. Each has a 16-byte vector path (taken when the row length is a multiple of 8
// elements and every pointer is 16-byte aligned) and a scalar path for odd shapes.
#include <algorithm>
#include <atomic>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/norm.cuh"

namespace cpinfer::cuda {
namespace {

// ---- RMSNorm, optionally fused with the residual add. One block per row (row_threads); pass
// 1 forms the (rounded) residual and the sum of squares, pass 2 re-reads the same elements it wrote.
// The arithmetic is norm.cuh's, which the kernels that fuse this op use too.
template <class TX, class TR, class TW, class TO, bool kVec, bool kResidual>
__global__ void rms_norm_kernel(TR* __restrict__ residual, const TX* __restrict__ x, const TW* __restrict__ w,
                                TO* __restrict__ out, int64_t cols, float eps) {
  pdl_wait();
  pdl_trigger();
  const int64_t row = blockIdx.x;
  const TX* xr = x + row * cols;
  TR* rr = kResidual ? residual + row * cols : nullptr;
  TO* orow = out + row * cols;
  const int64_t units = kVec ? cols / 8 : cols;
  const float inv = rms_inverse(row_sum_squares(units, static_cast<int>(blockDim.x),
                                                [&](int64_t u, float& ss) {
                                                  if constexpr (kVec) {
                                                    const int64_t c = u * 8;
                                                    float v[8];
                                                    load8(xr + c, v);
                                                    if constexpr (kResidual) {
                                                      residual_sum8(rr + c, v);
                                                      store8(rr + c, v);
                                                    }
                                                    add_squares8(ss, v);
                                                  } else {
                                                    float v = to_f32<TX>(xr[u]);
                                                    if constexpr (kResidual) {
                                                      v = residual_sum1(rr + u, v);
                                                      rr[u] = from_f32<TR>(v);
                                                    }
                                                    ss += v * v;
                                                  }
                                                }),
                                cols, eps);
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8];
      if constexpr (kResidual)
        load8(rr + c, v);
      else
        load8(xr + c, v);
      norm_store8(orow + c, v, w + c, inv);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      norm_store1(orow + c, kResidual ? to_f32<TR>(rr[c]) : to_f32<TX>(xr[c]), w + c, inv);
  }
}

template <class TS, class TO, bool kVec>
__global__ void gather_convert_kernel(const TS* __restrict__ src, const int32_t* __restrict__ idx, int64_t n_src,
                                      TO* __restrict__ out, int64_t cols) {
  pdl_wait();
  pdl_trigger();
  const int64_t row = blockIdx.x;
  const int64_t s = idx[row];
  const bool ok = s >= 0 && s < n_src;  // an out-of-range id yields a zero row, never a fault
  TO* o = out + row * cols;
  const TS* in = src + (ok ? s : 0) * cols;
  if constexpr (kVec) {
    for (int64_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
      float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (ok) load8(in + c, v);
      store8(o + c, v);
    }
  } else {
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) o[c] = from_f32<TO>(ok ? to_f32<TS>(in[c]) : 0.0f);
  }
}

// ---- raw row copies for gather/scatter of any dtype: `words` units of type W per row.
template <class W, bool kScatter>
__global__ void move_rows_kernel(const W* __restrict__ src, const int32_t* __restrict__ idx, int64_t n_other,
                                 W* __restrict__ out, int64_t words) {
  pdl_wait();
  pdl_trigger();
  const int64_t i = blockIdx.x;
  const int64_t j = idx[i];
  const bool ok = j >= 0 && j < n_other;
  if (kScatter) {
    if (!ok) return;
    const W* s = src + i * words;
    W* o = out + j * words;
    for (int64_t c = threadIdx.x; c < words; c += blockDim.x) o[c] = s[c];
  } else {
    W* o = out + i * words;
    const W* s = src + (ok ? j : 0) * words;
    for (int64_t c = threadIdx.x; c < words; c += blockDim.x) o[c] = ok ? s[c] : W{};
  }
}

// ---- flat element-wise ops over n elements (grid-stride).
enum class EwOp { SiluMul, Add, Convert };

template <EwOp kOp, class TA, class TB, class TO, bool kVec>
__global__ void elementwise_kernel(const TA* __restrict__ a, const TB* __restrict__ b, TO* out, int64_t n) {
  pdl_wait();
  pdl_trigger();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  auto apply = [](float x, float y) {
    if constexpr (kOp == EwOp::SiluMul)
      return x / (1.0f + __expf(-x)) * y;
    else if constexpr (kOp == EwOp::Add)
      return x + y;
    else
      return x;
  };
  if constexpr (kVec) {
    for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8; i < n; i += stride * 8) {
      float x[8], y[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      load8(a + i, x);
      if constexpr (kOp != EwOp::Convert) load8(b + i, y);
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = apply(x[k], y[k]);
      store8(out + i, x);
    }
  } else {
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
      float y = 0.0f;
      if constexpr (kOp != EwOp::Convert) y = to_f32<TB>(b[i]);
      out[i] = from_f32<TO>(apply(to_f32<TA>(a[i]), y));
    }
  }
}

template <EwOp kOp, class TA, class TB, class TO>
cudaError_t run_elementwise(const void* a, const void* b, void* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool vec = n % 8 == 0 && aligned16(a) && (b == nullptr || aligned16(b)) && aligned16(out);
  constexpr int kThreads = 256;
  if (vec) {
    launch_k(elementwise_kernel<kOp, TA, TB, TO, true>, grid_1d(n / 8, kThreads), kThreads, 0, stream,
             static_cast<const TA*>(a), static_cast<const TB*>(b), static_cast<TO*>(out), n);
  } else {
    launch_k(elementwise_kernel<kOp, TA, TB, TO, false>, grid_1d(n, kThreads), kThreads, 0, stream,
             static_cast<const TA*>(a), static_cast<const TB*>(b), static_cast<TO*>(out), n);
  }
  return cudaGetLastError();
}

}  // namespace

namespace {
std::atomic<bool> g_programmatic_launch{false};
}  // namespace
void set_programmatic_launch(bool on) { g_programmatic_launch.store(on, std::memory_order_relaxed); }
bool programmatic_launch() { return g_programmatic_launch.load(std::memory_order_relaxed); }

namespace {
__global__ void fill_zero_kernel(uint4* __restrict__ p16, int64_t n16, unsigned char* __restrict__ tail, int n_tail) {
  pdl_wait();  // earlier kernels may still read the buffer
  pdl_trigger();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride)
    p16[i] = make_uint4(0, 0, 0, 0);
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < n_tail) tail[threadIdx.x] = 0;
}
}  // namespace

cudaError_t launch_fill_zero(void* p, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return cudaSuccess;
  // A 16-byte aligned head of whole 16-byte words and a tail of fewer than 16 bytes.
  if (!aligned16(p)) return cudaMemsetAsync(p, 0, bytes, stream);
  const int64_t n16 = static_cast<int64_t>(bytes / 16);
  constexpr int kThreads = 256;
  launch_k(fill_zero_kernel, grid_1d(std::max<int64_t>(n16, 1), kThreads), kThreads, 0, stream, static_cast<uint4*>(p),
           n16, static_cast<unsigned char*>(p) + n16 * 16, static_cast<int>(bytes % 16));
  return cudaGetLastError();
}

cudaError_t launch_rms_norm(DevTensor residual, const DevTensor& x, const DevTensor& w, float eps, DevTensor out,
                            cudaStream_t stream) {
  const int64_t rows = x.rows(), cols = x.cols();
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool has_res = residual.defined();
  const bool vec = cols % 8 == 0 && aligned16(x.data) && aligned16(w.data) && aligned16(out.data) &&
                   (!has_res || aligned16(residual.data));
  const int threads = row_threads(vec ? cols / 8 : cols);
  CPI_DISPATCH_ACT(
      x.dtype, "rms_norm x", TX, CPI_DISPATCH_FLOAT(w.dtype, "rms_norm weight", TW, {
        using TR = TX;
        using TO = TX;
        auto* r = static_cast<TR*>(residual.data);
        auto* xp = static_cast<const TX*>(x.data);
        auto* wp = static_cast<const TW*>(w.data);
        auto* op = static_cast<TO*>(out.data);
        const unsigned grid = static_cast<unsigned>(rows);
        if (has_res && vec)
          launch_k(rms_norm_kernel<TX, TR, TW, TO, true, true>, grid, threads, 0, stream, r, xp, wp, op, cols, eps);
        else if (has_res)
          launch_k(rms_norm_kernel<TX, TR, TW, TO, false, true>, grid, threads, 0, stream, r, xp, wp, op, cols, eps);
        else if (vec)
          launch_k(rms_norm_kernel<TX, TR, TW, TO, true, false>, grid, threads, 0, stream, r, xp, wp, op, cols, eps);
        else
          launch_k(rms_norm_kernel<TX, TR, TW, TO, false, false>, grid, threads, 0, stream, r, xp, wp, op, cols, eps);
      }));
  return cudaGetLastError();
}

cudaError_t launch_embedding(const DevTensor& table, const DevTensor& ids, DevTensor out, cudaStream_t stream) {
  const int64_t rows = out.rows(), cols = out.cols();
  if (rows == 0 || cols == 0) return cudaSuccess;
  const bool vec = cols % 8 == 0 && aligned16(table.data) && aligned16(out.data);
  const int threads = row_threads(vec ? cols / 8 : cols);
  CPI_DISPATCH_FLOAT(
      table.dtype, "embedding table", TS, CPI_DISPATCH_ACT(out.dtype, "embedding out", TO, {
        auto* s = static_cast<const TS*>(table.data);
        auto* o = static_cast<TO*>(out.data);
        const auto* id = ids.ptr<const int32_t>();
        if (vec)
          launch_k(gather_convert_kernel<TS, TO, true>, rows, threads, 0, stream, s, id, table.rows(), o, cols);
        else
          launch_k(gather_convert_kernel<TS, TO, false>, rows, threads, 0, stream, s, id, table.rows(), o, cols);
      }));
  return cudaGetLastError();
}

namespace {
template <bool kScatter>
cudaError_t move_rows(const DevTensor& src, const DevTensor& idx, DevTensor out, int64_t n_other, cudaStream_t stream) {
  const int64_t n = idx.numel();
  const size_t row_bytes = src.row_bytes();
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  const bool vec = row_bytes % 16 == 0 && aligned16(src.data) && aligned16(out.data);
  const auto* id = idx.ptr<const int32_t>();
  if (vec) {
    const int64_t words = static_cast<int64_t>(row_bytes / 16);
    launch_k(move_rows_kernel<uint4, kScatter>, n, row_threads(words), 0, stream, static_cast<const uint4*>(src.data),
             id, n_other, static_cast<uint4*>(out.data), words);
  } else if (row_bytes % 4 == 0) {
    const int64_t words = static_cast<int64_t>(row_bytes / 4);
    launch_k(move_rows_kernel<uint32_t, kScatter>, n, row_threads(words), 0, stream,
             static_cast<const uint32_t*>(src.data), id, n_other, static_cast<uint32_t*>(out.data), words);
  } else {
    const int64_t words = static_cast<int64_t>(row_bytes / 2 * 2 == row_bytes ? row_bytes / 2 : 0);
    if (words > 0) {
      launch_k(move_rows_kernel<uint16_t, kScatter>, n, row_threads(words), 0, stream,
               static_cast<const uint16_t*>(src.data), id, n_other, static_cast<uint16_t*>(out.data), words);
    } else {
      launch_k(move_rows_kernel<uint8_t, kScatter>, n, row_threads(static_cast<int64_t>(row_bytes)), 0, stream,
               static_cast<const uint8_t*>(src.data), id, n_other, static_cast<uint8_t*>(out.data),
               static_cast<int64_t>(row_bytes));
    }
  }
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_gather_rows(const DevTensor& src, const DevTensor& idx, DevTensor out, cudaStream_t stream) {
  return move_rows<false>(src, idx, out, src.rows(), stream);
}

cudaError_t launch_scatter_rows(const DevTensor& src, const DevTensor& idx, DevTensor out, cudaStream_t stream) {
  return move_rows<true>(src, idx, out, out.rows(), stream);
}

cudaError_t launch_silu_mul(const DevTensor& gate, const DevTensor& up, DevTensor out, cudaStream_t stream) {
  // gate, up and out share one dtype (checked by the back-end).
  CPI_DISPATCH_ACT(gate.dtype, "silu_mul", T, {
    return run_elementwise<EwOp::SiluMul, T, T, T>(gate.data, up.data, out.data, out.numel(), stream);
  });
  return cudaGetLastError();
}

cudaError_t launch_add(DevTensor a, const DevTensor& b, cudaStream_t stream) {
  CPI_DISPATCH_ACT(a.dtype, "add", T,
                   { return run_elementwise<EwOp::Add, T, T, T>(a.data, b.data, a.data, a.numel(), stream); });
  return cudaGetLastError();
}

cudaError_t launch_convert(const DevTensor& src, DevTensor dst, cudaStream_t stream) {
  CPI_DISPATCH_FLOAT(src.dtype, "convert src", TA, CPI_DISPATCH_FLOAT(dst.dtype, "convert dst", TO, {
                       return run_elementwise<EwOp::Convert, TA, float, TO>(src.data, nullptr, dst.data, src.numel(),
                                                                            stream);
                     }));
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
