// Token sampling (Backend::sample; the algorithm is spelled out in ops/backend.h and its reference
// is backends/cpu/cpu_sample.cpp). One CTA per row of logits, no sort of the full row:
// - pass 1 (every row): one read of the row with 16-byte loads, the argmax as a block-wide max over
//   (order key of the logit, ~id); greedy rows stop here.
// - top-k rows (the usual serving case, k small): pass 1 also counts the logits per 12-bit prefix of
//   their order key (a shared histogram); a scan of it gives the prefix bucket holding the k-th
//   largest logit, and pass 2 copies every logit of that bucket or above (k plus the bucket's
//   rest, a few thousand at most) into shared memory. There a bitonic sort by (logit desc, id asc)
//   ranks them exactly as the reference does; top-k is the first k, e = exp((l - max) / T) is
//   computed for those k only, top-p and min-p keep a prefix of that order (e does not grow along
//   it), and a second sort puts the kept few in id order for the draw. Two reads of the row and
//   work on a few thousand items in shared memory, instead of ~20 reads of the row.
// - top-p / min-p rows without top-k (the usual OpenAI-style request) take the candidate path too
//   when their nucleus lies among the top few thousand logits (peaked rows: a trained model's): the
//   pass-1 histogram gives the lowest bucket whose logits and those above fit the candidate buffer;
//   pass 2 copies them and sums e over the whole row (M, in double, fixed order). On the sorted
//   candidates τ is found as for top-k, with M of the full row; the answer is exact only if every
//   token the floor max(τ, min_p) keeps is a candidate, i.e. the floor exceeds a bound on e below
//   the copied buckets. Otherwise (flat rows: nuclei of ~100K tokens) the row takes the general path.
// - every other drawn row (no filter but temperature, a nucleus that does not fit, or a top-k bucket
//   too full to copy: huge k or masses of ties) takes the general path: e for the whole row into scratch, then top-k /
//   top-p thresholds by a 16-way search over 32-bit order keys (of the logit for top-k, of the fp32 probability bits
//   for top-p), 4 bits a pass, each pass one block-wide set of 16 counts or sums (search_threshold); ties at the k-th
//   logit are cut by id with one ordered scan; the draw is an ordered scan in id order (tiles of kThreads · kItems ids,
//   block-wide prefix sums) that stops at the tile where the cumulative kept mass exceeds u · M.
// All sums are in double and reduced in a fixed order, and the sorts order by a total key, so a
// row's result never depends on timing or on the other rows.
#include <climits>
#include <cstdint>

#include "backends/cuda/kernels/common.cuh"

namespace cpinfer::cuda {

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kWays = 16;                     // buckets of one search pass: 4 bits of the key
constexpr int kPasses = 32 / 4;               // 32-bit keys
constexpr int kItems = 4;                     // consecutive ids per thread in the ordered scans
constexpr uint32_t kNegInfKey = 0x007FFFFFu;  // order_key(-inf)
constexpr int kLoadUnroll = 8;                // float4 loads in flight per thread in the row passes (64 KB a CTA)
// The top-k path: a histogram of the top kBinBits of the order keys, and room for kCandCap
// candidates (64-bit sort keys), sharing one shared-memory buffer (the histogram is dead by the
// time candidates are written). 4096 candidates hold k = 1000 plus a crowded bucket comfortably.
constexpr int kBinBits = 12;
constexpr int kBins = 1 << kBinBits;
constexpr int kBinShift = 32 - kBinBits;
constexpr int kCandCap = 4096;
constexpr int kBinsPerThread = kBins / kThreads;
constexpr int kFiniteBin = static_cast<int>(kNegInfKey >> kBinShift) + 1;  // the lowest bucket of a finite logit (8)
static_assert(kBins % kThreads == 0, "each thread scans whole bins");

// NaN ranks as -inf and -0 as +0, as in the reference.
__device__ __forceinline__ float canon(float x) { return isnan(x) ? -INFINITY : (x == 0.0f ? 0.0f : x); }

// Order-preserving map of a (non-NaN) float to uint32: a < b  <=>  key(a) < key(b).
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t b = __float_as_uint(x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// e = exp((x - l_max) / T) as ops/backend.h step 2 defines it (d in fp32, exp in double, rounded).
__device__ __forceinline__ float prob_weight(float x, float l_max, float temperature) {
  const float d = x == l_max ? 0.0f : (x - l_max) / temperature;
  return static_cast<float>(exp(static_cast<double>(d)));
}

// f(i, l[i]) for every i < n of the row, ids strided over the block. The body uses 16-byte loads,
// kLoadUnroll of them issued before any is used: one CTA must keep enough bytes in flight to pull a
// 152K-logit row at a useful fraction of the memory bandwidth. Rows need not be 16-byte aligned
// (n % 4 != 0): a scalar head and tail take the rest.
template <class F>
__device__ __forceinline__ void for_each_logit(const float* __restrict__ l, int64_t n, F&& f) {
  const int tid = threadIdx.x;
  const int64_t head = min(n, static_cast<int64_t>((16 - (reinterpret_cast<uintptr_t>(l) & 15)) & 15) / 4);
  if (tid < head) f(static_cast<int64_t>(tid), __ldg(l + tid));
  const float4* __restrict__ body = reinterpret_cast<const float4*>(l + head);
  const int64_t n4 = (n - head) / 4;
  for (int64_t base = 0; base < n4; base += static_cast<int64_t>(kThreads) * kLoadUnroll) {
    float4 v[kLoadUnroll];
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int64_t j = base + u * kThreads + tid;
      if (j < n4) v[u] = __ldg(body + j);
    }
#pragma unroll
    for (int u = 0; u < kLoadUnroll; ++u) {
      const int64_t j = base + u * kThreads + tid;
      if (j < n4) {
        const int64_t i = head + 4 * j;
        f(i, v[u].x);
        f(i + 1, v[u].y);
        f(i + 2, v[u].z);
        f(i + 3, v[u].w);
      }
    }
  }
  const int64_t tail = head + 4 * n4 + tid;
  if (tail < n) f(tail, __ldg(l + tail));
}

struct Shared {
  double part[kWays][kWarps];
  double sums[kWays];
  double warp_tot[kWarps];
  unsigned long long best[kWarps];
  int found;
  int warp_count[kWarps];
  int count;     // candidates written by the candidate paths
  int cut_bin;   // the histogram bucket of the k-th largest logit (k = top_k, or kCandCap + 1)
  int n_cand;    // logits in that bucket or above
  int n_above;   // logits above that bucket
  int n_finite;  // logits above -inf
};

// Rows finished per path since the process started, a debug aid for tests (sample_path_rows).
enum SamplePath { kPathGreedy = 0, kPathTopK = 1, kPathNucleus = 2, kPathGeneral = 3 };
__device__ unsigned long long g_sample_path_rows[kSamplePaths];
__device__ __forceinline__ void count_path(SamplePath path) {
  if (threadIdx.x == 0) atomicAdd(&g_sample_path_rows[path], 1ull);
}

// The top-k path's shared buffer: first the histogram, then the candidates.
union CandBuffer {
  uint32_t hist[kBins];
  unsigned long long cand[kCandCap];
};

// sh.sums[j] = Σ over the block of v[j], reduced in a fixed order. Read sh.sums before the next
// call (the next call overwrites it only after its first barrier).
template <int N>
__device__ void block_sums(double (&v)[N], Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    double x = v[j];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    if (lane == 0) sh.part[j][warp] = x;
  }
  __syncthreads();
  if (threadIdx.x < N) {
    double s = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sh.part[threadIdx.x][w];
    sh.sums[threadIdx.x] = s;
  }
  __syncthreads();
}

__device__ unsigned long long block_max_u64(unsigned long long v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long y = __shfl_xor_sync(0xffffffffu, v, o);
    v = y > v ? y : v;
  }
  if (lane == 0) sh.best[warp] = v;
  __syncthreads();
  unsigned long long m = sh.best[0];
  for (int w = 1; w < kWarps; ++w) m = sh.best[w] > m ? sh.best[w] : m;
  __syncthreads();
  return m;
}

// The first index i < n, ascending, at which the running sum of weight(i) (>= 0) exceeds target;
// -1 when it never does. Tiles of kThreads · kItems ids; each thread owns kItems consecutive ids.
template <class Weight>
__device__ int first_crossing(int64_t n, double target, const Weight& weight, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) sh.found = INT_MAX;
  __syncthreads();
  double carry = 0.0;
  constexpr int64_t kTile = static_cast<int64_t>(kThreads) * kItems;
  int found = INT_MAX;
  for (int64_t base = 0; base < n; base += kTile) {
    const int64_t first = base + static_cast<int64_t>(threadIdx.x) * kItems;
    double w[kItems];
    double local = 0.0;
#pragma unroll
    for (int m = 0; m < kItems; ++m) {
      w[m] = first + m < n ? weight(first + m) : 0.0;
      local += w[m];
    }
    double incl = local;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    if (lane == 31) sh.warp_tot[warp] = incl;
    __syncthreads();
    double off = 0.0;
    for (int v = 0; v < warp; ++v) off += sh.warp_tot[v];
    double total = off;  // the same sequential sum in every thread
    for (int v = warp; v < kWarps; ++v) total += sh.warp_tot[v];
    if (carry + (off + excl) <= target && carry + (off + incl) > target) {
      int pick = -1, last = -1;
      double s = 0.0;
#pragma unroll
      for (int m = 0; m < kItems; ++m) {
        s += w[m];
        if (w[m] > 0.0) last = m;
        if (pick < 0 && w[m] > 0.0 && carry + (off + (excl + s)) > target) pick = m;
      }
      if (pick < 0) pick = last;  // rounding: the scan says the crossing is in this thread's ids
      atomicMin(&sh.found, static_cast<int>(first + pick));
    }
    carry += total;
    __syncthreads();
    found = sh.found;
    if (found != INT_MAX) break;
  }
  __syncthreads();  // sh.found is reset by the next call
  return found == INT_MAX ? -1 : found;
}

// The largest 32-bit key t with F(t) = Σ_{i: key(i) >= t} weight(i) >= target (F does not grow with
// t; F(0) >= target is assumed). A 16-way search: each pass splits the remaining key range into 16
// buckets and sums F at their 15 inner bounds block-wide, so 8 passes resolve 32 bits. Elements
// above the range add to one sum shared by all bounds, so after the first passes most elements
// cost one add. Also returns F(t) and F(t + 1) (ties at t, and above it).
template <class Key, class Weight>
__device__ uint32_t search_threshold(int64_t n, double target, const Key& key_of, const Weight& weight_of, Shared& sh,
                                     double* f_at, double* f_above) {
  uint64_t lo = 0, span = 1ull << 32;
  double f_lo = 0.0, f_hi = 0.0;  // F(lo), F(lo + span)
  bool f_lo_known = false;
  for (int pass = 0; pass < kPasses; ++pass) {
    const uint64_t w = span / kWays;
    double acc[kWays];  // acc[j - 1]: in-range elements with key >= lo + j·w; acc[15]: keys >= lo + span
#pragma unroll
    for (int j = 0; j < kWays; ++j) acc[j] = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const uint64_t key = key_of(i);
      if (key < lo + w) continue;  // below every bound of this pass (weight_of, maybe costly, is skipped)
      const double wt = weight_of(i);
      if (key >= lo + span) {
        acc[kWays - 1] += wt;
        continue;
      }
#pragma unroll
      for (int j = 1; j < kWays; ++j) acc[j - 1] += key >= lo + j * w ? wt : 0.0;
    }
    block_sums(acc, sh);
    const double above = sh.sums[kWays - 1];
    int pick = 0;
    for (int j = 1; j < kWays; ++j)
      if (sh.sums[j - 1] + above >= target) pick = j;
    if (pick > 0) {
      f_lo = sh.sums[pick - 1] + above;
      f_lo_known = true;
    }
    f_hi = pick + 1 < kWays ? sh.sums[pick] + above : above;
    lo += pick * w;
    span = w;
  }
  // F(lo) is known unless every pass picked bucket 0 (t = 0): then it is the full sum, F(0).
  if (!f_lo_known) {
    double all[1] = {0.0};
    for (int64_t i = threadIdx.x; i < n; i += kThreads) all[0] += weight_of(i);
    block_sums(all, sh);
    f_lo = sh.sums[0];
  }
  *f_at = f_lo;
  *f_above = f_hi;
  return static_cast<uint32_t>(lo);
}

// Σ over the block of v (integers: exact in any order). Barriers before it returns.
__device__ int block_count(int v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) sh.warp_count[warp] = v;
  __syncthreads();
  int total = 0;
  for (int w = 0; w < kWarps; ++w) total += sh.warp_count[w];
  __syncthreads();
  return total;
}

// Σ of v over the threads before this one (integers).
__device__ int block_exclusive_count(int v, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) sh.warp_count[warp] = incl;
  __syncthreads();
  int off = 0;
  for (int w = 0; w < warp; ++w) off += sh.warp_count[w];
  __syncthreads();
  return off + incl - v;
}

// Sorts c[0, m) descending in place (m a power of two; a bitonic network, so no data-dependent
// control flow and a total order on the keys makes the result unique).
__device__ void sort_desc(unsigned long long* c, int m) {
  for (int size = 2; size <= m; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < m / 2; t += kThreads) {
        const int i = 2 * t - (t & (stride - 1)), j = i + stride;
        const unsigned long long a = c[i], b = c[j];
        if (((i & size) == 0) == (a < b)) {  // descending runs where bit `size` of i is clear
          c[i] = b;
          c[j] = a;
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ int pow2_at_least(int x) { return x <= 2 ? 2 : 1 << (32 - __clz(x - 1)); }

constexpr int32_t kNotExact = -2;  // draw_from_candidates: a token outside the candidates could be kept

// Steps 2.-6. of a row from its candidates: buf.cand[0, n_cand) holds every logit whose 12-bit key
// prefix is >= some bucket's, the row's largest among them, as (key << 32 | ~id), in any order.
// k: the ranks top-k keeps (k <= n_cand; n_cand when top-k is off). total_mass: M of top-p, or < 0
// for the mass of the k first (top-k rows). outside_e: a bound on e of every token not among the
// candidates; 0 when none of them can be kept (they have e = 0, or top-k drops them). Returns the
// drawn id (in thread 0; the same value in every thread), or kNotExact when tokens outside could
// pass the floor max(τ, min_p) (the caller then takes the general path).
__device__ int32_t draw_from_candidates(CandBuffer& buf, int n_cand, int k, double total_mass, float outside_e,
                                        const DevSampleRow& p, Shared& sh) {
  const int tid = threadIdx.x;
  unsigned long long* c = buf.cand;
  const int m = pow2_at_least(n_cand);
  for (int j = n_cand + tid; j < m; j += kThreads) c[j] = 0;  // below every real entry (key >= key(-inf))
  __syncthreads();
  // 3. top-k: ranked by (logit desc, id asc), the reference's order, ties included.
  sort_desc(c, m);
  const float l_max = key_value(static_cast<uint32_t>(c[0] >> 32));
  __syncthreads();  // c[0] is rewritten below
  // 2. e of the k survivors only; (e bits << 32 | ~id) keeps the order, as e does not grow with rank.
  for (int j = tid; j < k; j += kThreads) {
    const float e = prob_weight(key_value(static_cast<uint32_t>(c[j] >> 32)), l_max, p.temperature);
    c[j] = (static_cast<unsigned long long>(__float_as_uint(e)) << 32) | (c[j] & 0xFFFFFFFFull);
  }
  __syncthreads();
  auto e_at = [&](int64_t j) { return static_cast<double>(__uint_as_float(static_cast<uint32_t>(c[j] >> 32))); };

  // 4. top-p: τ is e at the first rank where the running mass reaches top_p · M_K (S >= t is
  // S > the double below t); every token whose e equals τ is kept, as the reference does.
  float tau = 0.0f;  // no crossing (rounding, or the nucleus reaches below the candidates)
  if (p.top_p < 1.0f) {
    double m_k = total_mass;
    if (m_k < 0.0) {
      double mass[1] = {0.0};
      for (int j = tid; j < k; j += kThreads) mass[0] += e_at(j);
      block_sums(mass, sh);
      m_k = sh.sums[0];
    }
    const double target = static_cast<double>(p.top_p) * m_k;
    const int at = first_crossing(k, nextafter(target, 0.0), e_at, sh);
    if (at >= 0) tau = static_cast<float>(e_at(at));
  }
  // 5. min-p, and tokens with e = 0 (no mass): together with τ a floor on e, so the kept tokens
  // are a prefix of the ranking, all of them candidates if the floor is above outside_e.
  const float floor_e = fmaxf(tau, p.min_p);
  if (outside_e != 0.0f && !(floor_e > outside_e)) return kNotExact;  // uniform: every thread agrees
  int n_mine = 0;
  for (int j = tid; j < k; j += kThreads) {
    const float e = static_cast<float>(e_at(j));
    n_mine += e >= floor_e && e > 0.0f;
  }
  const int n_keep = block_count(n_mine, sh);  // >= 1: the top token has e = 1

  // 6. the draw runs in id order: re-sort the kept prefix by id (ascending, as the descending sort
  // of the complement), zeros (below every entry) past it.
  const int m_keep = pow2_at_least(n_keep);
  for (int j = tid; j < m_keep; j += kThreads) {
    unsigned long long v = 0;
    if (j < n_keep) {
      const uint32_t id = ~static_cast<uint32_t>(c[j]);
      v = ~((static_cast<unsigned long long>(id) << 32) | (c[j] >> 32));
    }
    c[j] = v;
  }
  __syncthreads();
  sort_desc(c, m_keep);
  auto kept_e = [&](int64_t j) { return static_cast<double>(__uint_as_float(static_cast<uint32_t>(~c[j]))); };
  double mass[1] = {0.0};
  for (int j = tid; j < n_keep; j += kThreads) mass[0] += kept_e(j);
  block_sums(mass, sh);
  const int pick = first_crossing(n_keep, static_cast<double>(p.u) * sh.sums[0], kept_e, sh);
  return static_cast<int32_t>(~c[pick >= 0 ? pick : n_keep - 1] >> 32);  // none (rounding): the last kept id
}

__global__ void __launch_bounds__(kThreads)
    sample_kernel(const float* __restrict__ logits, int64_t n, const DevSampleRow* __restrict__ rows,
                  float* __restrict__ scratch, int32_t* __restrict__ ids) {
  __shared__ Shared sh;
  __shared__ CandBuffer buf;
  const int64_t row = blockIdx.x;
  const float* l = logits + row * n;
  const DevSampleRow p = rows[row];
  const int tid = threadIdx.x;
  // Rows with a small k take the candidate path (see the top of the file) if their bucket fits;
  // top-p / min-p rows without top-k (top_k is 0 when off) if their nucleus does.
  const bool top_k_path = !p.greedy && p.top_k > 0 && p.top_k <= kCandCap;
  const bool nucleus_path = !p.greedy && p.top_k <= 0 && (p.top_p < 1.0f || p.min_p > 0.0f);
  const bool use_hist = top_k_path || nucleus_path;
  if (use_hist) {
    for (int b = tid; b < kBins; b += kThreads) buf.hist[b] = 0;
    __syncthreads();
  }

  // 1. argmax: the key in the high half, ~id in the low half, so the max is the first maximum. The
  // histogram leaves out -inf (the bottom bucket, which would serialize the atomics of rows full
  // of masked logits): it is what the other buckets leave of n.
  unsigned long long best = 0;
  for_each_logit(l, n, [&](int64_t i, float x) {
    const uint32_t key = order_key(canon(x));
    const unsigned long long k =
        (static_cast<unsigned long long>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
    best = k > best ? k : best;
    if (use_hist && key > kNegInfKey) atomicAdd(&buf.hist[key >> kBinShift], 1u);
  });
  best = block_max_u64(best, sh);  // its barriers also complete the histogram
  const uint32_t max_key = static_cast<uint32_t>(best >> 32);
  const int32_t arg = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(best & 0xFFFFFFFFu));
  if (max_key <= kNegInfKey || p.greedy) {
    if (tid == 0) ids[row] = max_key <= kNegInfKey ? -1 : arg;
    count_path(kPathGreedy);
    return;
  }

  if (use_hist) {
    // The bucket of the k-th largest logit: the highest b with count(bucket >= b) >= k; thread t
    // scans buckets from the top, kBinsPerThread of them, after the counts above its own. The
    // nucleus path asks for k = kCandCap + 1: the buckets above that one are the most it can copy.
    const int want = top_k_path ? p.top_k : kCandCap + 1;
    uint32_t h[kBinsPerThread];
    int mine = 0;
#pragma unroll
    for (int q = 0; q < kBinsPerThread; ++q) {
      h[q] = buf.hist[kBins - 1 - (tid * kBinsPerThread + q)];
      mine += static_cast<int>(h[q]);
    }
    if (tid == 0) {
      sh.cut_bin = -1;  // fewer than k finite logits
      sh.n_cand = static_cast<int>(n);
      sh.n_above = 0;
    }
    int above = block_exclusive_count(mine, sh);  // its barriers order the writes above
#pragma unroll
    for (int q = 0; q < kBinsPerThread; ++q) {
      if (above < want && above + static_cast<int>(h[q]) >= want) {
        sh.cut_bin = kBins - 1 - (tid * kBinsPerThread + q);
        sh.n_cand = above + static_cast<int>(h[q]);
        sh.n_above = above;
      }
      above += static_cast<int>(h[q]);
    }
    if (tid == kThreads - 1) sh.n_finite = above;  // the last thread scans the bottom bucket
    if (tid == 0) sh.count = 0;
    __syncthreads();
    // The candidates: logits of bucket cut_bin or above. A top-k row with fewer than k finite
    // logits copies them all (cut_bin 0: -inf included). A nucleus row copies the buckets above the
    // one that would overflow the buffer, or every finite logit if they fit (cut_bin kFiniteBin:
    // the buckets below hold only -inf).
    int cut_bin = sh.cut_bin, n_cand = sh.n_cand;
    if (top_k_path && cut_bin < 0) cut_bin = 0;
    if (nucleus_path) {
      n_cand = cut_bin < 0 ? sh.n_finite : sh.n_above;
      cut_bin = cut_bin < 0 ? kFiniteBin : cut_bin + 1;
    }
    // A nucleus row of only min-p needs no mass; one whose candidates lack top_p of it, nor a
    // min-p floor above them, cannot be exact (checked before the sort, again after it).
    const bool need_mass = nucleus_path && p.top_p < 1.0f;
    float outside_e = 0.0f;  // e of every logit below bucket cut_bin is at most this (0: none kept)
    if (nucleus_path && cut_bin > kFiniteBin && n_cand >= 1) {
      // Below the bucket: the largest logit of bucket cut_bin - 1. One float step up guards against
      // a non-monotone last bit of exp (e is monotone in the logit otherwise).
      const float l_below = key_value((static_cast<uint32_t>(cut_bin) << kBinShift) - 1u);
      outside_e = nextafterf(prob_weight(l_below, key_value(max_key), p.temperature), INFINITY);
    }
    bool fits = n_cand >= 1 && n_cand <= kCandCap;
    if (fits && need_mass && !(outside_e == 0.0f || p.min_p > outside_e)) {
      // A flat row (nucleus far below the candidates) skips the 2nd pass: from the histogram, the
      // candidates' mass at most (each bucket at its top logit) against the rest's at least (at its
      // bottom one). Only an estimate of where the answer lies; exactness is checked on the
      // candidates.
      double bound[2] = {0.0, 0.0};
#pragma unroll
      for (int q = 0; q < kBinsPerThread; ++q) {
        const int bin = kBins - 1 - (tid * kBinsPerThread + q);
        if (h[q] == 0) continue;
        if (bin >= cut_bin) {
          const uint32_t top = min((static_cast<uint32_t>(bin) << kBinShift) | ((1u << kBinShift) - 1u), max_key);
          bound[0] += h[q] * static_cast<double>(prob_weight(key_value(top), key_value(max_key), p.temperature));
        } else {
          const float bottom = key_value(static_cast<uint32_t>(bin) << kBinShift);
          bound[1] += h[q] * static_cast<double>(prob_weight(bottom, key_value(max_key), p.temperature));
        }
      }
      block_sums(bound, sh);
      const double top_p = p.top_p;
      fits = !(sh.sums[0] * (1.0 - top_p) < top_p * sh.sums[1]);
    }
    if (fits) {
      // 2nd pass: copy the candidates (the histogram is dead: every thread has read it above) and,
      // for top-p without top-k, sum e of the whole row and of the candidates.
      const uint32_t cut = static_cast<uint32_t>(cut_bin);
      const float l_max = key_value(max_key);
      double mass[2] = {0.0, 0.0};  // the row, the candidates
      for_each_logit(l, n, [&](int64_t i, float x) {
        const float xc = canon(x);
        const uint32_t key = order_key(xc);
        const bool is_cand = (key >> kBinShift) >= cut;
        if (is_cand)
          buf.cand[atomicAdd(&sh.count, 1)] =
              (static_cast<unsigned long long>(key) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
        if (need_mass) {
          const double e = prob_weight(xc, l_max, p.temperature);
          mass[0] += e;
          mass[1] += is_cand ? e : 0.0;
        }
      });
      double total_mass = -1.0;  // top-k rows: the mass of the k first
      bool try_it = true;
      if (nucleus_path) {
        block_sums(mass, sh);  // its barriers also complete the copies
        total_mass = sh.sums[0];
        const bool reaches_p = need_mass && sh.sums[1] >= static_cast<double>(p.top_p) * total_mass;
        try_it = reaches_p || outside_e == 0.0f || p.min_p > outside_e;
      }
      if (try_it) {
        const int32_t id =
            draw_from_candidates(buf, n_cand, top_k_path ? p.top_k : n_cand, total_mass, outside_e, p, sh);
        if (id != kNotExact) {
          if (tid == 0) ids[row] = id;
          count_path(top_k_path ? kPathTopK : kPathNucleus);
          return;
        }
      }
    }
  }
  count_path(kPathGeneral);

  // 2. e = exp((l - max) / T) in double, rounded to fp32 (see ops/backend.h), kept for the passes.
  const float l_max = canon(l[arg]);
  float* e = scratch + row * n;
  for (int64_t i = tid; i < n; i += kThreads) {
    e[i] = prob_weight(canon(l[i]), l_max, p.temperature);
  }
  __syncthreads();  // e is read across threads below

  // 3. top-k: the largest key with count(key >= it) >= k is the k-th ranked logit's key; ties at
  // it are kept up to the id of the (k - count(key > it))-th of them.
  const bool has_top_k = p.top_k > 0;
  uint32_t k_key = 0;  // keep key > k_key, or key == k_key and id <= k_cut
  int64_t k_cut = INT64_MAX;
  if (has_top_k) {
    const double k = p.top_k;
    double n_ge_key = 0.0, n_gt_key = 0.0;
    k_key = search_threshold(
        n, k, [&](int64_t i) { return order_key(canon(l[i])); }, [](int64_t) { return 1.0; }, sh, &n_ge_key, &n_gt_key);
    if (n_ge_key > k) {  // more tokens share the k-th logit than fit: the lowest ids among them
      const uint32_t kk = k_key;
      const int cut = first_crossing(
          n, k - n_gt_key - 1.0, [&](int64_t i) { return order_key(canon(l[i])) == kk ? 1.0 : 0.0; }, sh);
      k_cut = cut >= 0 ? cut : n - 1;
    }
  }
  auto top_k_kept = [&](int64_t i) {
    if (!has_top_k) return true;
    const uint32_t key = order_key(canon(l[i]));
    return key > k_key || (key == k_key && i <= k_cut);
  };

  // 4. top-p: the largest probability key τ with Σ_{kept, bits(e) >= τ} e >= top_p · M_K.
  uint32_t p_key = 0;
  if (p.top_p < 1.0f) {
    double mass[1] = {0.0};
    for (int64_t i = tid; i < n; i += kThreads)
      if (top_k_kept(i)) mass[0] += e[i];
    block_sums(mass, sh);
    const double target = static_cast<double>(p.top_p) * sh.sums[0];
    double unused_ge = 0.0, unused_gt = 0.0;
    p_key = search_threshold(
        n, target, [&](int64_t i) { return __float_as_uint(e[i]); },
        [&](int64_t i) { return top_k_kept(i) ? static_cast<double>(e[i]) : 0.0; }, sh, &unused_ge, &unused_gt);
  }

  // 5.-6. min-p, then the inverse-CDF draw over the kept tokens in id order.
  auto kept_mass = [&](int64_t i) -> double {
    const float ev = e[i];
    if (ev == 0.0f || __float_as_uint(ev) < p_key || ev < p.min_p || !top_k_kept(i)) return 0.0;
    return ev;
  };
  double mass[1] = {0.0};
  long long last = -1;
  for (int64_t i = tid; i < n; i += kThreads) {
    const double m = kept_mass(i);
    mass[0] += m;
    if (m > 0.0) last = i;
  }
  block_sums(mass, sh);
  const double total = sh.sums[0];
  const long long last_kept = static_cast<long long>(block_max_u64(static_cast<unsigned long long>(last + 1), sh)) - 1;
  const int pick = first_crossing(n, static_cast<double>(p.u) * total, kept_mass, sh);
  if (tid == 0) ids[row] = pick >= 0 ? pick : static_cast<int32_t>(last_kept >= 0 ? last_kept : arg);
}

}  // namespace

cudaError_t sample_path_rows(unsigned long long (&rows)[kSamplePaths]) {
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) return err;
  return cudaMemcpyFromSymbol(rows, g_sample_path_rows, sizeof(rows));
}

cudaError_t launch_sample(const DevTensor& logits, const DevSampleRow* rows, float* scratch, DevTensor ids,
                          cudaStream_t stream) {
  if (logits.dtype != DType::F32 || ids.dtype != DType::I32 || logits.ndim != 2) return cudaErrorInvalidValue;
  const int64_t r = logits.dim(0), n = logits.dim(1);
  if (r == 0) return cudaSuccess;
  if (n <= 0 || n >= INT_MAX || r > INT_MAX || ids.numel() != r) return cudaErrorInvalidValue;
  sample_kernel<<<static_cast<unsigned>(r), kThreads, 0, stream>>>(logits.ptr<const float>(), n, rows, scratch,
                                                                   ids.ptr<int32_t>());
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
