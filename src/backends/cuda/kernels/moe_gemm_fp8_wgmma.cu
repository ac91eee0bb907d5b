// The grouped expert GEMMs of FP8 experts on Hopper warpgroup MMA (sm_90a): kernels/
// moe_gemm_wgmma.cu's design (device-side scheduling by tile_start, 128-row M-tiles, cp.async
// loads into 128-byte-swizzled tiles, a kStages pipeline, two warpgroups of 64 rows, n_per_cta
// N-tiles per CTA with the next tile's loads overlapping the epilogue) with e4m3 operands and the
// block scales of DeepSeek-V3's fine-grained FP8:
// - a tile row is 128 bytes = 128 e4m3 values = exactly one 128-wide scale block of K, so each K
//   step kt is one block: the 4 wgmma m64n128k32 of the step write a temporary fp32 tile `tmp`
//   (the first with scale-d = 0), then acc += tmp · (a_scale[row, kt] · w_scale[n-block, kt]) on
//   the CUDA cores (the "promotion"; the tensor cores' FP8 sums are short, this keeps the long sum
//   in full fp32). The k32 steps inside a 128-byte row are +32 bytes on the descriptor start
//   address, the same bytes as the BF16 kernel's k16 steps, so descriptors and swizzle are its.
// - kBN = 128 B rows: kernel 1 (gate‖up) takes rows 0..63 from gate rows n0.. and rows 64..127
//   from the same up rows (n0 a multiple of 64, so all 64 lie in weight-scale block n0 / 128 of
//   each matrix); accumulator columns c and c + 64 are g and u of output n0 + c in one thread.
//   Kernel 2 (down): 128 down rows n0 = 128 j.., one scale block.
// - waits for the step's wgmmas to finish (wait_group 0) before promoting, so the tensor cores
//   idle during the promotion; the loads of the next kStages - 1 steps stay in flight meanwhile.
// 4 stages x 32 KB (+1 KB alignment) = 129 KB of shared memory, one CTA (8 warps) per SM, 128
// fp32 accumulator registers (acc + tmp) per thread.
// gpu_moe_test MoeFp8Test compares it with the CPU reference (passing on an H200, 2026-12-04); at
// 32K tokens it is 1.22x slower than the BF16 warp-specialized kernels (docs/fp8.md).
#include <atomic>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/moe_gemm_args.cuh"

namespace cpinfer::cuda {
namespace {

constexpr int kTileM = kMoeGemmTileM;  // 128
constexpr int kBN = 128;               // B rows per tile
constexpr int kTileK = 128;            // e4m3 per 128-byte tile row: one scale block
constexpr int kThreads = 256;          // two warpgroups
constexpr int kRowBytes = 128;
constexpr int kRowsPerPass = kThreads / 8;   // 32 rows per pass of 16-byte chunks
constexpr int kABytes = kTileM * kRowBytes;  // 16 KB
constexpr int kBBytes = kBN * kRowBytes;     // 16 KB
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kStages = 4;
constexpr int kLoads = kTileM / kRowsPerPass;  // 4 chunks per thread per operand and stage
constexpr int kAcc = 64;                       // fp32 accumulators per thread (64 x 128 / 128)
constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageBytes + 1024;
static_assert(kBN == kTileM, "one load loop shape for A and B");
static_assert(kSmemBytes <= 227 * 1024, "shared memory");

struct Args {
  const uint8_t* a;           // kernel 1: xq [T, H] (rows through src_token); kernel 2: aq [rows, I]
  const float* a_scale;       // kernel 1: [H/128][T]; kernel 2: segmented (kernels.h)
  int64_t a_scale_ld;         // kernel 1: T
  const int32_t* src_token;   // kernel 1
  const int32_t* offsets;     // [count + 1]
  const int32_t* tile_start;  // [count + 1]
  const uint8_t* const* w1;   // gate or down codes
  const uint8_t* const* w2;   // up codes (kernel 1)
  const float* const* s1;     // their scales [ceil(n_out/128), k_dim/128]
  const float* const* s2;
  int count;
  int n_out;  // I (kernel 1) or H (kernel 2)
  int k_dim;  // H (kernel 1) or I (kernel 2)
  void* out;  // act [rows, I] BF16 or y [rows, H] F32
  int n_per_cta;
};

__host__ __device__ constexpr int load_row(int tid, int i) { return (tid >> 3) + kRowsPerPass * i; }
__host__ __device__ constexpr int load_chunk(int tid) { return tid & 7; }
__host__ __device__ constexpr uint32_t swizzled_off(int r, int c) {
  return static_cast<uint32_t>(r * kRowBytes + ((c ^ (r & 7)) << 4));
}
// Accumulator idx of thread tid: row in the 128-row tile, column in the 128-wide B tile.
__host__ __device__ constexpr int acc_row(int tid, int idx) {
  return (tid >> 7) * 64 + ((tid >> 5) & 3) * 16 + ((tid & 31) >> 2) + 8 * ((idx & 3) >> 1);
}
__host__ __device__ constexpr int acc_col(int tid, int idx) { return 8 * (idx >> 2) + 2 * (tid & 3) + (idx & 1); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

using namespace cpinfer::cuda::hopper;

// d[64] (+)= A[64 x 32] · B[128 x 32]ᵀ in e4m3, both K-major in shared memory (128-byte swizzle),
// fp32 accumulators; accumulate = 0 overwrites d. (FP8 wgmma has no transpose flags: both operands
// must be K-major, which the tiles are.)
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "
      "%64, %65, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(accumulate));
}
__device__ __forceinline__ float bf16_round(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads, 1) moe_fp8_wgmma_kernel(const Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // ---- which (expert, M-tile) this CTA computes (as moe_gemm_wgmma.cu)
  MoeTile tile;
  if (!moe_tile_of(args.tile_start, args.offsets, args.count, blockIdx.y, kTileM, tile)) return;
  const int e = tile.expert, seg_begin = tile.seg_begin, seg_rows = tile.seg_rows, m0 = tile.m0,
            rows_left = tile.rows_left;
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;  // outputs per N-tile
  const int k_dim = args.k_dim, n_out = args.n_out;
  const int n_k = k_dim / kTileK;  // K blocks (k_dim % 128 == 0)
  const int n_tiles = (n_out + kNStep - 1) / kNStep;
  const int j_begin = blockIdx.x * args.n_per_cta;
  const int j_end = min(j_begin + args.n_per_cta, n_tiles);

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;

  // ---- per-thread loads: chunk load_chunk(tid) (16 bytes) of rows load_row(tid, i)
  const int chunk = load_chunk(tid);
  const uint32_t st_off = swizzled_off(load_row(tid, 0), chunk);  // + i·32 rows: (r & 7) is the same
  const uint8_t* a_src[kLoads];
  const uint8_t* b_src[kLoads];
  uint32_t a_ok = 0, b_ok = 0;
#pragma unroll
  for (int i = 0; i < kLoads; ++i) {
    const int r = load_row(tid, i);
    const bool ok = r < rows_left;
    int64_t a_row = 0;
    if (ok) a_row = kGateUp ? __ldg(args.src_token + seg_begin + m0 + r) : seg_begin + m0 + r;
    a_src[i] = args.a + a_row * k_dim + chunk * 16;
    a_ok |= static_cast<uint32_t>(ok) << i;
  }
  const uint8_t* w1 = args.w1[e];
  const uint8_t* w2 = kGateUp ? args.w2[e] : nullptr;
  auto set_b = [&](int n0) {  // B rows of the N-tile starting at output n0
    b_ok = 0;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int r = load_row(tid, i);
      const int n = n0 + (kGateUp ? (r & (kBN / 2 - 1)) : r);
      const bool ok = n < n_out;
      const uint8_t* w = kGateUp && r >= kBN / 2 ? w2 : w1;
      b_src[i] = w + static_cast<int64_t>(ok ? n : 0) * k_dim + chunk * 16;
      b_ok |= static_cast<uint32_t>(ok) << i;
    }
  };
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sa = base + slot * kStageBytes + st_off;
    const uint32_t sb = sa + kABytes;
    const int k0 = kt * kTileK;  // bytes
#pragma unroll
    for (int i = 0; i < kLoads; ++i) cp_async16(sa + i * kRowsPerPass * kRowBytes, a_src[i] + k0, (a_ok >> i) & 1);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) cp_async16(sb + i * kRowsPerPass * kRowBytes, b_src[i] + k0, (b_ok >> i) & 1);
  };
  auto prologue = [&]() {  // steps 0 .. kStages - 2 into slots 0 .. kStages - 2 (all free)
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_k) load_stage(s, s);
      cp_async_commit();
    }
  };

  // ---- the activation scales of this thread's two accumulator rows (tile rows acc_row(tid, 0)
  // and acc_row(tid, 2)); rows past the segment were zero-filled, their scale is 0.
  const float* sa_ptr[2];
  bool sa_ok[2];
  const int64_t sa_step = kGateUp ? args.a_scale_ld : seg_rows;  // floats between K blocks
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = acc_row(tid, 2 * h);
    sa_ok[h] = r < rows_left;
    if constexpr (kGateUp) {
      const int t = sa_ok[h] ? __ldg(args.src_token + seg_begin + m0 + r) : 0;
      sa_ptr[h] = args.a_scale + t;
    } else {
      sa_ptr[h] = args.a_scale + fp8_segment_scale_base(seg_begin, e, n_k) + (sa_ok[h] ? m0 + r : 0);
    }
  }

  set_b(j_begin * kNStep);
  prologue();
  const int wg = tid >> 7;
  float acc[kAcc], tmp[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) tmp[i] = 0.0f;
  for (int j = j_begin; j < j_end; ++j) {
    const int n0 = j * kNStep;
    // Weight-scale rows of this N-tile: block n0 / 128 (kernel 1: of gate and of up).
    const float* sw1 = args.s1[e] + static_cast<int64_t>(n0 / kTileK) * n_k;
    const float* sw2 = kGateUp ? args.s2[e] + static_cast<int64_t>(n0 / kTileK) * n_k : sw1;
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < n_k; ++kt) {
      cp_async_wait<kStages - 2>();  // this thread's chunks of step kt have landed
      // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
      fence_async_smem();
      __syncthreads();  // everyone's chunks of step kt are visible
      const uint32_t stage = base + (kt % kStages) * kStageBytes;
      wgmma_fence();  // the promotion's reads of tmp come before these wgmmas write it
#pragma unroll
      for (int ks = 0; ks < kTileK / 32; ++ks) {
        const uint64_t da = make_desc(stage + wg * 64 * kRowBytes + ks * 32, 16, 1024);
        const uint64_t db = make_desc(stage + kABytes + ks * 32, 16, 1024);
        wgmma_m64n128k32_e4m3(tmp, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
      // The scales of step kt, read while the tensor cores work.
      const float sa0 = sa_ok[0] ? __ldg(sa_ptr[0] + kt * sa_step) : 0.0f;
      const float sa1 = sa_ok[1] ? __ldg(sa_ptr[1] + kt * sa_step) : 0.0f;
      const float sb1 = __ldg(sw1 + kt), sb2 = __ldg(sw2 + kt);
      wgmma_wait<0>();  // tmp holds step kt
      fence_regs(tmp);
      __syncthreads();  // both warpgroups are done with slot (kt - 1) % kStages
      const int next = kt + kStages - 1;
      if (next < n_k) load_stage(next % kStages, next);
      cp_async_commit();
      // Promotion: idx & 2 selects the second row; kernel 1's columns 64.. (idx >= 32) are up's.
      const float f00 = sa0 * sb1, f10 = sa1 * sb1, f01 = sa0 * sb2, f11 = sa1 * sb2;
#pragma unroll
      for (int idx = 0; idx < kAcc; ++idx) {
        const bool second_row = (idx & 2) != 0;
        const bool up = kGateUp && idx >= kAcc / 2;
        const float f = up ? (second_row ? f11 : f01) : (second_row ? f10 : f00);
        acc[idx] = fmaf(tmp[idx], f, acc[idx]);
      }
    }
    if (j + 1 < j_end) {
      // Every slot is free once both warpgroups are done (every real cp.async was waited for in
      // the loop): start the next N-tile's loads, then write this one.
      __syncthreads();
      set_b(n0 + kNStep);
      prologue();
    }

    // ---- epilogue: acc[idx] is tile row acc_row(tid, idx), B column acc_col(tid, idx)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = acc_row(tid, 2 * h);
      if (r >= rows_left) continue;
      const int64_t row = seg_begin + m0 + r;
      if constexpr (kGateUp) {
        auto* out = static_cast<__nv_bfloat16*>(args.out) + row * n_out;
#pragma unroll
        for (int n = 0; n < kBN / 16; ++n) {  // gate n8 tiles; the up tile of the same columns is n + kBN / 16
          const int idx = 4 * n + 2 * h;
          const int col = n0 + acc_col(tid, idx);
          if (col >= n_out) continue;  // n_out is a multiple of 128: the pair is inside or outside
          float v[2];
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float g = bf16_round(acc[idx + c]), u = bf16_round(acc[idx + c + kBN / 4]);
            v[c] = g / (1.0f + __expf(-g)) * u;
          }
          *reinterpret_cast<__nv_bfloat162*>(out + col) = __floats2bfloat162_rn(v[0], v[1]);
        }
      } else {
        float* out = static_cast<float*>(args.out) + row * n_out;
#pragma unroll
        for (int n = 0; n < kBN / 8; ++n) {
          const int idx = 4 * n + 2 * h;
          const int col = n0 + acc_col(tid, idx);
          if (col < n_out) *reinterpret_cast<float2*>(out + col) = make_float2(acc[idx], acc[idx + 1]);
        }
      }
    }
  }
  cp_async_wait<0>();  // only empty groups can be pending here
#endif                 // __CUDA_ARCH_FEAT_SM90_ALL
}

template <bool kGateUp>
cudaError_t launch_one(const Args& args, int64_t m_slots, cudaStream_t stream) {
  static std::atomic<uint64_t> done{0};
  cudaError_t err = opt_in_dynamic_smem(reinterpret_cast<const void*>(moe_fp8_wgmma_kernel<kGateUp>), kSmemBytes, done);
  if (err != cudaSuccess) return err;
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;
  const int64_t n_tiles = (args.n_out + kNStep - 1) / kNStep;
  const dim3 grid(static_cast<unsigned>((n_tiles + args.n_per_cta - 1) / args.n_per_cta),
                  static_cast<unsigned>(m_slots));
  moe_fp8_wgmma_kernel<kGateUp><<<grid, kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_grouped_gemm_fp8_wgmma(const MoeFp8GemmArgs& a, bool gate_up, cudaStream_t stream) {
  if (a.count == 0 || a.n_pairs == 0) return cudaSuccess;
  if (!moe_fp8_grouped_supported(a.hidden, a.inter)) return cudaErrorInvalidValue;
  const int64_t m_slots = moe_grouped_gemm_max_tiles(a.n_pairs, a.count);
  if (m_slots > 65535) return cudaErrorInvalidValue;
  Args k{};
  k.offsets = a.offsets;
  k.tile_start = a.tile_start;
  k.count = a.count;
  k.n_per_cta = 2;
  if (gate_up) {
    k.a = a.xq;
    k.a_scale = a.x_scale;
    k.a_scale_ld = a.n_tokens;
    k.src_token = a.src_token;
    k.w1 = reinterpret_cast<const uint8_t* const*>(a.tables.gate);
    k.w2 = reinterpret_cast<const uint8_t* const*>(a.tables.up);
    k.s1 = reinterpret_cast<const float* const*>(a.tables.gate_scale);
    k.s2 = reinterpret_cast<const float* const*>(a.tables.up_scale);
    k.n_out = static_cast<int>(a.inter);
    k.k_dim = static_cast<int>(a.hidden);
    k.out = a.act;
    return launch_one<true>(k, m_slots, stream);
  }
  k.a = a.aq;
  k.a_scale = a.act_scale;
  k.w1 = reinterpret_cast<const uint8_t* const*>(a.tables.down);
  k.s1 = reinterpret_cast<const float* const*>(a.tables.down_scale);
  k.s2 = k.s1;
  k.n_out = static_cast<int>(a.hidden);
  k.k_dim = static_cast<int>(a.inter);
  k.out = a.y;
  return launch_one<false>(k, m_slots, stream);
}

}  // namespace cpinfer::cuda
