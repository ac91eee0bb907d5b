// Hopper (sm_90a) warp-specialized causal prefill attention, organised the way FlashAttention-3
// is: the same contract as attention.cu (paged KV, any GQA ratio, ragged blocks, key ranges, LSE).
//
// A persistent CTA (one per SM) = 3 warpgroups. Warpgroup 0 is the producer: one warp fetches
// work items from a global counter and loads, per item, the 128 query rows of one head (TMA) and
// then the K and V tiles of 128 keys, last tile first, into a two-stage ring of shared-memory
// buffers guarded by mbarriers; its registers are given to the consumers (setmaxnreg).
// Warpgroups 1 and 2 are the consumers, 64 query rows each:
//   S = Q·Kᵀ  wgmma m64n128k16, Q and K from shared memory;
//   O += P·V  wgmma m64n128k16, P from registers (the S accumulators as bf16), V from shared memory.
// Each consumer issues tile j's Q·Kᵀ together with tile j-1's P·V and runs tile j's softmax while
// P·V is in flight (overlap within a warpgroup); a pair of named barriers makes the two consumers
// take turns issuing (ping-pong), so one's softmax runs under the other's GEMMs. Masks are applied
// only on tiles that cross the diagonal or a key-range edge.
//
// In two passes (AttentionWsConfig::two_pass, the default), the first finds the row max (the
// softmax's reference) only on an item's first and last tiles (the last holds the first keys of
// the range: a sequence's start, where attention sinks score highest) and on masked tiles; on the
// others each row's exponentials are taken against its running max as it stands (the max was 5-7%
// of the kernel's time on an H100). Any reference gives the same result while the probabilities
// stay finite: they and their sums carry a common factor that the later rescales and O / l cancel.
// A score far above the running max (~88 nats) makes them overflow, and then the inf or NaN reaches
// the item's l or O and stays there: the item's epilogue sees it and marks the item in a bitmap,
// and the second pass, the one-pass kernel over the marked items, redoes them (none marked: each
// CTA exits at once).
//
// K/V pages: a chunk of R = min(block_size, 64) keys that lies inside the key range is one TMA box
// per 64-column half (block sizes that are powers of two >= 8); chunks that cross an edge of the
// range, and every chunk of other block sizes, are copied by the producer warp with cp.async and
// zero fill, so keys outside the range (never written, possibly NaN) reach the GEMMs as zeros.
// Work items (block, 128-row query tile, head) are handed out longest-first within a block (last
// query tile first, heads innermost so that the heads sharing a KV head run together; optionally
// in groups of KV heads whose K/V fit in L2, see AttentionWsConfig), blocks last to first; the
// counter resets itself when the grid ends.
// attention_ws.cuh holds the geometry, the parameters, the work items and the producer's K/V tile
// loads; this file the consumers' softmax and GEMMs, the kernel and its launcher.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <cfloat>

#include "backends/cuda/kernels/attention_ws.cuh"
#include "backends/cuda/kernels/common.cuh"
#include "backends/cuda/kernels/hopper.cuh"
#include "backends/cuda/kernels/kernels.h"
#include "backends/cuda/kernels/tma.h"

namespace cpinfer::cuda {
namespace {

using namespace cpinfer::cuda::attn_ws;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
using namespace cpinfer::cuda::hopper;

// Online softmax of one tile in place: s[4n + e] is row row0 + 8·(e >> 1), key k0 + 8n + 2·t4 +
// (e & 1). Masks keys outside [kv_begin, kv_bound) and after each row's position when asked;
// returns the factor that rescales the previous accumulators in corr. Without find_max (every row
// of the warp has a finite max already) the tile's exponentials are taken against the rows' max as
// it is, and corr is 1.
__device__ __forceinline__ void softmax_tile(float (&s)[64], float (&m)[2], float (&l)[2], float (&corr)[2], bool mask,
                                             int k0, int qpos0, int t4, int kv_begin, int kv_bound, float scale_log2,
                                             bool find_max) {
  if (mask) {
#pragma unroll
    for (int n = 0; n < 16; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = k0 + n * 8 + 2 * t4 + (e & 1);
        if (key > qpos0 + 8 * (e >> 1) || key < kv_begin || key >= kv_bound) s[4 * n + e] = -INFINITY;
      }
  }
  // Reductions in four independent chains per row: one warp per scheduler runs this at a time, so
  // its own instruction-level parallelism is what hides the latencies.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float row_max = -INFINITY;
    if (find_max) {
      float mx[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) mx[c] = fmaxf(s[4 * c + 2 * r], s[4 * c + 2 * r + 1]);
#pragma unroll
      for (int n = 4; n < 16; ++n) mx[n & 3] = fmaxf(mx[n & 3], fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      row_max = fmaxf(fmaxf(mx[0], mx[1]), fmaxf(mx[2], mx[3]));
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 1));
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, 2));
    }
    const float m_new = fmaxf(m[r], row_max * scale_log2);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // a row with no key yet stays empty
    corr[r] = fast_exp2(m[r] - m_use);
    m[r] = m_new;
    float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int n = 0; n < 16; ++n) {
      s[4 * n + 2 * r] = fast_exp2(fmaf(s[4 * n + 2 * r], scale_log2, -m_use));
      s[4 * n + 2 * r + 1] = fast_exp2(fmaf(s[4 * n + 2 * r + 1], scale_log2, -m_use));
      sum[n & 3] += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
    }
    l[r] = l[r] * corr[r] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
  }
}

// The probabilities as the bf16 A fragments of the eight k16 steps of P·V.
__device__ __forceinline__ void pack_p(uint32_t (&pa)[32], const float (&s)[64]) {
#pragma unroll
  for (int i = 0; i < 32; ++i) pa[i] = pack_bf16(s[2 * i], s[2 * i + 1]);
}

// The descriptors of one GEMM's k-steps differ from the first only in the start address (bits
// 0..13, in 16-byte units; shared addresses stay below 256 KB, so adding never carries out), so
// each step adds a constant instead of rebuilding its descriptor.
__device__ __forceinline__ void gemm_qk(float (&s)[64], uint32_t q, uint32_t k) {
  const uint64_t dq = make_desc(q, 16, 1024), dk = make_desc(k, 16, 1024);
#pragma unroll
  for (int ks = 0; ks < kD / 16; ++ks) {
    const uint32_t koff = (ks & 3) << 5;  // 16 columns = 32 bytes into the swizzle atom
    wgmma_m64n128_ss(s, dq + (((ks >> 2) * kQHalf + koff) >> 4), dk + (((ks >> 2) * kKVHalf + koff) >> 4),
                     ks > 0 ? 1 : 0);
  }
}

__device__ __forceinline__ void gemm_pv(float (&o)[64], const uint32_t (&pa)[32], uint32_t v) {
  const uint64_t dv = make_desc(v, kKVHalf, 1024);
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    // Keys 16kk..16kk+15 = two 8-row groups (stride 1024 B); the d halves kKVHalf apart.
    const uint32_t a[4] = {pa[4 * kk], pa[4 * kk + 1], pa[4 * kk + 2], pa[4 * kk + 3]};
    wgmma_m64n128_rs(o, a, dv + ((kk * 16 * 128) >> 4));
  }
}

// Ends the basic block after the softmax: ptxas hoists a wgmma wait to the top of its block, which
// would start the softmax only after P·V completes and undo the overlap. The branch depends on
// both row sums (so on every exponential) and is never taken (sums of exponentials are >= 0 or
// NaN); its body is a no-op the compiler must keep.
__device__ __forceinline__ void keep_softmax_above_wait(const float (&l)[2]) {
  if (__any_sync(0xffffffffu, l[0] < 0.0f || l[1] < 0.0f)) asm volatile("nanosleep.u32 0;\n" ::: "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The item the scheduler hands out next in a second pass: the next set bit of the flags
// that a first pass left, claimed a word at a time (atomicAdd on the counter, the word cleared for
// the next launch as it is taken); -1 when every word has been taken. cur: this CTA's current word
// (x) and its bits not yet handed out (y), in shared memory (the producer warp has no registers to
// spare). Indices rise within a CTA, as the scheduler's walk over the blocks needs. A bit past the
// call's items (left by an earlier call that skipped its second pass, see AttentionWsConfig) ends
// the CTA's walk, rightly: its later indices are larger still; other CTAs take the words left.
__device__ __forceinline__ int next_flagged(const WsParams& p, int2* cur) {
  int word = cur->x;
  unsigned bits = static_cast<unsigned>(cur->y);
  while (bits == 0) {
    word = atomicAdd(p.sched, 1);
    if (word >= p.flag_words) return -1;
    bits = atomicExch(p.flags + word, 0u);
  }
  const int b = __ffs(static_cast<int>(bits)) - 1;
  *cur = make_int2(word, static_cast<int>(bits & (bits - 1)));
  return word * 32 + b;
}

// The kernel's passes: kOnePass finds every row max on every tile; kFirstPass finds it only where
// it must (see the top of the file) and flags the items whose l or O came out non-finite;
// kSecondPass is kOnePass over the flagged items.
enum Pass : int { kOnePass, kFirstPass, kSecondPass };

template <int kStages, int kPass>
__global__ void __launch_bounds__(kThreads, 1) attention_ws_kernel(const __grid_constant__ WsParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<kStages>;
  constexpr bool kSkipMax = kPass == kFirstPass, kFlagged = kPass == kSecondPass;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  unsigned char* const base_ptr = smem_raw + (base - smem_u32(smem_raw));
  const uint32_t sq = base;
  auto k_stage = [&](int s) { return base + L::kOffK + s * kKVBytes; };
  auto v_stage = [&](int s) { return base + L::kOffV + s * kKVBytes; };
  const uint32_t bars = base + L::kOffBar;
  const uint32_t q_full = bars, q_empty = bars + 8;
  auto k_full = [&](int s) { return bars + 16 + 8 * s; };
  auto k_empty = [&](int s) { return bars + 16 + 8 * (kStages + s); };
  auto v_full = [&](int s) { return bars + 16 + 8 * (2 * kStages + s); };
  auto v_empty = [&](int s) { return bars + 16 + 8 * (3 * kStages + s); };
  auto item_full = [&](int s) { return bars + 16 + 8 * (4 * kStages + s); };
  auto item_empty = [&](int s) { return bars + 16 + 8 * (4 * kStages + 2 + s); };
  // Pipeline position i of the K/V ring: its buffer and the parity of its phase.
  auto stage_of = [](uint32_t i) { return static_cast<int>(i % kStages); };
  auto phase_of = [](uint32_t i) { return static_cast<uint32_t>((i / kStages) & 1); };
  int4* const items = reinterpret_cast<int4*>(base_ptr + L::kOffItems);

  const int wg = threadIdx.x >> 7;
  const int warp_in_wg = (threadIdx.x >> 5) & 3;
  const int lane = threadIdx.x & 31;
  // The item slots are written by warp 0's lane 0 and read by one lane of each reading warp (then
  // broadcast by shuffle) as shared-memory atomics, ordered by item_full / item_empty (mbarrier
  // arrive: release, wait: acquire). Atomics rather than plain stores and loads because
  // compute-sanitizer's racecheck does not model mbarrier ordering between warps: plain accesses
  // made it report ~16,000 hazards on these 16 bytes, which hid whatever else it could find.
  auto put_item = [&](int slot, int4 v) {
    atomicExch(&items[slot].x, v.x);
    atomicExch(&items[slot].y, v.y);
    atomicExch(&items[slot].z, v.z);
    if constexpr (kSkipMax) atomicExch(&items[slot].w, v.w);  // the item's index, for its flag
  };
  auto from_lane0 = [](int4 v) {  // lane 0's item, to the whole warp
    v.x = __shfl_sync(0xffffffffu, v.x, 0);
    v.y = __shfl_sync(0xffffffffu, v.y, 0);
    v.z = __shfl_sync(0xffffffffu, v.z, 0);
    if constexpr (kSkipMax) v.w = __shfl_sync(0xffffffffu, v.w, 0);
    return v;
  };
  auto get_item = [&](int slot) {  // by the whole warp
    int4 v = make_int4(0, 0, 0, 0);
    if (lane == 0)
      v = make_int4(atomicOr(&items[slot].x, 0), atomicOr(&items[slot].y, 0), atomicOr(&items[slot].z, 0),
                    kSkipMax ? atomicOr(&items[slot].w, 0) : 0);
    return from_lane0(v);
  };
  // The second pass is launched programmatically after the first (see the launcher); the first lets
  // it launch at once, so its CTAs take SMs as the first pass's leave them and wait there for all
  // of the first pass to complete.
  if constexpr (kSkipMax) pdl_trigger();
  if constexpr (kFlagged) pdl_wait();
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, 2);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 33);
      mbar_init(v_full(s), 33);
      mbar_init(k_empty(s), 2);
      mbar_init(v_empty(s), 2);
    }
    for (int s = 0; s < 2; ++s) {
      mbar_init(item_full(s), 1);
      mbar_init(item_empty(s), 3);  // the two consumers and the V warp
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer
    regs_dealloc<kProducerRegs>();
    if (warp_in_wg >= 2) return;
    // One producer warp's loads of an item's K (v = false) or V tiles, last tile first, each as soon
    // as its buffer is free; kv_iter counts the ring positions used so far.
    auto stream_tiles = [&](const Item& t, int kvh, uint32_t& kv_iter, bool v) {
      const int32_t* table = p.block_table + static_cast<int64_t>(t.seq) * p.max_blocks_per_seq;
      const int k_top = (t.t_lo + t.n_tiles - 1) * kBN;
      int page = tile_page(p, table, k_top, t.key_lo, t.key_end, lane);
      for (int j = 0; j < t.n_tiles; ++j) {
        const uint32_t i = kv_iter + j;
        const int st = stage_of(i);
        const int page_next =
            j + 1 < t.n_tiles ? tile_page(p, table, k_top - (j + 1) * kBN, t.key_lo, t.key_end, lane) : 0;
        mbar_wait(v ? v_empty(st) : k_empty(st), phase_of(i) ^ 1);
        load_kv_tile(p, v ? &p.tm_v : &p.tm_k, v ? &p.tm_v_tile : &p.tm_k_tile, v ? p.cache_v : p.cache_k,
                     v ? v_stage(st) : k_stage(st), v ? v_full(st) : k_full(st), table, kvh, k_top - j * kBN, t.key_lo,
                     t.key_end, lane, page);
        page = page_next;
      }
      kv_iter += t.n_tiles;
    };
    if (warp_in_wg == 1) {
      // V: the items warp 0 hands out, their tiles in the same order as K, each as soon as its
      // buffer is free.
      uint32_t kv_iter = 0;
      for (int it = 0;; ++it) {
        const int slot = it & 1;
        mbar_wait(item_full(slot), (it >> 1) & 1);
        const int4 item = get_item(slot);
        __syncwarp();
        if (lane == 0) mbar_arrive(item_empty(slot));
        if (item.x < 0) break;
        const Item t = make_item(p.blocks + kDevAttnBlockFields * item.x, item.y);
        if (t.n_tiles == 0) continue;
        stream_tiles(t, item.z / (p.hq / p.hkv), kv_iter, true);
      }
      return;
    }
    // Warp 0: the work items (x: block, y: query tile, z: head; w: in a first pass, the item's index),
    // Q and K. A second pass with nothing flagged hands out no item.
    int b_cur = p.n_blocks - 1, first = 0;  // item cursor: items before block b_cur's start at `first`
    int2* const flag_cur = reinterpret_cast<int2*>(items + 2);
    if constexpr (kFlagged) {
      if (lane == 0) *flag_cur = make_int2(0, 0);
      if (lane == 0 && atomicOr(p.sched + 2, 0) == 0) b_cur = -1;
    }
    uint32_t q_iter = 0, kv_iter = 0;
    for (int it = 0;; ++it) {
      const int slot = it & 1;
      mbar_wait(item_empty(slot), ((it >> 1) & 1) ^ 1);
      int4 item = make_int4(-1, 0, 0, 0);
      if (lane == 0) {
        int idx;
        if constexpr (kFlagged) {
          idx = b_cur < 0 ? -1 : next_flagged(p, flag_cur);
          if (idx < 0) b_cur = -1;
        } else {
          idx = atomicAdd(p.sched, 1);
        }
        while (b_cur >= 0 && idx >= first + items_of(p.blocks, b_cur, p.hq)) {
          first += items_of(p.blocks, b_cur, p.hq);
          --b_cur;
        }
        if (b_cur >= 0) {
          // Within a block: groups of group_heads heads, one after the other; in a group, query
          // tiles last (longest) first, heads innermost.
          const int n_mt = (p.blocks[kDevAttnBlockFields * b_cur + 1] + kBM - 1) / kBM;
          const int local = idx - first, per_group = n_mt * p.group_heads;
          const int grp = local / per_group, in_grp = local - grp * per_group, rank = in_grp / p.group_heads;
          item = make_int4(b_cur, n_mt - 1 - rank, grp * p.group_heads + in_grp - rank * p.group_heads, idx);
        }
        put_item(slot, item);
        mbar_arrive(item_full(slot));
      }
      item = from_lane0(item);
      if (item.x < 0) break;
      const Item t = make_item(p.blocks + kDevAttnBlockFields * item.x, item.y);
      if (t.n_tiles == 0) continue;
      const int h = item.z, kvh = h / (p.hq / p.hkv);
      mbar_wait(q_empty, (q_iter & 1) ^ 1);
      ++q_iter;
      if (lane == 0) {
        mbar_arrive_expect_tx(q_full, kQBytes);
        tma_load_3d(sq, &p.tm_q, q_full, 0, h, t.q_begin + t.m0);
        tma_load_3d(sq + kQHalf, &p.tm_q, q_full, 64, h, t.q_begin + t.m0);
      }
      stream_tiles(t, kvh, kv_iter, false);
    }
    // The last CTA to finish resets the counters for the next launch on this stream (the count of
    // flagged items after the second pass).
    if (lane == 0 && atomicAdd(p.sched + 1, 1) == static_cast<int>(gridDim.x) - 1) {
      p.sched[0] = 0;
      p.sched[1] = 0;
      if (kFlagged) p.sched[2] = 0;
    }
    return;
  }

  // ---- consumers: cw = 0 (query rows 0..63 of the item) or 1 (64..127)
  regs_alloc<kConsumerRegs>();
  const int cw = wg - 1;
  const int wtid = threadIdx.x & 127;
  const int g = lane >> 2, t4 = lane & 3;
  const int row0 = warp_in_wg * 16 + g;  // this thread's rows within the 64: row0, row0 + 8
  unsigned char* const so_ptr = base_ptr + L::kOffO + cw * kOBytes;
  const int64_t q_stride = static_cast<int64_t>(p.hq) * kD;
  if (cw == 1) bar_arrive(kBarSched, 256);  // consumer 0 issues first
  uint32_t q_iter = 0, kv_iter = 0;
  for (int it = 0;; ++it) {
    const int slot = it & 1;
    mbar_wait(item_full(slot), (it >> 1) & 1);
    const int4 item = get_item(slot);
    if (item.x < 0) break;
    const Item t = make_item(p.blocks + kDevAttnBlockFields * item.x, item.y);
    const int h = item.z;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    if (t.n_tiles > 0) {
      mbar_wait(q_full, q_iter & 1);
      ++q_iter;
      const uint32_t qa = sq + cw * 64 * 128;
      const int wg_pos0 = t.pos_begin + t.m0 + cw * 64;  // position of this consumer's first row
      const int qpos0 = wg_pos0 + row0;
      auto needs_mask = [&](int k0) { return k0 < t.kv_begin || k0 + kBN > t.kv_bound || k0 + kBN - 1 > wg_pos0; };
      // Tiles with chunks copied by cp.async (the producer's rule): their data came through the
      // generic proxy and must be fenced before wgmma reads it.
      auto fence_if_copied = [&](int k0) {
        if (p.tma_rows == 0 || k0 < t.key_lo || k0 + kBN > t.key_end) fence_async_smem();
      };
      float s[64], corr[2];
      uint32_t pa[32];
      int k0 = (t.t_lo + t.n_tiles - 1) * kBN;
      int st = stage_of(kv_iter);
      uint32_t ph = phase_of(kv_iter);
      mbar_wait(k_full(st), ph);
      fence_if_copied(k0);
      wgmma_fence();
      gemm_qk(s, qa, k_stage(st));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);
      if (wtid == 0) mbar_arrive(k_empty(st));
      softmax_tile(s, m, l, corr, needs_mask(k0), k0, qpos0, t4, t.kv_begin, t.kv_bound, p.scale_log2, true);
      pack_p(pa, s);
      int prev = st;
      uint32_t prev_ph = ph;
      ++kv_iter;
      for (int j = 1; j < t.n_tiles; ++j, ++kv_iter) {
        k0 -= kBN;
        st = stage_of(kv_iter);
        ph = phase_of(kv_iter);
        mbar_wait(k_full(st), ph);
        fence_if_copied(k0);
        bar_sync(kBarSched + cw, 256);  // my turn to issue
        wgmma_fence();
        gemm_qk(s, qa, k_stage(st));
        wgmma_commit();
        mbar_wait(v_full(prev), prev_ph);
        fence_if_copied(k0 + kBN);
        gemm_pv(o, pa, v_stage(prev));
        wgmma_commit();
        bar_arrive(kBarSched + (cw ^ 1), 256);  // the other consumer's turn
        wgmma_wait<1>();
        fence_regs(s);
        if (wtid == 0) mbar_arrive(k_empty(st));
        const bool find_max = !kSkipMax || needs_mask(k0) || j == t.n_tiles - 1 ||
                              !__all_sync(0xffffffffu, m[0] > -INFINITY && m[1] > -INFINITY);
        softmax_tile(s, m, l, corr, needs_mask(k0), k0, qpos0, t4, t.kv_begin, t.kv_bound, p.scale_log2, find_max);
        keep_softmax_above_wait(l);
        wgmma_wait<0>();
        fence_regs(o);
        fence_regs(pa);
        if (wtid == 0) mbar_arrive(v_empty(prev));
        // Past the first tiles a row's max rarely grows, and then its factor is exactly 1: the
        // warp skips the 64 multiplies when none of its rows needs them (same bits either way).
        if (__any_sync(0xffffffffu, corr[0] != 1.0f || corr[1] != 1.0f)) scale_rows(o, corr);
        pack_p(pa, s);
        prev = st;
        prev_ph = ph;
      }
      if (wtid == 0) mbar_arrive(q_empty);  // the last Q·Kᵀ has completed
      mbar_wait(v_full(prev), prev_ph);
      fence_if_copied(k0);
      wgmma_fence();
      gemm_pv(o, pa, v_stage(prev));
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      fence_regs(pa);
      if (wtid == 0) mbar_arrive(v_empty(prev));
    }
    if constexpr (kSkipMax) {
      // An overflow on a tile that kept the old max leaves an inf or NaN in l or O (no later
      // rescale or sum makes it finite): the item goes to the second pass. Finite values are the
      // right answer whatever the reference was.
      bool bad = !(fabsf(l[0]) <= FLT_MAX) || !(fabsf(l[1]) <= FLT_MAX);
#pragma unroll
      for (int i = 0; i < 64; ++i) bad |= !(fabsf(o[i]) <= FLT_MAX);
      if (__any_sync(0xffffffffu, bad) && lane == 0) {
        atomicOr(p.flags + (item.w >> 5), 1u << (item.w & 31));
        atomicAdd(p.sched + 2, 1);
      }
    }

    // ---- epilogue: O / l, through shared memory (swizzled 16-byte chunks) to coalesced stores
    // when there is room, else straight from the registers
    float inv_l[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float lr = l[r];
      lr += __shfl_xor_sync(0xffffffffu, lr, 1);
      lr += __shfl_xor_sync(0xffffffffu, lr, 2);
      inv_l[r] = lr > 0.0f ? 1.0f / lr : 0.0f;  // no key in range: out 0, lse -inf
      const int grow = cw * 64 + row0 + 8 * r;
      if (p.lse != nullptr && t4 == 0 && grow < t.rows)
        p.lse[(static_cast<int64_t>(t.q_begin) + t.m0 + grow) * p.hq + h] =
            lr > 0.0f ? (m[r] + log2f(lr)) * 0.69314718055994531f : -INFINITY;
    }
    if constexpr (L::kStaged) {
      bar_sync(kBarEpi + cw, 128);  // the previous item's staging has been read
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
#pragma unroll
        for (int n = 0; n < 16; ++n)
          *reinterpret_cast<uint32_t*>(so_ptr + row * 256 + ((n ^ (row & 7)) << 4) + t4 * 4) =
              pack_bf16(o[4 * n + 2 * r] * inv_l[r], o[4 * n + 2 * r + 1] * inv_l[r]);
      }
      bar_sync(kBarEpi + cw, 128);
#pragma unroll
      for (int i = wtid; i < 64 * 16; i += 128) {
        const int row = i >> 4, c = i & 15, grow = cw * 64 + row;
        if (grow >= t.rows) continue;
        const uint4 v = *reinterpret_cast<const uint4*>(so_ptr + row * 256 + ((c ^ (row & 7)) << 4));
        *reinterpret_cast<uint4*>(p.out + (static_cast<int64_t>(t.q_begin) + t.m0 + grow) * q_stride + h * kD + c * 8) =
            v;
      }
    } else {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int grow = cw * 64 + row0 + 8 * r;
        if (grow >= t.rows) continue;
        __nv_bfloat16* orow = p.out + (static_cast<int64_t>(t.q_begin) + t.m0 + grow) * q_stride + h * kD;
#pragma unroll
        for (int n = 0; n < 16; ++n)
          *reinterpret_cast<uint32_t*>(orow + n * 8 + 2 * t4) =
              pack_bf16(o[4 * n + 2 * r] * inv_l[r], o[4 * n + 2 * r + 1] * inv_l[r]);
      }
      bar_sync(kBarEpi + cw, 128);  // every warp of this consumer is past the item slot
    }
    if (wtid == 0) mbar_arrive(item_empty(slot));
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// A [rows, heads, 128] bf16 tensor as TMA boxes of (64 columns, 1 head, box_rows rows), 128-byte
// swizzled.
bool encode_rows(CUtensorMap* map, const void* base, int64_t rows, int64_t heads, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kD), static_cast<cuuint64_t>(heads),
                              static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {kD * 2, static_cast<cuuint64_t>(heads) * kD * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

cudaError_t launch_attention_ws(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                DevTensor out, DevTensor lse, int* sched, cudaStream_t stream,
                                const AttentionWsConfig& cfg) {
  const int64_t t = q.dim(0), hq = q.dim(1), hkv = cache.k.dim(2);
  const int n_blocks = batch.n_blocks, max_q = batch.max_q_len;
  if (n_blocks == 0 || max_q == 0 || t == 0) return cudaSuccess;
  const int bs = cache.block_size();
  const int64_t n_pages = cache.k.dim(0);
  if (q.dim(2) != kD || cache.k.dim(3) != kD || hkv <= 0 || hq % hkv != 0 || sched == nullptr || bs <= 0 ||
      n_pages * bs > (int64_t{1} << 31) - 1 || t > (int64_t{1} << 31) - 1)
    return cudaErrorInvalidValue;
  const bool pow2 = (bs & (bs - 1)) == 0;
  WsParams p{};
  p.tma_rows = pow2 && bs >= 8 ? (bs < 64 ? bs : 64) : 0;
  while ((1 << p.bs_shift) < bs) ++p.bs_shift;
  if (!encode_rows(&p.tm_q, q.data, t, hq, kBM) ||
      !encode_rows(&p.tm_k, cache.k.data, n_pages * bs, hkv, p.tma_rows > 0 ? p.tma_rows : 8) ||
      !encode_rows(&p.tm_v, cache.v.data, n_pages * bs, hkv, p.tma_rows > 0 ? p.tma_rows : 8) ||
      !encode_rows(&p.tm_k_tile, cache.k.data, n_pages * bs, hkv, kBN) ||
      !encode_rows(&p.tm_v_tile, cache.v.data, n_pages * bs, hkv, kBN))
    return cudaErrorInvalidValue;
  p.blocks = batch.blocks;
  p.block_table = batch.block_table;
  p.cache_k = cache.k.ptr<const __nv_bfloat16>();
  p.cache_v = cache.v.ptr<const __nv_bfloat16>();
  p.out = out.ptr<__nv_bfloat16>();
  p.lse = lse.defined() ? lse.ptr<float>() : nullptr;
  p.sched = sched;
  p.n_blocks = n_blocks;
  p.max_blocks_per_seq = batch.max_blocks_per_seq;
  p.block_size = bs;
  p.n_pages = static_cast<int>(n_pages);
  p.hq = static_cast<int>(hq);
  p.hkv = static_cast<int>(hkv);
  const int64_t group_kv = cfg.kv_heads_per_group > 0 ? cfg.kv_heads_per_group : hkv;
  if (hkv % group_kv != 0) return cudaErrorInvalidValue;
  p.group_heads = static_cast<int>(group_kv * (hq / hkv));
  p.scale_log2 = scale * 1.4426950408889634f;
  int n_sms = 0;
  const cudaError_t err = current_device_sms(n_sms);
  if (err != cudaSuccess) return err;
  const int64_t max_items = static_cast<int64_t>(n_blocks) * ((max_q + kBM - 1) / kBM) * hq;
  const int grid = static_cast<int>(std::min<int64_t>(n_sms, max_items));
  // The flags of every item (an upper bound on their count) must fit the scratch, else the call
  // finds the max on every tile in one pass.
  const int64_t flag_words = (max_items + 31) / 32;
  const bool skip_max = cfg.two_pass && flag_words <= kAttnWsFlagWords;
  p.flags = reinterpret_cast<unsigned*>(sched + kAttnWsCounters);
  p.flag_words = static_cast<int>(std::min<int64_t>(flag_words, kAttnWsFlagWords));
  // The second pass is a programmatic dependent launch: its CTAs take the SMs the first pass's
  // leave and wait (griddepcontrol.wait) for all of it to complete, so its launch latency hides
  // under the first pass's tail.
  auto launch = [&](auto kernel, int smem_bytes, bool second) {
    return launch_k_as(second, kernel, dim3(grid), dim3(kThreads), static_cast<size_t>(smem_bytes), stream, p);
  };
  auto run = [&](auto one, auto first, auto second, int smem_bytes) {
    if (!skip_max) return launch(one, smem_bytes, false);
    const cudaError_t e = launch(first, smem_bytes, false);
    if (e != cudaSuccess || !cfg.second_pass) return e;
    return launch(second, smem_bytes, true);
  };
  if (cfg.stages == 3)
    return run(attention_ws_kernel<3, kOnePass>, attention_ws_kernel<3, kFirstPass>,
               attention_ws_kernel<3, kSecondPass>, Smem<3>::kBytes);
  if (cfg.stages != 2) return cudaErrorInvalidValue;
  return run(attention_ws_kernel<2, kOnePass>, attention_ws_kernel<2, kFirstPass>, attention_ws_kernel<2, kSecondPass>,
             Smem<2>::kBytes);
}

}  // namespace cpinfer::cuda
