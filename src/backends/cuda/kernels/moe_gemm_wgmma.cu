// Hopper (sm_90a) versions of the two grouped expert GEMMs of kernels/moe_gemm.cu: the same
// semantics and the same device-side scheduling (grid.y = M-tile slot bounded on the host by
// ceil(n_pairs / 128) + count, grid.x = group of n_per_cta N-tiles; a CTA finds (expert, M-tile)
// by binary search over tile_start, CTAs past the last tile exit), with the math on warpgroup MMA
// (wgmma) reading both operands from shared memory.
//
// CTA = 128 rows (kMoeGemmTileM, the tile_m of the permutation) x kBN B rows, 256 threads = two
// warpgroups of 64 rows, each issuing wgmma m64n{kBN}k16 per 16 columns of K. K advances 64 at a
// time (one 128-byte swizzle atom of bf16):
//   A tile  [128 rows][64 k] = 16 KB: x rows gathered through src_token (kernel 1) or act rows;
//   B tile  [kBN rows][64 k]: expert weight rows, K-contiguous (the K-major B of wgmma, no
//           transpose). Kernel 1: rows 0..kBN/2-1 = gate rows n0.., rows kBN/2.. = the same up
//           rows, so accumulator columns c and c + kBN/2 hold g and u of output n0 + c in the same
//           thread (SiLU·mul in registers, as the mma.sync kernel). Kernel 2: down rows n0...
// Shared layout (as attention_wgmma.cu, which was verified on the H200): rows of 128 bytes, 16-byte
// chunk c of row r stored at chunk c ^ (r % 8), every tile 1024-byte aligned; descriptors with
// 128B swizzle, SBO = 1024 (8-row groups), the k16 step selected by +32 bytes on the start address.
// Loads: every thread cp.asyncs 16-byte chunks (chunk tid % 8 of rows tid / 8 + 32 i), rows past
// the segment (A) or past N (B) zero-filled; no TMA (the A rows are scattered).
// Pipeline (kStages slots): iteration kt waits for its slot (cp.async.wait_group + proxy fence +
// barrier), issues its 4 wgmmas, waits until only those are in flight (so kt-1 is done), a second
// barrier makes that true for both warpgroups, then slot (kt-1) % kStages is refilled with
// k-step kt + kStages - 1. The tensor cores always have the current step queued while the loads
// of the next kStages - 1 steps are in flight. A CTA computes n_per_cta N-tiles of its M-tile in
// turn: once the last wgmma of one is done, the first kStages - 1 steps of the next are loaded and
// only then is the finished one written, so the loads overlap the epilogue (which matters most
// with one CTA per SM).
//   kBN = 256: 4 stages x 48 KB = 192 KB (+1 KB alignment slack), 1 CTA (8 warps) per SM,
//              128 fp32 accumulators per thread, 188-203 registers, no spills (nvcc 13). The default,
//              with 2 N-tiles per CTA.
//   kBN = 128: 3 stages x 32 KB = 96 KB (+1 KB), 2 CTAs per SM (<= 128 registers: 120-128), 64
//              accumulators per thread: the alternative (--moe-runner-backend wgmma128), for tuning.
// Epilogue straight from the accumulators (store_tile): d[4n + e] is row 16·warp + lane/4 + 8·(e/2)
// of the warpgroup's 64, column 8n + 2·(lane%4) + e%2 (the mapping attention_wgmma.cu uses). The
// tile geometry, the epilogue and the warp-specialized ring are moe_gemm_tiles.cuh's.
// Requirements (the caller checks): H and I multiples of 64, 16-byte aligned pointers, a compute
// capability 9.0 device (there is no code for others). N edges (I % 128 with kBN = 256, H % kBN)
// are masked.
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/moe_gemm_args.cuh"
#include "backends/cuda/kernels/moe_gemm_tiles.cuh"

namespace cpinfer::cuda {
namespace {

using namespace moe_tiles;  // tile geometry, store_tile, the ws ring (moe_gemm_tiles.cuh)

constexpr int kTileK = 64;                      // bf16 per 128-byte row of a tile
constexpr int kThreads = 256;                   // two warpgroups
constexpr int kALoads = kTileM / kRowsPerPass;  // 4 chunks per thread per stage

template <int kBN>
struct WgCfg {
  static_assert(kBN == 128 || kBN == 256, "tile N");
  static constexpr int kStages = kBN == 256 ? 4 : 3;
  static constexpr int kMinBlocks = kBN == 256 ? 1 : 2;
  static constexpr int kBBytes = kBN * kRowBytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kBLoads = kBN / kRowsPerPass;  // 8 or 4
  static constexpr int kAcc = kBN / 2;                // fp32 accumulators per thread (64 x kBN / 128)
  static constexpr size_t kSmemBytes = static_cast<size_t>(kStages) * kStageBytes + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

__device__ __forceinline__ TileOut tile_out(const MoeGemmArgs& a) { return TileOut{a.out, a.n_out, a.out_bf16}; }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

using namespace cpinfer::cuda::hopper;

// d[64] += A[64 x 16] · B[128 x 16]ᵀ, both from shared memory (K-major, 128-byte swizzle).
__device__ __forceinline__ void wgmma_n128(float (&d)[64], uint64_t da, uint64_t db) { wgmma_m64n128_ss(d, da, db, 1); }

// d[128] += A[64 x 16] · B[256 x 16]ᵀ, both from shared memory (K-major, 128-byte swizzle).
__device__ __forceinline__ void wgmma_n256(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,"
      "%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, %128, %129, p, 1, 1, 0, "
      "0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
        "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
        "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]),
        "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]),
        "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]),
        "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]),
        "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]),
        "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]),
        "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]),
        "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),
        "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db));
}

template <int kBN>
__device__ __forceinline__ void wgmma_tile(float (&d)[kBN / 2], uint64_t da, uint64_t db) {
  if constexpr (kBN == 256)
    wgmma_n256(d, da, db);
  else
    wgmma_n128(d, da, db);
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <bool kGateUp, int kBN>
__global__ void __launch_bounds__(kThreads, WgCfg<kBN>::kMinBlocks)
    moe_grouped_gemm_wgmma_kernel(const MoeGemmArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = WgCfg<kBN>;
  constexpr int kStages = C::kStages;
  // ---- which (expert, M-tile) this CTA computes: all from device memory (as moe_gemm.cu)
  MoeTile tile;
  if (!moe_tile_of(args.tile_start, args.offsets, args.count, blockIdx.y, kTileM, tile)) return;
  const int e = tile.expert, seg_begin = tile.seg_begin, m0 = tile.m0, rows_left = tile.rows_left;
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;  // outputs per N-tile
  const int k_dim = args.k_dim, n_out = args.n_out;
  // N-tiles [j_begin, j_end) of this CTA, in sequence: the next one's first loads overlap the
  // epilogue of the current one.
  const int n_tiles = (n_out + kNStep - 1) / kNStep;
  const int j_begin = blockIdx.x * args.n_per_cta;
  const int j_end = min(j_begin + args.n_per_cta, n_tiles);

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const int tid = threadIdx.x;

  // ---- per-thread loads: chunk load_chunk(tid) of rows load_row(tid, i)
  const int chunk = load_chunk(tid);
  const uint32_t st_off = swizzled_off(load_row(tid, 0), chunk);  // + i·32 rows: (r & 7) is the same
  const __nv_bfloat16* a_src[kALoads];
  const __nv_bfloat16* b_src[C::kBLoads];
  uint32_t a_ok = 0, b_ok = 0;
#pragma unroll
  for (int i = 0; i < kALoads; ++i) {
    const int r = load_row(tid, i);
    const bool ok = r < rows_left;
    int64_t a_row = 0;
    if (ok) a_row = kGateUp ? __ldg(args.src_token + seg_begin + m0 + r) : seg_begin + m0 + r;
    a_src[i] = args.a + a_row * k_dim + chunk * 8;
    a_ok |= static_cast<uint32_t>(ok) << i;
  }
  const __nv_bfloat16* w1 = args.w1[e];
  const __nv_bfloat16* w2 = kGateUp ? args.w2[e] : nullptr;
  auto set_b = [&](int n0) {  // B rows of the N-tile starting at output n0
    b_ok = 0;
#pragma unroll
    for (int i = 0; i < C::kBLoads; ++i) {
      const int r = load_row(tid, i);
      const int n = n0 + (kGateUp ? gateup_row(r, kBN) : r);
      const bool ok = n < n_out;
      const __nv_bfloat16* w = kGateUp && gateup_is_up(r, kBN) ? w2 : w1;
      b_src[i] = w + static_cast<int64_t>(ok ? n : 0) * k_dim + chunk * 8;
      b_ok |= static_cast<uint32_t>(ok) << i;
    }
  };
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sa = base + slot * C::kStageBytes + st_off;
    const uint32_t sb = sa + kABytes;
    const int k0 = kt * kTileK;
#pragma unroll
    for (int i = 0; i < kALoads; ++i) cp_async16(sa + i * kRowsPerPass * kRowBytes, a_src[i] + k0, (a_ok >> i) & 1);
#pragma unroll
    for (int i = 0; i < C::kBLoads; ++i) cp_async16(sb + i * kRowsPerPass * kRowBytes, b_src[i] + k0, (b_ok >> i) & 1);
  };
  const int n_k = k_dim / kTileK;
  auto prologue = [&]() {  // steps 0 .. kStages - 2 into slots 0 .. kStages - 2 (all free)
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < n_k) load_stage(s, s);
      cp_async_commit();
    }
  };

  set_b(j_begin * kNStep);
  prologue();
  const int wg = tid >> 7;
  float acc[C::kAcc];
  for (int j = j_begin; j < j_end; ++j) {
    const int n0 = j * kNStep;
#pragma unroll
    for (int i = 0; i < C::kAcc; ++i) acc[i] = 0.0f;
    for (int kt = 0; kt < n_k; ++kt) {
      cp_async_wait<kStages - 2>();  // this thread's chunks of step kt have landed
      // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();  // everyone's chunks of step kt are visible
      const uint32_t stage = base + (kt % kStages) * C::kStageBytes;
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kTileK / 16; ++ks) {
        const uint64_t da = make_desc(stage + desc_a_off(wg, ks), 16, 1024);
        const uint64_t db = make_desc(stage + desc_b_off(ks), 16, 1024);
        wgmma_tile<kBN>(acc, da, db);
      }
      wgmma_commit();
      wgmma_wait<1>();  // this warpgroup's step kt - 1 is done (step kt stays queued)
      __syncthreads();  // ... and the other warpgroup's: slot (kt - 1) % kStages is free
      const int next = kt + kStages - 1;
      if (next < n_k) load_stage(next % kStages, next);
      cp_async_commit();
    }
    wgmma_wait<0>();
    fence_regs(acc);
    if (j + 1 < j_end) {
      // Every slot is free once both warpgroups are done (every real cp.async was waited for in the
      // loop): start the next N-tile's loads, then write this one.
      __syncthreads();
      set_b(n0 + kNStep);
      prologue();
    }

    store_tile<kGateUp, kBN>(acc, tile_out(args), tid, rows_left, seg_begin + m0, n0);
  }
  cp_async_wait<0>();  // only empty groups can be pending here
#endif                 // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- The warp-specialized version (MoeWgmmaConfig::warp_specialized; 128 x 256 tiles only).
// Nsight Compute on the kernel above (32K tokens, gate‖up) found every warp both issuing its share
// of the cp.async loads (address arithmetic: ~25% of the stall samples in dispatch) and waiting at
// the two __syncthreads of each k-step (~10%), with the tensor pipe 64% busy. Here the loads are a
// producer warpgroup's only work and the two MMA warpgroups meet the producer through mbarriers,
// never each other:
//   warpgroup 0 (producer, 88 registers): its 128 threads cp.async every A and B chunk of a k-step
//     into the ring slot (thread t: chunk t % 8 of rows t / 8 + 16 i, zero fill past the rows / N),
//     then arrive on the slot's full barrier when their copies land (count 128);
//   warpgroups 1, 2 (MMA, 208 registers): wait for a slot, issue its 4 wgmmas, commit, wait until
//     only those are in flight and release the previous slot (empty barrier, one arrival per
//     warpgroup); at the end of an N-tile the epilogue writes from registers while the producer
//     already fills the ring with the next tile's k-steps.
// Persistent (MoeWgmmaConfig::persistent, the default): min(items, SMs) CTAs walk the (M-tile,
// N-group) items (ws_for_each_item), so a new item's loads overlap the last one's epilogue instead
// of starting from an empty ring in a new CTA. Same epilogue (store_tile) as the kernel above.
constexpr int kWsThreads = 384;
constexpr int kWsStages = 4;
constexpr int kWsStageBytes = WgCfg<256>::kStageBytes;  // 16 KB A + 32 KB B
constexpr int kWsBarOff = kWsStages * kWsStageBytes;
constexpr size_t kWsSmemBytes = kWsBarOff + 2 * kWsStages * 8 + 1024;
static_assert(kWsSmemBytes <= 227 * 1024, "shared memory");
constexpr int kWsProducerRegs = 88, kWsMmaRegs = 208;  // 88·128 + 208·256 <= 65536; no spills (ptxas -v)

template <bool kGateUp>
__global__ void __launch_bounds__(kWsThreads, 1) moe_grouped_gemm_ws_kernel(const MoeGemmArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBN = 256;
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;
  const int k_dim = args.k_dim, n_out = args.n_out, n_k = k_dim / kTileK;
  const int n_tiles = (n_out + kNStep - 1) / kNStep;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const WsRing<kWsStages> ring{base + kWsBarOff};
  ring.init(2);  // empty: one arrival per MMA warpgroup

  if (threadIdx.x < 128) {
    // ---- producer: 128 threads cp.async every A and B chunk of a k-step. (A producer loop shared
    // with the FP8 kernel made this kernel 4-10% slower on the H200, moe_bench, same call.)
    regs_dealloc<kWsProducerRegs>();
    const int t = threadIdx.x, chunk = t & 7, rsub = t >> 3;  // rows rsub + 16 i
    const uint32_t st_off = static_cast<uint32_t>(rsub * kRowBytes + ((chunk ^ (rsub & 7)) << 4));
    const __nv_bfloat16* const a_base = args.a + chunk * 8;
    const int64_t b_step = static_cast<int64_t>(16) * k_dim;  // 16 B rows further
    uint32_t it = 0;
    ws_for_each_item<false>(
        args.tile_start, args.offsets, args.count, n_tiles, args.n_per_cta,
        [&](const MoeTile& tile, int j_begin, int j_end) {
          // A: the 8 rows of this thread (x rows through src_token, or act rows); row 0 where past the
          // segment (zero fill, nothing read).
          int a_row[8];
          uint32_t a_ok = 0;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            const int r = rsub + 16 * i;
            const bool ok = r < tile.rows_left;
            const int m = tile.seg_begin + tile.m0 + r;
            a_row[i] = ok ? (kGateUp ? __ldg(args.src_token + m) : m) : 0;
            a_ok |= static_cast<uint32_t>(ok) << i;
          }
          const __nv_bfloat16* const w1 = args.w1[tile.expert];
          const __nv_bfloat16* const w2 = kGateUp ? args.w2[tile.expert] : nullptr;
          for (int j = j_begin; j < j_end; ++j) {
            // B rows of this N-tile: row rsub + 16 i is output n0 + rsub + 16 (i % 8) of gate (i < 8)
            // or up (i >= 8) for gate‖up, output n0 + rsub + 16 i of down.
            const int n_first = j * kNStep + rsub;
            const __nv_bfloat16* b_lo = w1 + static_cast<int64_t>(n_first) * k_dim + chunk * 8;
            const __nv_bfloat16* b_hi =
                kGateUp ? w2 + static_cast<int64_t>(n_first) * k_dim + chunk * 8 : b_lo + 8 * b_step;
            uint32_t b_ok = 0;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
              const int n = n_first + 16 * (kGateUp ? (i & 7) : i);
              b_ok |= static_cast<uint32_t>(n < n_out) << i;
            }
            for (int kt = 0; kt < n_k; ++kt, ++it) {
              const int s = ring.slot(it);
              mbar_wait(ring.empty(s), ring.parity(it) ^ 1);
              const uint32_t sa = base + s * kWsStageBytes + st_off, sb = sa + kABytes;
              const int k0 = kt * kTileK;
#pragma unroll
              for (int i = 0; i < 8; ++i)
                cp_async16(sa + i * 16 * kRowBytes, a_base + (static_cast<int64_t>(a_row[i]) * k_dim + k0),
                           (a_ok >> i) & 1);
#pragma unroll
              for (int i = 0; i < 16; ++i) {
                const bool ok = (b_ok >> i) & 1;
                const __nv_bfloat16* src = (i < 8 ? b_lo + i * b_step : b_hi + (i - 8) * b_step) + k0;
                cp_async16(sb + i * 16 * kRowBytes, ok ? src : w1, ok);
              }
              mbar_arrive_cp_async(ring.full(s));
            }
          }
        });
    cp_async_wait<0>();  // the last copies land before this thread leaves
    return;
  }

  // ---- the two MMA warpgroups: rows 64·wg .. of the tile
  regs_alloc<kWsMmaRegs>();
  const int tid = threadIdx.x - 128, wg = tid >> 7;
  float acc[kBN / 2];
  uint32_t it = 0;
  ws_for_each_item<false>(args.tile_start, args.offsets, args.count, n_tiles, args.n_per_cta,
                          [&](const MoeTile& tile, int j_begin, int j_end) {
                            for (int j = j_begin; j < j_end; ++j) {
#pragma unroll
                              for (int i = 0; i < kBN / 2; ++i) acc[i] = 0.0f;
                              int prev = -1;
                              for (int kt = 0; kt < n_k; ++kt, ++it) {
                                const int s = ring.slot(it);
                                mbar_wait(ring.full(s), ring.parity(it));
                                fence_async_smem();  // the slot was written by cp.async (generic proxy); wgmma reads it
                                const uint32_t stage = base + s * kWsStageBytes;
                                wgmma_fence();
#pragma unroll
                                for (int ks = 0; ks < kTileK / 16; ++ks)
                                  wgmma_n256(acc, make_desc(stage + desc_a_off(wg, ks), 16, 1024),
                                             make_desc(stage + desc_b_off(ks), 16, 1024));
                                wgmma_commit();
                                wgmma_wait<1>();  // the previous k-step's wgmmas are done: its slot can be refilled
                                if (prev >= 0 && (tid & 127) == 0) mbar_arrive(ring.empty(prev));
                                prev = s;
                              }
                              wgmma_wait<0>();
                              fence_regs(acc);
                              if (prev >= 0 && (tid & 127) == 0) mbar_arrive(ring.empty(prev));
                              store_tile<kGateUp, kBN>(acc, tile_out(args), tid, tile.rows_left,
                                                       tile.seg_begin + tile.m0, j * kNStep);
                            }
                          });
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <bool kGateUp>
cudaError_t launch_one_ws(const MoeGemmArgs& args, int64_t m_slots, bool persistent, cudaStream_t stream) {
  const cudaError_t err = opt_in_dynamic_smem(moe_grouped_gemm_ws_kernel<kGateUp>, kWsSmemBytes);
  if (err != cudaSuccess) return err;
  constexpr int kNStep = kGateUp ? 128 : 256;
  const int64_t n_tiles = (args.n_out + kNStep - 1) / kNStep;
  unsigned grid = 0;
  const cudaError_t gerr = ws_grid(m_slots * ((n_tiles + args.n_per_cta - 1) / args.n_per_cta), persistent, grid);
  if (gerr != cudaSuccess) return gerr;
  moe_grouped_gemm_ws_kernel<kGateUp><<<grid, kWsThreads, kWsSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <bool kGateUp, int kBN>
cudaError_t launch_one(const MoeGemmArgs& args, int64_t m_slots, cudaStream_t stream) {
  const cudaError_t err = opt_in_dynamic_smem(moe_grouped_gemm_wgmma_kernel<kGateUp, kBN>, WgCfg<kBN>::kSmemBytes);
  if (err != cudaSuccess) return err;
  constexpr int kNStep = kGateUp ? kBN / 2 : kBN;
  const int64_t n_tiles = (args.n_out + kNStep - 1) / kNStep;
  const dim3 grid(static_cast<unsigned>((n_tiles + args.n_per_cta - 1) / args.n_per_cta),
                  static_cast<unsigned>(m_slots));
  moe_grouped_gemm_wgmma_kernel<kGateUp, kBN><<<grid, kThreads, WgCfg<kBN>::kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_moe_grouped_gemms_wgmma(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                           const int32_t* tile_start, int64_t n_pairs, int count,
                                           const void* const* gate, const void* const* up, const void* const* down,
                                           int64_t inter, void* act, void* y, const MoeWgmmaConfig& cfg,
                                           cudaStream_t stream) {
  int64_t m_slots = 0;
  bool nothing = false;
  cudaError_t err = moe_grouped_check(x, inter, n_pairs, count, m_slots, nothing);
  if (err != cudaSuccess || nothing) return err;
  const bool cfg_ok = (cfg.tile_n_gateup == 128 || cfg.tile_n_gateup == 256) &&
                      (cfg.tile_n_down == 128 || cfg.tile_n_down == 256) && cfg.n_per_cta >= 1 && cfg.n_per_cta <= 64;
  if (!cfg_ok) return cudaErrorInvalidValue;

  MoeGemmArgs a1 = moe_gateup_args(x, src_token, offsets, tile_start, count, gate, up, inter, act);
  a1.n_per_cta = cfg.n_per_cta;
  if (cfg.warp_specialized) {
    if (cfg.tile_n_gateup != 256 || cfg.tile_n_down != 256) return cudaErrorInvalidValue;
    err = launch_one_ws<true>(a1, m_slots, cfg.persistent, stream);
    return err != cudaSuccess
               ? err
               : launch_one_ws<false>(moe_down_args(a1, down, y, cfg.y_bf16), m_slots, cfg.persistent, stream);
  }
  err = cfg.tile_n_gateup == 256 ? launch_one<true, 256>(a1, m_slots, stream)
                                 : launch_one<true, 128>(a1, m_slots, stream);
  if (err != cudaSuccess) return err;
  const MoeGemmArgs a2 = moe_down_args(a1, down, y, cfg.y_bf16);
  return cfg.tile_n_down == 256 ? launch_one<false, 256>(a2, m_slots, stream)
                                : launch_one<false, 128>(a2, m_slots, stream);
}

}  // namespace cpinfer::cuda
