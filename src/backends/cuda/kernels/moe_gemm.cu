// Grouped expert GEMMs for MoE prefill, scheduled on the device (no host synchronization).
//
// The rows routed to the local experts are grouped per expert by moe_permute: expert e owns rows
// [offsets[e], offsets[e+1]) and M-tiles [tile_start[e], tile_start[e+1]) (ceil(rows / kTileM)
// each, prefix-summed by the same kernel). The host only knows an upper bound on the tile count
// (ceil(n_pairs / kTileM) + count), so the grid is sized by it: grid.y = M-tile slot, grid.x =
// N-tile (fastest, so the CTAs that share an A tile and one expert's weights run together and hit
// L2). A CTA finds its expert by binary search over tile_start; CTAs past the last tile exit.
//
// Kernel 1 (kGateUp): A = x rows gathered through src_token (the gather is fused into the cp.async
// loads, so no permuted copy of x is written), B = gate‖up: the 128-row B tile holds 64 gate rows
// and the same 64 up rows, so every thread owns g and u of the same output elements and writes
// act = silu(bf16(g)) · bf16(u) in BF16 (rounded like the cuBLAS path, whose GEMMs write BF16).
// Kernel 2: A = act rows, B = down, y = act · downᵀ in F32.
//
// Tiles: 128 x 128 x 32, 4-stage cp.async pipeline, 4 warps as 2 (M) x 2 (N), each warp a 64 x 64
// block of m16n8k16 BF16 mma.sync with fp32 accumulators (128 per thread): per k16 step a warp
// issues 8 ldmatrix.x4 for 32 mma, keeping shared-memory reads below the tensor-core rate (by
// estimate; a 64 x 32 warp tile needs 6 per 16 mma, about at the shared-memory limit). Shared rows are
// padded to 40 elements (80 bytes) so the eight 16-byte rows of every ldmatrix hit distinct banks.
// Shared memory: 4 x (128 + 128) x 40 x 2 B = 80 KiB per CTA, two CTAs (8 warps) per SM.
// Requirements (checked by the caller): K (H for kernel 1, I for kernel 2) a multiple of 32, I a
// multiple of 64, 16-byte aligned x / act / weight pointers. N of kernel 2 (H) is masked.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/mma.cuh"
#include "backends/cuda/kernels/moe_gemm_args.cuh"

namespace cpinfer::cuda {
namespace {

constexpr int kTileM = kMoeGemmTileM;  // 128
constexpr int kTileN = 128;            // B rows per tile (kernel 1: 64 gate + 64 up)
constexpr int kTileK = 32;
constexpr int kStages = 4;
constexpr int kLds = kTileK + 8;  // padded shared row, elements
constexpr int kWarpsM = 2, kWarpsN = 2;
constexpr int kThreads = kWarpsM * kWarpsN * 32;
constexpr int kWarpM = kTileM / kWarpsM;  // 64 rows per warp: 4 m16 tiles
constexpr int kWarpN = kTileN / kWarpsN;  // 64 B rows per warp: 8 n8 tiles (kernel 1: 4 gate + 4 up)
constexpr int kMi = kWarpM / 16, kNj = kWarpN / 8;
constexpr int kLoads = kTileM * (kTileK / 8) / kThreads;  // 16-byte chunks per thread per operand: 4
constexpr int kRowStep = kThreads / (kTileK / 8);         // rows between a thread's chunks: 32
constexpr int kStageElems = (kTileM + kTileN) * kLds;
constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageElems * sizeof(__nv_bfloat16);  // 80 KiB

__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads, 2) moe_grouped_gemm_kernel(const MoeGemmArgs args) {
  static_assert(kTileM == kTileN && kLoads * kRowStep == kTileM && kNj % 2 == 0, "tile shape");
  // ---- which (expert, M-tile) this CTA computes: all from device memory
  MoeTile tile;
  if (!moe_tile_of(args.tile_start, args.offsets, args.count, blockIdx.y, kTileM, tile)) return;
  const int e = tile.expert, seg_begin = tile.seg_begin, m0 = tile.m0, rows_left = tile.rows_left;
  const int n0 = blockIdx.x * (kGateUp ? kTileN / 2 : kTileN);
  const int k_dim = args.k_dim;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;

  // ---- per-thread loads: rows ld_row + i * 32 (i < 4), 16-byte chunk tid % 4 of each
  const int ld_row = tid >> 2, ld_chunk = (tid & 3) * 8;
  const __nv_bfloat16* a_src[kLoads];
  const __nv_bfloat16* b_src[kLoads];
  uint32_t a_ok = 0, b_ok = 0;  // bit i: chunk i is inside (else zero-filled)
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int r = ld_row + i * kRowStep;
    const bool ok = r < rows_left;
    int64_t a_row = 0;
    if (ok) a_row = kGateUp ? __ldg(args.src_token + seg_begin + m0 + r) : seg_begin + m0 + r;
    a_src[i] = args.a + a_row * k_dim + ld_chunk;
    a_ok |= static_cast<uint32_t>(ok) << i;
    if constexpr (kGateUp) {  // B rows 0..63: gate rows n0.., 64..127: up rows n0.. (I % 64 == 0)
      const __nv_bfloat16* w = r < kTileN / 2 ? args.w1[e] : args.w2[e];
      b_src[i] = w + static_cast<int64_t>(n0 + (r & (kTileN / 2 - 1))) * k_dim + ld_chunk;
      b_ok |= 1u << i;
    } else {
      const int n = n0 + r;
      const bool nok = n < args.n_out;
      b_src[i] = args.w1[e] + static_cast<int64_t>(nok ? n : 0) * k_dim + ld_chunk;
      b_ok |= static_cast<uint32_t>(nok) << i;
    }
  }
  auto load_stage = [&](int stage, int kt) {
    __nv_bfloat16* sa = smem + stage * kStageElems;
    __nv_bfloat16* sb = sa + kTileM * kLds;
    const int k0 = kt * kTileK;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int r = ld_row + i * kRowStep;
      cp_async16(sa + r * kLds + ld_chunk, a_src[i] + k0, (a_ok >> i) & 1);
      cp_async16(sb + r * kLds + ld_chunk, b_src[i] + k0, (b_ok >> i) & 1);
    }
  };

  float acc[kMi][kNj][4];
#pragma unroll
  for (int i = 0; i < kMi; ++i)
#pragma unroll
    for (int j = 0; j < kNj; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

  const int n_k = k_dim / kTileK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_k) load_stage(s, s);
    cp_async_commit();
  }

  // ldmatrix lane offsets. A (16 x 16 at rows wm*64 + i*16): lane -> row lane%16, column (lane/16)*8.
  // B (two n8 tiles x k16 per x4): lane -> n (lane%8) + (lane/16)*8, k ((lane/8)%2)*8. Kernel 1's
  // warp takes gate rows wn*32.. (n8 tiles 0..3) and the same up rows 64 + wn*32.. (tiles 4..7).
  const int a_off = (wm * kWarpM + (lane & 15)) * kLds + (lane >> 4) * 8;
  int b_off[kNj / 2];
#pragma unroll
  for (int p = 0; p < kNj / 2; ++p) {
    const int brow =
        kGateUp ? (p / (kNj / 4)) * (kTileN / 2) + wn * (kWarpN / 2) + (p % (kNj / 4)) * 16 : wn * kWarpN + p * 16;
    b_off[p] = (brow + (lane & 7) + ((lane >> 4) << 3)) * kLds + ((lane >> 3) & 1) * 8;
  }

  for (int kt = 0; kt < n_k; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt is visible; stage (kt - 1) % kStages is free to overwrite
    {
      const int next = kt + kStages - 1;
      if (next < n_k) load_stage(next % kStages, next);
      cp_async_commit();
    }
    const __nv_bfloat16* sa = smem + (kt % kStages) * kStageElems;
    const __nv_bfloat16* sb = sa + kTileM * kLds;
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      uint32_t af[kMi][4], bfr[kNj / 2][4];
#pragma unroll
      for (int i = 0; i < kMi; ++i) ldmatrix_x4(af[i], sa + a_off + i * 16 * kLds + kk);
#pragma unroll
      for (int p = 0; p < kNj / 2; ++p) ldmatrix_x4(bfr[p], sb + b_off[p] + kk);
#pragma unroll
      for (int i = 0; i < kMi; ++i)
#pragma unroll
        for (int j = 0; j < kNj; ++j)
          mma_bf16(acc[i][j], af[i], bfr[j >> 1][(j & 1) * 2], bfr[j >> 1][(j & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // ---- epilogue: accumulator (i, j, c) is row wm*64 + i*16 + lane/4 + (c/2)*8, column
  // 2*(lane%4) + c%2 of n8 tile j.
  const int out_cols = args.n_out;
#pragma unroll
  for (int i = 0; i < kMi; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm * kWarpM + i * 16 + (lane >> 2) + h * 8;
      if (r >= rows_left) continue;
      const int64_t row = seg_begin + m0 + r;
      if constexpr (kGateUp) {
        auto* out = static_cast<__nv_bfloat16*>(args.out) + row * out_cols;
#pragma unroll
        for (int j = 0; j < kNj / 2; ++j) {
          const int col = n0 + wn * (kWarpN / 2) + j * 8 + 2 * (lane & 3);
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float g = bf16_round(acc[i][j][h * 2 + c]), u = bf16_round(acc[i][j + kNj / 2][h * 2 + c]);
            v[c] = silu_mul(g, u);
          }
          *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(v[0], v[1]);
        }
      } else {
        float* out = static_cast<float*>(args.out) + row * out_cols;
#pragma unroll
        for (int j = 0; j < kNj; ++j) {
          const int col = n0 + wn * kWarpN + j * 8 + 2 * (lane & 3);
          if (col < out_cols)  // out_cols is even (a multiple of 64): the pair is inside or outside
            *reinterpret_cast<float2*>(out + col) = make_float2(acc[i][j][h * 2], acc[i][j][h * 2 + 1]);
        }
      }
    }
  }
}

}  // namespace

cudaError_t launch_moe_grouped_gemms(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                     const int32_t* tile_start, int64_t n_pairs, int count, const void* const* gate,
                                     const void* const* up, const void* const* down, int64_t inter, void* act, float* y,
                                     cudaStream_t stream) {
  int64_t m_slots = 0;
  bool nothing = false;
  cudaError_t err = moe_grouped_check(x, inter, n_pairs, count, m_slots, nothing);
  if (err != cudaSuccess || nothing) return err;
  err = opt_in_dynamic_smem(moe_grouped_gemm_kernel<true>, kSmemBytes);
  if (err != cudaSuccess) return err;
  err = opt_in_dynamic_smem(moe_grouped_gemm_kernel<false>, kSmemBytes);
  if (err != cudaSuccess) return err;

  const MoeGemmArgs a1 = moe_gateup_args(x, src_token, offsets, tile_start, count, gate, up, inter, act);
  const dim3 grid1(static_cast<unsigned>(inter / (kTileN / 2)), static_cast<unsigned>(m_slots));
  moe_grouped_gemm_kernel<true><<<grid1, kThreads, kSmemBytes, stream>>>(a1);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const MoeGemmArgs a2 = moe_down_args(a1, down, y);
  const dim3 grid2(static_cast<unsigned>((x.cols() + kTileN - 1) / kTileN), static_cast<unsigned>(m_slots));
  moe_grouped_gemm_kernel<false><<<grid2, kThreads, kSmemBytes, stream>>>(a2);
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
