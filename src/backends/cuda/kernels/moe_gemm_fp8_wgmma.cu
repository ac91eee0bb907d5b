// The grouped expert GEMMs of FP8 experts on Hopper warpgroup MMA (sm_90a): kernels/
// moe_gemm_wgmma.cu's design (device-side scheduling by tile_start, 128-row M-tiles, 128-byte-
// swizzled tiles of moe_gemm_tiles.cuh, two MMA warpgroups of 64 rows, n_per_cta N-tiles per CTA)
// with e4m3 operands and the block scales of DeepSeek-V3's fine-grained FP8:
// - a tile row is 128 bytes = 128 e4m3 values = exactly one 128-wide scale block of K, so each K
//   step kt is one block: the 4 wgmma m64n128k32 of the step write a temporary fp32 tile (the
//   first with scale-d = 0), then acc += tmp · (a_scale[row, kt] · w_scale[n-block, kt]) on the
//   CUDA cores (the "promotion"; the tensor cores' FP8 sums are short, this keeps the long sum in
//   full fp32). The k32 steps inside a 128-byte row are +32 bytes on the descriptor start address,
//   the same bytes as the BF16 kernel's k16 steps, so descriptors and swizzle are its.
// - kBN = 128 B rows: kernel 1 (gate‖up) takes rows 0..63 from gate rows n0.. and rows 64..127
//   from the same up rows (n0 a multiple of 64, so all 64 lie in weight-scale block n0 / 128 of
//   each matrix); accumulator columns c and c + 64 are g and u of output n0 + c in one thread.
//   Kernel 2 (down): 128 down rows n0 = 128 j.., one scale block.
// Why not 128 x 256 (the BF16 default): a thread of an MMA warpgroup holds its accumulators and
// the temporary tile(s) of the promotion: at N = 128 that is 64 + 64 (+ 64 for a second
// temporary) fp32 registers, at N = 192 96 + 96; at N = 256 already 128 + 128, more than the 255 a
// thread has.
//
// Two kernels on these tiles, with the same promotion (promote below) and epilogue (store_tile;
// the ws gate‖up kernel quantizes act in its epilogue instead, store_act_fp8), and the ws gate‖up
// GEMM on 128 x 192 tiles (moe_fp8_ws192_kernel, the default where I % 384 == 0; below):
// - moe_fp8_ws_kernel, the default: warp-specialized like the BF16 ws kernel. Warpgroup 0 (72
//   registers) is the producer of a ring of kWsStages slots of 32 KB, one k-step each: one thread
//   puts the B tile (two boxes of 64 weight rows) and, in the down GEMM, the A tile (128
//   expert-sorted act rows) on TMA, through per-expert descriptors the back-end encodes once
//   (encode_moe_fp8_weight_maps); the gate‖up GEMM's A rows, x gathered by token, stay cp.async
//   chunks of all 128 threads (TMA on Hopper has no row gather). It also copies each slot's scales
//   into a small ring beside it: the 128 A rows' activation scales (row t by thread t, 0 past the
//   segment) and the weight block scale(s) of the N-tile (gate's and up's, or down's), so the MMA warpgroups
//   read them from shared memory (no global load latency in their loop). Warpgroups 1, 2 (216
//   registers: acc 64 + two temporaries 64 + 64 + addressing) alternate two temporary tiles: they
//   issue the wgmmas of step kt + 1 into one, wait until only those are in flight (wgmma.wait_group
//   1), promote step kt from the other and release its slot, so the promotion of step kt overlaps
//   the tensor cores' work on step kt + 1 (and the other warpgroup's). Each MMA warp releases a
//   slot on its empty barrier (8 arrivals) after its lanes have read the slot's scales.
// - moe_fp8_wgmma_kernel (--moe-runner-backend wgmma, kept for comparison): every thread loads
//   (4 stages, __syncthreads per step) and each step waits for its wgmmas (wait_group 0) before
//   promoting, so the tensor cores idle during the promotion.
// All read and compute the same values in the same order, so their outputs (and the quantized
// act) are bit for bit equal (bench/moe_bench and gpu_moe_test's WsKernelsEqualTheFirstKernels-
// BitForBit check it on the GPU); gpu_moe_test MoeFp8Test compares both with the CPU.
#include <cuda.h>

#include <type_traits>

#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/fp8.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/moe_gemm_args.cuh"
#include "backends/cuda/kernels/moe_gemm_tiles.cuh"
#include "backends/cuda/kernels/tma.h"

namespace cpinfer::cuda {
namespace {

using namespace moe_tiles;  // tile geometry, store_tile, the ws producer (moe_gemm_tiles.cuh)

constexpr int kBN = 128;                        // B rows per tile
constexpr int kTileK = 128;                     // e4m3 per 128-byte tile row: one scale block
constexpr int kBBytes = kBN * kRowBytes;        // 16 KB
constexpr int kStageBytes = kABytes + kBBytes;  // 32 KB
constexpr int kAcc = kBN / 2;                   // fp32 accumulators per thread (64 x 128 / 128)

// moe_fp8_wgmma_kernel: 4 stages x 32 KB (+1 KB alignment) = 129 KB, one CTA (8 warps) per SM.
constexpr int kThreads = 256;
constexpr int kStages = 4;
constexpr int kLoads = kTileM / kRowsPerPass;  // 4 chunks per thread per operand and stage
constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageBytes + 1024;
static_assert(kBN == kTileM, "one load loop shape for A and B");
static_assert(kSmemBytes <= 227 * 1024, "shared memory");

// moe_fp8_ws_kernel: 6 stages x 32 KB of tiles, 6 x 528 bytes of scales (128 row scales, 2 weight
// block scales, padded to 16 bytes), 12 mbarriers, 1 KB alignment slack: 196.2 KB (+ 18 KB of
// epilogue stash in kernel 1), one CTA per SM.
constexpr int kWsThreads = 384;
constexpr int kWsStages = 6;
constexpr int kWsScaleBytes = 528;
constexpr int kWsScaleOff = kWsStages * kStageBytes;
constexpr int kWsBarOff = kWsScaleOff + kWsStages * kWsScaleBytes;
// Kernel 1 quantizing act in its epilogue (store_act_fp8): the stash of its 256 MMA threads, on
// gate halves of kG groups of 32 columns: kG x 2 rows x 16 bytes of act and 2 row maxima each (18
// KB at kG = 2, 26 KB at kG = 3).
constexpr int act_stash_bytes(int kG) { return 256 * (kG * 2 * 16 + 8); }
constexpr int kWsStashOff = kWsBarOff + 2 * kWsStages * 8;
constexpr int kWsStashBytes = act_stash_bytes(2);
constexpr size_t ws_smem_bytes(bool gate_up) {
  return static_cast<size_t>(gate_up ? kWsStashOff + kWsStashBytes : kWsStashOff) + 1024;
}
static_assert(ws_smem_bytes(true) <= 227 * 1024, "shared memory");
static_assert(kWsBarOff % 8 == 0 && kWsStashOff % 16 == 0, "mbarrier and stash alignment");
// setmaxnreg moves registers through the CTA's pool: the producer's release, 128 · (168 - 72),
// covers the MMA warpgroups' raise, 256 · (216 - 168) (168 = the launch bound's 65536 / 384). ptxas
// -v (nvcc 13.0): no spills at 72 / 216; the producer spills below ~64, gate‖up's MMA code at 208.
constexpr int kWsProducerRegs = 72, kWsMmaRegs = 216;
static_assert(128 * kWsProducerRegs + 256 * kWsMmaRegs <= 168 * kWsThreads, "register pool");

// ---- 128 x 192 gate‖up tiles (MoeFp8GemmArgs::n192): 96 gate rows n0 = 96 j.. and the same 96 up
// rows per B tile. A warpgroup's m64n192 step reads its 64 A rows once for 192 columns (the 128 x
// 128 tile reads them once for 128): per 128 x 192 x 128 k-step the two warpgroups' wgmmas read
// 2 · (8 + 24) KB and the producer writes 40 KB of shared memory, 104 KB for 768 cycles of tensor
// work against 80 KB for 512 at 128 x 128. The accumulators (96) and one temporary (96) fill the
// MMA threads' registers, so each warpgroup waits for its own k-step before promoting it (while the
// other warpgroup's wgmmas run). 96-row halves straddle the 128-row weight-scale blocks: each group
// of 32 columns (4 n8-tiles) lies in one block, and the producer copies the 6 groups' (3 gate, 3
// up) block scales of each k-step.
constexpr int kBN192 = 192;
constexpr int kAcc192 = kBN192 / 2;                   // 96 fp32 accumulators per thread
constexpr int kB192Bytes = kBN192 * kRowBytes;        // 24 KB
constexpr int kStage192Bytes = kABytes + kB192Bytes;  // 40 KB
constexpr int kWs192ScaleBytes = 544;                 // 128 row scales, 6 weight scales, padded to 16 bytes
// Ring slots: 5 where act goes out in BF16, 4 where the epilogue quantizes it (its stash, below).
constexpr int ws192_stages(bool quant) { return quant ? 4 : 5; }
constexpr int ws192_scale_off(bool quant) { return ws192_stages(quant) * kStage192Bytes; }
constexpr int ws192_bar_off(bool quant) { return ws192_scale_off(quant) + ws192_stages(quant) * kWs192ScaleBytes; }
constexpr int ws192_stash_off(bool quant) { return ws192_bar_off(quant) + 2 * ws192_stages(quant) * 8; }
constexpr int kWs192StashBytes = act_stash_bytes(3);  // the quantizing epilogue's
constexpr size_t ws192_smem_bytes(bool quant) {
  return static_cast<size_t>(ws192_stash_off(quant) + (quant ? kWs192StashBytes : 0)) + 1024;
}
static_assert(ws192_smem_bytes(false) <= 227 * 1024 && ws192_smem_bytes(true) <= 227 * 1024, "shared memory");
static_assert(ws192_smem_bytes(false) <= (1u << 18) && ws192_smem_bytes(true) <= (1u << 18), "descriptor range");
static_assert(ws192_bar_off(true) % 8 == 0 && ws192_bar_off(false) % 8 == 0 && ws192_stash_off(true) % 16 == 0 &&
                  kStage192Bytes % 1024 == 0 && (kB192Bytes / 2) % 1024 == 0,
              "alignment");

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
  void* out;  // act [rows, I] BF16 or y [rows, H] F32 (BF16 where out_bf16)
  int n_per_cta;
  bool out_bf16;
  // Kernel 1 (ws, n_per_cta even): act quantized in the epilogue into aq [rows, I] e4m3 with the
  // segmented scales (launch_fp8_quantize_rows' layout), out unused; nullptr: act into out.
  uint8_t* act_q;
  float* act_q_scale;
  // The ws kernels' TMA descriptors: per expert, gate (kernel 1) or down (kernel 2) weights and up
  // weights (kernel 1), boxes of 64 rows; kernel 2's A, aq [rows, I], in boxes of 128 rows.
  const CUtensorMap* wmap1;
  const CUtensorMap* wmap2;
  CUtensorMap amap;
};

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
// The same, m64n192k32 (the 128 x 192 gate‖up tiles); the 96 operands spelled by macros:
// CPI_R10(t) is the register list's "%t0,...,%t9," (operands 10 t .. 10 t + 9).
#define CPI_R10(t) "%" #t "0,%" #t "1,%" #t "2,%" #t "3,%" #t "4,%" #t "5,%" #t "6,%" #t "7,%" #t "8,%" #t "9,"
#define CPI_F2(j) "+f"(d[j]), "+f"(d[(j) + 1])
#define CPI_F8(j) CPI_F2(j), CPI_F2((j) + 2), CPI_F2((j) + 4), CPI_F2((j) + 6)
__device__ __forceinline__ void wgmma_m64n192k32_e4m3(float (&d)[96], uint64_t da, uint64_t db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %98, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n192k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9," CPI_R10(1) CPI_R10(2)
          CPI_R10(3) CPI_R10(4) CPI_R10(5) CPI_R10(6) CPI_R10(7)
              CPI_R10(8) "%90,%91,%92,%93,%94,%95}, %96, %97, p, 1, 1;\n}\n"
      : CPI_F8(0), CPI_F8(8), CPI_F8(16), CPI_F8(24), CPI_F8(32), CPI_F8(40), CPI_F8(48), CPI_F8(56), CPI_F8(64),
        CPI_F8(72), CPI_F8(80), CPI_F8(88)
      : "l"(da), "l"(db), "r"(accumulate));
}
#undef CPI_F8
#undef CPI_F2
#undef CPI_R10
// The activation scales of tile row r over the K blocks: p[kt · step] (kernel 1: x_scale[kt · T +
// token]; kernel 2: the expert segment's block of the segmented scales). ok = false past the
// segment: the row was zero-filled, its scale counts as 0.
struct RowScales {
  const float* p;
  int64_t step;
  bool ok;
};
template <bool kGateUp>
__device__ __forceinline__ RowScales row_scales(const Args& args, const MoeTile& t, int r, int n_k) {
  const bool ok = r < t.rows_left;
  if constexpr (kGateUp) {
    const int token = ok ? __ldg(args.src_token + t.seg_begin + t.m0 + r) : 0;
    return {args.a_scale + token, args.a_scale_ld, ok};
  } else {
    return {args.a_scale + fp8_segment_scale_base(t.seg_begin, t.expert, n_k) + (ok ? t.m0 + r : 0), t.seg_rows, ok};
  }
}
// The weight block scales of the N-tile at output n0 over the K blocks: gate's or down's (w = 0),
// up's (w = 1).
template <bool kGateUp>
__device__ __forceinline__ const float* w_scales(const Args& args, int e, int n0, int n_k, int w) {
  const float* const* s = kGateUp && w == 1 ? args.s2 : args.s1;
  return s[e] + static_cast<int64_t>(n0 / kTileK) * n_k;
}

// tmp = A[64 x 128] · B[128 x 128]ᵀ of one k-step (one scale block) of warpgroup wg, issued and
// committed as one wgmma group (asynchronous: wgmma_wait before reading tmp).
__device__ __forceinline__ void wgmma_kstep(float (&tmp)[kAcc], uint32_t stage, int wg) {
  wgmma_fence();  // earlier reads of tmp (the promotion) come before these wgmmas write it
#pragma unroll
  for (int ks = 0; ks < kTileK / 32; ++ks)
    wgmma_m64n128k32_e4m3(tmp, make_desc(stage + desc_a_off(wg, ks), 16, 1024),
                          make_desc(stage + desc_b_off(ks), 16, 1024), ks > 0 ? 1 : 0);
  wgmma_commit();
}

// The ws kernel's descriptors: make_desc(addr, 16, 1024) is kDescHi << 32 | desc_lo(addr), and
// every tile address of the slots lies below 256 KB (the 14-bit start field, addr >> 4, never
// carries), so slot s and k32 step ks are desc_lo(slot 0's address) + s · kStageBytes / 16 + 2 · ks:
// one add per descriptor instead of a mask, shift and or of the address (and their moves into
// uniform registers) before every wgmma.
constexpr uint32_t kDescHi = 0x40000040u;  // SBO 1024 >> 4, 128-byte swizzle (bit 62)
__device__ __forceinline__ uint32_t desc_lo(uint32_t addr) { return (addr >> 4) | (1u << 16); }  // LBO 16 >> 4
__device__ __forceinline__ uint64_t desc_of(uint32_t lo) { return static_cast<uint64_t>(kDescHi) << 32 | lo; }
static_assert(ws_smem_bytes(true) <= (1u << 18), "descriptor start addresses below 256 KB");

// wgmma_kstep with the descriptors' low words of the slot's A rows (of warpgroup wg) and B rows;
// N = 96: A[64 x 128] · B[192 x 128]ᵀ (the 128 x 192 tiles).
template <int N>
__device__ __forceinline__ void wgmma_kstep_lo(float (&tmp)[N], uint32_t a_lo, uint32_t b_lo) {
  static_assert(N == kAcc || N == kAcc192, "m64n128 or m64n192");
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kTileK / 32; ++ks) {
    if constexpr (N == kAcc192)
      wgmma_m64n192k32_e4m3(tmp, desc_of(a_lo + 2 * ks), desc_of(b_lo + 2 * ks), ks > 0 ? 1 : 0);
    else
      wgmma_m64n128k32_e4m3(tmp, desc_of(a_lo + 2 * ks), desc_of(b_lo + 2 * ks), ks > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// A position in the ws ring walked step by step: slot and phase parity (WsRing::slot / parity of
// the step count, without a division by kWsStages per use).
template <int kStages>
struct RingPos {
  int slot = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void next() {
    if (++slot == kStages) {
      slot = 0;
      phase ^= 1u;
    }
  }
};

// The promotion of one k-step: acc += tmp · (row scale · weight block scale). sa0, sa1: the scales
// of this thread's two rows (acc_row(tid, 0), acc_row(tid, 2)); sb1, sb2: the gate (or down) and up
// block scales (kernel 1's columns 64.., idx >= 32, are up's).
template <bool kGateUp>
__device__ __forceinline__ void promote(float (&acc)[kAcc], const float (&tmp)[kAcc], float sa0, float sa1, float sb1,
                                        float sb2) {
  const float f00 = sa0 * sb1, f10 = sa1 * sb1, f01 = sa0 * sb2, f11 = sa1 * sb2;
#pragma unroll
  for (int idx = 0; idx < kAcc; ++idx) {
    const bool second_row = (idx & 2) != 0;
    const bool up = kGateUp && idx >= kAcc / 2;
    const float f = up ? (second_row ? f11 : f01) : (second_row ? f10 : f00);
    acc[idx] = fmaf(tmp[idx], f, acc[idx]);
  }
}

__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(addr) : "memory");
  return v;
}

__device__ __forceinline__ TileOut tile_out(const Args& a) { return TileOut{a.out, a.n_out, a.out_bf16}; }

// The largest |v| of 8 BF16 values (__hmax2, like fmaxf, passes over NaN, as the quantizer's).
__device__ __forceinline__ float amax_bf16x8(const uint4& u) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  __nv_bfloat162 m = __float2bfloat162_rn(0.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) m = __hmax2(m, __habs2(*reinterpret_cast<const __nv_bfloat162*>(&w[i])));
  return fmaxf(__low2float(m), __high2float(m));
}
// 8 BF16 values as e4m3(v / s) in order, the quotients correctly rounded (fp8_quotient).
__device__ __forceinline__ uint2 e4m3x8(const uint4& u, float s, float inv) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  uint32_t pair[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    pair[i] =
        __nv_cvt_float2_to_fp8x2(make_float2(fp8_quotient(bf16_lo(w[i]), s, inv), fp8_quotient(bf16_hi(w[i]), s, inv)),
                                 __NV_SATFINITE, __NV_E4M3);
  return make_uint2(pair[0] | pair[1] << 16, pair[2] | pair[3] << 16);
}

// Gate‖up's epilogue when it quantizes act itself (Args::act_q), on N-tiles of kG groups of 32
// columns (kG = 2 on 128 x 128 tiles, 3 on 128 x 192): a window of kW = act_window<kG>() N-tiles
// (n_per_cta and the N-tiles multiples of it, so one CTA computes a window in order) is kW · kG
// groups, G = kG · kI + g in tile kI = j % kW, and kW · kG / 4 of act's 128-column scale blocks b,
// groups 4b..4b+3. The thread forms its act values as store_tile does (gateup_act8), in
// quad_transpose's order: per row h (acc_row(tid, 2h)) and group g, columns 8q.. of the group
// (thread q of the quad). A block that ends in tile kI is written there: its groups of earlier
// tiles come from the thread's stash (slot G % kG: a slot is read before it is written again), its
// maximum from the stashed running maximum and this tile's groups, reduced over the quad
// (s = fp8_block_scale(amax)); groups of a block that goes on are stashed. That is
// launch_fp8_quantize_rows' arithmetic on the same BF16 values (the quotients correctly rounded
// without a division: fp8_quotient), so the codes and scales are bit for bit those of act written
// and quantized. The stash (act_stash_bytes) is laid out [piece][thread] (conflict-free).
template <int kG>
__host__ __device__ constexpr int act_window() {
  static_assert(kG == 2 || kG == 3, "64- or 96-column gate halves");
  return kG == 2 ? 2 : 4;
}
template <int kG, int kI>
__device__ __forceinline__ void store_act_fp8(const float (&acc)[32 * kG], const Args& a, int tid, const MoeTile& t,
                                              int window, uint32_t stash) {
  constexpr int kW = act_window<kG>();
  const int q = tid & 3;
  auto piece = [&](int slot, int h) { return stash + 16 * ((2 * slot + h) * 256 + tid); };
  const uint32_t maxima = stash + kG * 2 * 256 * 16 + 8 * tid;
  const int n_k = a.n_out / kTileK;
  float* const scales = a.act_q_scale + fp8_segment_scale_base(t.seg_begin, t.expert, n_k) + t.m0;
  constexpr int kG0 = kG * kI;                                   // this tile's first group
  constexpr int kBFirst = kG0 / 4, kBLast = (kG0 + kG - 1) / 4;  // blocks it touches
  float run[2] = {0.0f, 0.0f};                                   // the pending block's maximum over the stashed groups
  if constexpr (kI > 0)
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(run[0]), "=f"(run[1]) : "r"(maxima) : "memory");
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4 v[kG];
    float am[kG];
#pragma unroll
    for (int g = 0; g < kG; ++g) {
      v[g] = gateup_act8<64 * kG>(acc, h, g, q);
      am[g] = amax_bf16x8(v[g]);
    }
    const int r = acc_row(tid, 2 * h);
    const bool row_ok = r < t.rows_left;
    uint8_t* const row =
        a.act_q + static_cast<int64_t>(t.seg_begin + t.m0 + r) * a.n_out + window * (kW * kG * 32) + 8 * q;
#pragma unroll
    for (int b = kBFirst; b <= kBLast; ++b) {
      constexpr int kLast = kG0 + kG - 1;
      const bool complete = 4 * b + 3 <= kLast;
      float mx = 4 * b < kG0 ? run[h] : 0.0f;  // groups of b stashed by earlier tiles
#pragma unroll
      for (int g = 0; g < kG; ++g)
        if ((kG0 + g) / 4 == b) mx = fmaxf(mx, am[g]);
      if (!complete) {
#pragma unroll
        for (int g = 0; g < kG; ++g)
          if ((kG0 + g) / 4 == b)
            asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(piece((kG0 + g) % kG, h)), "r"(v[g].x),
                         "r"(v[g].y), "r"(v[g].z), "r"(v[g].w)
                         : "memory");
        run[h] = mx;
        continue;
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float sc = fp8_block_scale(mx), inv = 1.0f / sc;
      if (!row_ok) continue;
#pragma unroll
      for (int G = 4 * b; G < 4 * b + 4; ++G) {
        uint4 u;
        if (G < kG0) {
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w)
                       : "r"(piece(G % kG, h))
                       : "memory");
        } else {
          u = v[G - kG0];
        }
        *reinterpret_cast<uint2*>(row + 32 * G) = e4m3x8(u, sc, inv);
      }
      if (q == 0) scales[static_cast<int64_t>((kW * kG / 4) * window + b) * t.seg_rows + r] = sc;
    }
  }
  if constexpr (kI < kW - 1)
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(maxima), "f"(run[0]), "f"(run[1]) : "memory");
}
// store_act_fp8 of N-tile j (j >= 0; kW a power of two).
template <int kG>
__device__ __forceinline__ void store_act_fp8_tile(const float (&acc)[32 * kG], const Args& a, int tid,
                                                   const MoeTile& t, int j, uint32_t stash) {
  constexpr int kW = act_window<kG>(), kLogW = kW == 2 ? 1 : 2;
  const int window = j >> kLogW;
  switch (j & (kW - 1)) {
    case 0:
      store_act_fp8<kG, 0>(acc, a, tid, t, window, stash);
      break;
    case 1:
      store_act_fp8<kG, 1>(acc, a, tid, t, window, stash);
      break;
    case 2:
      if constexpr (kW > 2) store_act_fp8<kG, 2 % kW>(acc, a, tid, t, window, stash);
      break;
    default:
      if constexpr (kW > 3) store_act_fp8<kG, 3 % kW>(acc, a, tid, t, window, stash);
      break;
  }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kGateUp>
__global__ void __launch_bounds__(kThreads, 1) moe_fp8_wgmma_kernel(const Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  // ---- which (expert, M-tile) this CTA computes (as moe_gemm_wgmma.cu)
  MoeTile tile;
  if (!moe_tile_of(args.tile_start, args.offsets, args.count, blockIdx.y, kTileM, tile)) return;
  const int e = tile.expert, seg_begin = tile.seg_begin, m0 = tile.m0, rows_left = tile.rows_left;
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
      const int n = n0 + (kGateUp ? gateup_row(r, kBN) : r);
      const bool ok = n < n_out;
      const uint8_t* w = kGateUp && gateup_is_up(r, kBN) ? w2 : w1;
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

  // ---- the activation scales of this thread's two accumulator rows
  const RowScales rs0 = row_scales<kGateUp>(args, tile, acc_row(tid, 0), n_k);
  const RowScales rs1 = row_scales<kGateUp>(args, tile, acc_row(tid, 2), n_k);

  set_b(j_begin * kNStep);
  prologue();
  const int wg = tid >> 7;
  float acc[kAcc], tmp[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) tmp[i] = 0.0f;
  for (int j = j_begin; j < j_end; ++j) {
    const int n0 = j * kNStep;
    const float* sw1 = w_scales<kGateUp>(args, e, n0, n_k, 0);
    const float* sw2 = w_scales<kGateUp>(args, e, n0, n_k, 1);
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < n_k; ++kt) {
      cp_async_wait<kStages - 2>();  // this thread's chunks of step kt have landed
      // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
      fence_async_smem();
      __syncthreads();  // everyone's chunks of step kt are visible
      wgmma_kstep(tmp, base + (kt % kStages) * kStageBytes, wg);
      // The scales of step kt, read while the tensor cores work.
      const float sa0 = rs0.ok ? __ldg(rs0.p + kt * rs0.step) : 0.0f;
      const float sa1 = rs1.ok ? __ldg(rs1.p + kt * rs1.step) : 0.0f;
      const float sb1 = __ldg(sw1 + kt), sb2 = __ldg(sw2 + kt);
      wgmma_wait<0>();  // tmp holds step kt
      fence_regs(tmp);
      __syncthreads();  // both warpgroups are done with slot (kt - 1) % kStages
      const int next = kt + kStages - 1;
      if (next < n_k) load_stage(next % kStages, next);
      cp_async_commit();
      promote<kGateUp>(acc, tmp, sa0, sa1, sb1, sb2);
    }
    if (j + 1 < j_end) {
      // Every slot is free once both warpgroups are done (every real cp.async was waited for in
      // the loop): start the next N-tile's loads, then write this one.
      __syncthreads();
      set_b(n0 + kNStep);
      prologue();
    }
    store_tile<kGateUp, kBN>(acc, tile_out(args), tid, rows_left, seg_begin + m0, n0);
  }
  cp_async_wait<0>();  // only empty groups can be pending here
#endif                 // __CUDA_ARCH_FEAT_SM90_ALL
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The ws kernels' producer (warpgroup 0, 128 threads): per k-step, a ring slot's tiles (A: 128
// rows, then B: kBRows weight rows, two TMA boxes of kBRows / 2) and the scales of its k-step
// beside them. Thread 0 puts the B tile (and kernel 2's A tile) on TMA; kernel 1's A rows,
// gathered by token, are cp.async chunks of all 128 threads (thread t: chunk t % 8 of rows t / 8 +
// 16 i, zero fill past the segment). Thread t copies row t's activation scale; the weight block
// scales of the N-tile go to [128..]: kernel 2's one (thread 0), kernel 1's gate and up scales of
// its kWGroups column groups of 32 (threads 0..kWGroups - 1 gate's, then up's; a group past n_out
// takes the last block, where B is zero). The full barrier completes when the 128 threads' copies
// and TMA's bytes have landed.
template <bool kGateUp, int kBRows, int kWGroups, int kStages, int kScaleBytes>
__device__ __forceinline__ void ws_produce(const Args& args, uint32_t base, uint32_t scales,
                                           const WsRing<kStages>& ring) {
  constexpr int kNStep = kGateUp ? kBRows / 2 : kBRows;  // outputs per N-tile
  constexpr int kSlotBytes = kABytes + kBRows * kRowBytes;
  constexpr uint32_t kTxBytes = kGateUp ? kBRows * kRowBytes : kSlotBytes;
  constexpr int kWCopies = kGateUp ? 2 * kWGroups : 1;
  const int n_k = args.k_dim / kTileK;
  const int n_tiles = (args.n_out + kNStep - 1) / kNStep;
  const int t = threadIdx.x;
  const bool copies_w = t < kWCopies;
  const float* const* w_table = kGateUp && t >= kWGroups ? args.s2 : args.s1;
  const int group_col = 32 * (t % kWGroups), last_block = (args.n_out - 1) / kTileK;
  constexpr int kALoads = kTileM / 16;
  const int chunk = load_chunk(t);
  const uint32_t st_off = swizzled_off(t >> 3, chunk);  // + 16 rows a pass: (r & 7) is the same
  RingPos<kStages> pos;
  ws_for_each_item<true>(  // (each item's N-tiles j_begin..j_end - 1, k-steps in order)
      args.tile_start, args.offsets, args.count, n_tiles, args.n_per_cta,
      [&](const MoeTile& tile, int j_begin, int j_end) {
        const int e = tile.expert;
        const RowScales rs = row_scales<kGateUp>(args, tile, t, n_k);
        const float* const w_base = copies_w ? w_table[e] : nullptr;
        const CUtensorMap* const m1 = args.wmap1 + e;
        const CUtensorMap* const m2 = kGateUp ? args.wmap2 + e : m1;
        // Kernel 1's A: where this thread's rows of x start, in 16-byte units (the launch checks
        // that x has fewer than 2^36 bytes); row 0 where past the segment (nothing read). Each
        // step forms a chunk's address with one multiply-add from the step's column.
        uint32_t a_off[kALoads];
        uint32_t a_ok = 0;
        if constexpr (kGateUp) {
#pragma unroll
          for (int i = 0; i < kALoads; ++i) {
            const int r = (t >> 3) + 16 * i;
            const bool ok = r < tile.rows_left;
            const int64_t row = ok ? __ldg(args.src_token + tile.seg_begin + tile.m0 + r) : 0;
            a_off[i] = static_cast<uint32_t>((row * args.k_dim) >> 4);
            a_ok |= static_cast<uint32_t>(ok) << i;
          }
        }
        const uint8_t* const a_base = args.a + chunk * 16;
        for (int j = j_begin; j < j_end; ++j) {
          const int n0 = j * kNStep;
          const float* const w_blk =
              copies_w ? w_base + static_cast<int64_t>(min((n0 + group_col) / kTileK, last_block)) * n_k : nullptr;
          for (int kt = 0; kt < n_k; ++kt, pos.next()) {
            const int s = pos.slot;
            const uint32_t full = ring.full(s), sa = base + s * kSlotBytes, sb = sa + kABytes;
            mbar_wait(ring.empty(s), pos.phase ^ 1u);
            const int k0 = kt * kTileK;  // bytes
            if (t == 0) {
              mbar_expect_tx(full, kTxBytes);  // before this thread's arrival below
              tma_load_2d(sb, m1, full, k0, n0);
              tma_load_2d(sb + kBRows * kRowBytes / 2, m2, full, k0, kGateUp ? n0 : n0 + kBRows / 2);
              if constexpr (!kGateUp) tma_load_2d(sa, &args.amap, full, k0, tile.seg_begin + tile.m0);
            }
            if constexpr (kGateUp) {
          // (the offsets stay 32-bit registers: 64-bit products hoisted out of the loop would
          // not fit the producer's 72 registers)
#pragma unroll
              for (int i = 0; i < kALoads; ++i) asm volatile("" : "+r"(a_off[i]));
              const uint8_t* const a_k = a_base + k0;
#pragma unroll
              for (int i = 0; i < kALoads; ++i)
                cp_async16(sa + st_off + i * 16 * kRowBytes, a_k + static_cast<uint64_t>(a_off[i]) * 16,
                           (a_ok >> i) & 1);
            }
            const uint32_t dst = scales + s * kScaleBytes;
            cp_async4(dst + 4 * t, rs.ok ? rs.p + kt * rs.step : args.a_scale, rs.ok);
            if (copies_w) cp_async4(dst + 4 * (128 + t), w_blk + kt, true);
            mbar_arrive_cp_async(full);
          }
        }
      });
  cp_async_wait<0>();  // the last copies land before this thread leaves
}

// The ws kernels' roles: the ring's barriers (empty: one arrival per MMA warp), then warpgroup 0
// produces (ws_produce, true: it is done) and the MMA warpgroups take their registers and the
// addresses of their scales and descriptors (false).
struct MmaThread {
  int tid;                    // 0..255 over the two MMA warpgroups
  uint32_t sa0_off, sa1_off;  // the row scales of acc_row(tid, 0) and acc_row(tid, 2) in a scale slot
  uint32_t da0, db0;          // the descriptors' low words of slot 0: this warpgroup's A rows, the B rows
};
template <bool kGateUp, int kBRows, int kWGroups, int kStages, int kScaleBytes>
__device__ __forceinline__ bool ws_roles(const Args& args, uint32_t base, uint32_t scales, const WsRing<kStages>& ring,
                                         MmaThread& m) {
  ring.init(8);
  if (threadIdx.x < 128) {
    regs_dealloc<kWsProducerRegs>();
    ws_produce<kGateUp, kBRows, kWGroups, kStages, kScaleBytes>(args, base, scales, ring);
    return true;
  }
  regs_alloc<kWsMmaRegs>();
  m.tid = threadIdx.x - 128;
  const int wg = m.tid >> 7;
  m.sa0_off = 4 * acc_row(m.tid, 0);
  m.sa1_off = 4 * acc_row(m.tid, 2);
  m.da0 = desc_lo(base + desc_a_off(wg, 0));
  m.db0 = desc_lo(base + desc_b_off(0));
  return false;
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kGateUp>
__global__ void __launch_bounds__(kWsThreads, 1) moe_fp8_ws_kernel(const __grid_constant__ Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;  // outputs per N-tile
  const int n_k = args.k_dim / kTileK;
  const int n_tiles = (args.n_out + kNStep - 1) / kNStep;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t scales = base + kWsScaleOff;  // slot s: [0, 128) row scales, [128] gate / down, [129] up
  const WsRing<kWsStages> ring{base + kWsBarOff};
  MmaThread m;
  if (ws_roles<kGateUp, kBN, 1, kWsStages, kWsScaleBytes>(args, base, scales, ring, m)) return;

  // ---- the two MMA warpgroups: rows 64·wg .. of the tile
  const int tid = m.tid;
  const uint32_t sa0_off = m.sa0_off, sa1_off = m.sa1_off, da0 = m.da0, db0 = m.db0;
  float acc[kAcc], t0[kAcc], t1[kAcc];
#pragma unroll
  for (int i = 0; i < kAcc; ++i) t0[i] = t1[i] = 0.0f;
  // The next step to issue and the next to retire (steps counted over the CTA's N-tiles and items).
  RingPos<kWsStages> ip, rp;
  // The next step into tmp: wait for its slot, issue its wgmmas.
  auto issue = [&](float(&tmp)[kAcc]) {
    mbar_wait(ring.full(ip.slot), ip.phase);
    // Kernel 1's A tile was written by cp.async (generic proxy) and wgmma reads it (async proxy).
    // Kernel 2's tiles are TMA's (async proxy) and its scales are read by ld.shared: no fence.
    if constexpr (kGateUp) fence_async_smem();
    const uint32_t off = static_cast<uint32_t>(ip.slot) * (kStageBytes >> 4);
    wgmma_kstep_lo(tmp, da0 + off, db0 + off);
    ip.next();
  };
  // The oldest step in flight from tmp into acc, once at most `pending` later wgmma groups are in
  // flight: read the slot's scales, release the slot (its tiles were read by the finished wgmmas),
  // promote.
  auto retire = [&](float(&tmp)[kAcc], auto pending) {
    wgmma_wait<decltype(pending)::value>();
    fence_regs(tmp);
    const int s = rp.slot;
    rp.next();
    const uint32_t sc = scales + s * kWsScaleBytes;
    const float sa0 = lds_f32(sc + sa0_off), sa1 = lds_f32(sc + sa1_off);
    const float sb1 = lds_f32(sc + 4 * 128), sb2 = kGateUp ? lds_f32(sc + 4 * 129) : sb1;
    __syncwarp();  // every lane of the warp has read the scales
    if ((tid & 31) == 0) mbar_arrive(ring.empty(s));
    promote<kGateUp>(acc, tmp, sa0, sa1, sb1, sb2);
  };
  const std::integral_constant<int, 1> one_pending;
  const std::integral_constant<int, 0> none_pending;
  ws_for_each_item<true>(args.tile_start, args.offsets, args.count, n_tiles, args.n_per_cta,
                         [&](const MoeTile& tile, int j_begin, int j_end) {
                           for (int j = j_begin; j < j_end; ++j) {
#pragma unroll
                             for (int i = 0; i < kAcc; ++i) acc[i] = 0.0f;
                             // Steps alternate between t0 (even) and t1 (odd); the promotion of step kt - 1
                             // runs while the wgmmas of step kt are in flight.
                             issue(t0);
                             int kt = 1;
                             for (; kt + 1 < n_k; kt += 2) {
                               issue(t1);
                               retire(t0, one_pending);
                               issue(t0);
                               retire(t1, one_pending);
                             }
                             if (kt < n_k) {  // n_k even: the last step is odd
                               issue(t1);
                               retire(t0, one_pending);
                               retire(t1, none_pending);
                             } else {
                               retire(t0, none_pending);
                             }
                             if (kGateUp && args.act_q != nullptr)
                               store_act_fp8_tile<2>(acc, args, tid, tile, j, base + kWsStashOff);
                             else
                               store_tile<kGateUp, kBN>(acc, tile_out(args), tid, tile.rows_left,
                                                        tile.seg_begin + tile.m0, j * kNStep);
                           }
                         });
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// promote for the 128 x 192 tile: sb[c] is the block scale of column group c (32 columns; 0..2
// gate's, 3..5 up's), acc[idx] in n8-tile idx / 4, group idx / 16.
__device__ __forceinline__ void promote192(float (&acc)[kAcc192], const float (&tmp)[kAcc192], float sa0, float sa1,
                                           const float (&sb)[6]) {
  float f[6][2];
#pragma unroll
  for (int c = 0; c < 6; ++c) {
    f[c][0] = sa0 * sb[c];
    f[c][1] = sa1 * sb[c];
  }
#pragma unroll
  for (int idx = 0; idx < kAcc192; ++idx) acc[idx] = fmaf(tmp[idx], f[idx >> 4][(idx >> 1) & 1], acc[idx]);
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The gate‖up GEMM on 128 x 192 tiles (MoeFp8GemmArgs::n192), warp-specialized as
// moe_fp8_ws_kernel<true>: the producer puts B (gate rows n0.. and up rows n0.., boxes of 96 rows:
// Fp8ExpertTables::gateup_maps192) on TMA and gathers x's rows by cp.async, the MMA warpgroups
// issue a k-step, wait for it and promote it. kQuant: the epilogue quantizes act
// (store_act_fp8), else act goes out in BF16 (store_tile) and is quantized after. Its values,
// and their order, are moe_fp8_ws_kernel's: act and its codes bit for bit the same.
template <bool kQuant>
__global__ void __launch_bounds__(kWsThreads, 1) moe_fp8_ws192_kernel(const __grid_constant__ Args args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kNStep = kBN192 / 2;  // outputs per N-tile
  const int n_k = args.k_dim / kTileK;
  const int n_tiles = (args.n_out + kNStep - 1) / kNStep;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  constexpr int kStages = ws192_stages(kQuant);
  const uint32_t scales = base + ws192_scale_off(kQuant);  // slot s: [0, 128) row scales, [128, 134) group scales
  const WsRing<kStages> ring{base + ws192_bar_off(kQuant)};
  MmaThread m;  // the producer: 96-row B boxes, 3 column groups of 32 per half
  if (ws_roles<true, kBN192, 3, kStages, kWs192ScaleBytes>(args, base, scales, ring, m)) return;

  // ---- the two MMA warpgroups
  const int tid = m.tid;
  const uint32_t sa0_off = m.sa0_off, sa1_off = m.sa1_off, da0 = m.da0, db0 = m.db0;
  float acc[kAcc192], tmp[kAcc192];
#pragma unroll
  for (int i = 0; i < kAcc192; ++i) tmp[i] = 0.0f;
  RingPos<kStages> pos;
  ws_for_each_item<true>(args.tile_start, args.offsets, args.count, n_tiles, args.n_per_cta,
                         [&](const MoeTile& tile, int j_begin, int j_end) {
                           for (int j = j_begin; j < j_end; ++j) {
#pragma unroll
                             for (int i = 0; i < kAcc192; ++i) acc[i] = 0.0f;
                             for (int kt = 0; kt < n_k; ++kt, pos.next()) {
                               const int s = pos.slot;
                               mbar_wait(ring.full(s), pos.phase);
                               fence_async_smem();  // A was written by cp.async (generic proxy)
                               const uint32_t off = static_cast<uint32_t>(s) * (kStage192Bytes >> 4);
                               wgmma_kstep_lo(tmp, da0 + off, db0 + off);
                               const uint32_t sc = scales + s * kWs192ScaleBytes;
                               const float sa0 = lds_f32(sc + sa0_off), sa1 = lds_f32(sc + sa1_off);
                               float sb[6];
#pragma unroll
                               for (int c = 0; c < 6; ++c) sb[c] = lds_f32(sc + 4 * (128 + c));
                               wgmma_wait<0>();
                               fence_regs(tmp);
                               __syncwarp();  // every lane has read the scales, the wgmmas the tiles
                               if ((tid & 31) == 0) mbar_arrive(ring.empty(s));
                               promote192(acc, tmp, sa0, sa1, sb);
                             }
                             if constexpr (kQuant) {
                               store_act_fp8_tile<3>(acc, args, tid, tile, j, base + ws192_stash_off(true));
                             } else {
                               store_tile<true, kBN192>(acc, tile_out(args), tid, tile.rows_left,
                                                        tile.seg_begin + tile.m0, j * kNStep);
                             }
                           }
                         });
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class Kernel>
cudaError_t launch(Kernel kernel, const Args& args, int n_step, int64_t m_slots, int threads, size_t smem,
                   cudaStream_t stream) {
  const cudaError_t err = opt_in_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t n_tiles = (args.n_out + n_step - 1) / n_step;
  const dim3 grid(static_cast<unsigned>((n_tiles + args.n_per_cta - 1) / args.n_per_cta),
                  static_cast<unsigned>(m_slots));
  kernel<<<grid, threads, smem, stream>>>(args);
  return cudaGetLastError();
}

// A warp-specialized kernel over N-tiles of n_step outputs: one CTA per SM walking the items
// (persistent) or one per item.
cudaError_t launch_ws(void (*kernel)(Args), const Args& args, int n_step, size_t smem, bool persistent, int64_t m_slots,
                      cudaStream_t stream) {
  cudaError_t err = opt_in_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int64_t n_tiles = (args.n_out + n_step - 1) / n_step;
  unsigned grid = 0;
  err = ws_grid(m_slots * ((n_tiles + args.n_per_cta - 1) / args.n_per_cta), persistent, grid);
  if (err != cudaSuccess) return err;
  kernel<<<grid, kWsThreads, smem, stream>>>(args);
  return cudaGetLastError();
}

template <bool kGateUp>
cudaError_t launch_one(const Args& args, bool ws, bool persistent, int64_t m_slots, cudaStream_t stream) {
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;
  if (!ws) return launch(moe_fp8_wgmma_kernel<kGateUp>, args, kNStep, m_slots, kThreads, kSmemBytes, stream);
  return launch_ws(moe_fp8_ws_kernel<kGateUp>, args, kNStep, ws_smem_bytes(kGateUp), persistent, m_slots, stream);
}

cudaError_t launch_192(const Args& args, bool quant, bool persistent, int64_t m_slots, cudaStream_t stream) {
  return launch_ws(quant ? moe_fp8_ws192_kernel<true> : moe_fp8_ws192_kernel<false>, args, kBN192 / 2,
                   ws192_smem_bytes(quant), persistent, m_slots, stream);
}

// Whether the GEMM runs the ws kernel: it reads the weight tiles (and kernel 2 its A tiles) through
// TMA, so without the descriptors the first kernels run; the gate‖up ws producer addresses x rows
// in 16-byte units of 32 bits (x below 2^36 bytes).
bool runs_ws(const MoeFp8GemmArgs& a, bool gate_up) {
  return a.warp_specialized && a.tables.weight_maps != nullptr &&
         (!gate_up || static_cast<int64_t>(a.n_tokens) * a.hidden < (int64_t{1} << 36));
}
// Whether the gate‖up GEMM runs on the 128 x 192 tiles: the ws kernel with their descriptors, and
// I a multiple of 384 (whole windows of act's quantization).
bool runs_192(const MoeFp8GemmArgs& a) {
  return a.n192 && a.tables.gateup_maps192 != nullptr && a.inter % 384 == 0 && runs_ws(a, true);
}
// The N-tiles per CTA of a launch: as given, else 4 on the 128 x 192 gate‖up tiles (a window of
// act's quantization) and in the ws down GEMM (H100, 2026-12-07 09:27, moe_bench fp8.ws.dN, three
// rounds: the MoE block 0.6% faster than at 2 at 4K tokens, level or faster at 16K and 32K),
// moe_fp8_n_per_cta on 128 x 128 gate‖up tiles, 2 in the first kernels.
int n_per_cta_of(const MoeFp8GemmArgs& a, bool ws, bool gate_up) {
  if (a.n_per_cta > 0) return a.n_per_cta;
  if (!ws) return 2;
  if (!gate_up || runs_192(a)) return 4;
  return moe_fp8_n_per_cta(a.n_pairs);
}

}  // namespace

bool moe_fp8_gate_up_needs_act(const MoeFp8GemmArgs& a) {
  const bool ws = runs_ws(a, true);
  // The 128 x 192 tiles quantize act in windows of 4 N-tiles (384 columns), the 128 x 128 tiles in
  // pairs (128).
  if (runs_192(a)) return n_per_cta_of(a, ws, true) % 4 != 0;
  return !ws || n_per_cta_of(a, ws, true) % 2 != 0;
}

cudaError_t launch_moe_grouped_gemm_fp8_wgmma(const MoeFp8GemmArgs& a, bool gate_up, cudaStream_t stream) {
  if (a.count == 0 || a.n_pairs == 0) return cudaSuccess;
  if (!moe_fp8_grouped_supported(a.hidden, a.inter) || a.n_per_cta < 0 || a.n_per_cta > 64)
    return cudaErrorInvalidValue;
  const int64_t m_slots = moe_grouped_gemm_max_tiles(a.n_pairs, a.count);
  if (m_slots > 65535) return cudaErrorInvalidValue;
  const bool ws = runs_ws(a, gate_up);
  Args k{};
  const auto* maps = static_cast<const CUtensorMap*>(a.tables.weight_maps);
  k.offsets = a.offsets;
  k.tile_start = a.tile_start;
  k.count = a.count;
  k.n_per_cta = n_per_cta_of(a, ws, gate_up);
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
    k.wmap1 = maps;
    k.wmap2 = ws ? maps + a.count : nullptr;
    const bool quant = !moe_fp8_gate_up_needs_act(a);  // the ws kernel quantizes act in its epilogue
    if (quant) {
      k.act_q = a.aq;
      k.act_q_scale = a.act_scale;
    } else if (a.act == nullptr) {
      return cudaErrorInvalidValue;
    }
    const bool tiles192 = runs_192(a);
    if (tiles192) {
      k.wmap1 = static_cast<const CUtensorMap*>(a.tables.gateup_maps192);
      k.wmap2 = k.wmap1 + a.count;
    }
    const cudaError_t err = tiles192 ? launch_192(k, quant, a.persistent, m_slots, stream)
                                     : launch_one<true>(k, ws, a.persistent, m_slots, stream);
    if (err != cudaSuccess || quant) return err;
    DevTensor act;
    act.data = a.act;
    act.dtype = DType::BF16;
    act.ndim = 2;
    act.shape[0] = a.n_pairs;
    act.shape[1] = a.inter;
    return launch_fp8_quantize_rows(act, a.aq, a.act_scale, a.offsets, a.count, stream);
  }
  k.a = a.aq;
  k.a_scale = a.act_scale;
  k.w1 = reinterpret_cast<const uint8_t* const*>(a.tables.down);
  k.s1 = reinterpret_cast<const float* const*>(a.tables.down_scale);
  k.s2 = k.s1;
  k.n_out = static_cast<int>(a.hidden);
  k.k_dim = static_cast<int>(a.inter);
  k.out = a.y;
  k.out_bf16 = a.y_bf16;
  k.wmap1 = ws ? maps + 2 * static_cast<int64_t>(a.count) : nullptr;
  if (ws && !encode_byte_rows(&k.amap, a.aq, a.n_pairs, a.inter, kTileM)) return cudaErrorInvalidValue;
  return launch_one<false>(k, ws, a.persistent, m_slots, stream);
}

bool encode_moe_fp8_gateup192_maps(const void* const* codes, int count, int64_t hidden, int64_t inter, void* maps) {
  auto* m = static_cast<CUtensorMap*>(maps);
  for (int e = 0; e < 2 * count; ++e)
    if (!encode_byte_rows(m + e, codes[e], inter, hidden, kBN192 / 2)) return false;
  return true;
}

static_assert(sizeof(CUtensorMap) == kTmaDescBytes, "kernels.h sizes the descriptor arrays by kTmaDescBytes");

bool encode_moe_fp8_weight_maps(const void* const* codes, int count, int64_t hidden, int64_t inter, void* maps) {
  auto* m = static_cast<CUtensorMap*>(maps);
  for (int e = 0; e < 3 * count; ++e) {
    const bool down = e >= 2 * count;
    if (!encode_byte_rows(m + e, codes[e], down ? hidden : inter, down ? inter : hidden, kBN / 2)) return false;
  }
  return true;
}

}  // namespace cpinfer::cuda
