// CPU back-end: q/k norm + RoPE, the paged KV store, and causal GQA attention over the paged cache.
//
// Attention is tiled like flash attention so that long prefills (T = 4K..8K) stay cheap on two
// cores: a work item is (query block, kv head, tile of queries); its query rows are those queries
// times the Hq/Hkv heads sharing the kv head. Key tiles are gathered from the cache into a
// transposed fp32 tile (Kᵀ [D, kKeyTile]) so the q·k loop runs over contiguous keys, and the
// softmax is online (running max m, denominator l) in fp32; lse = m + log(l).
// Key tiles start at the block's kv_begin and step by 64 (no key before the range is ever read),
// and keys outside a query's range are masked by selects, so a query row's result depends only on
// its own q, position, key range and keys: it is bitwise the same however the rows are cut into
// blocks (CP=N vs CP=1), grouped or threaded.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_common.h"
#include "backends/cpu/cpu_x86.h"
#include "ops/contract.h"

// The tile kernel is built three times, generic x86-64, AVX2+FMA and AVX-512, picked at load time:
// CI binaries stay portable, machines with AVX2 get the 8-wide loops and AVX-512 ones 16-wide.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CPI_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPI_MULTIVERSION
#endif

namespace cpinfer {

using namespace cpu;

namespace {

constexpr int kKeyTile = 64;      // keys per tile
constexpr int kRowsPerItem = 64;  // query rows (queries × grouped heads) per work item
constexpr int kTileRows = 4;
// The AVX-512 gather prefetches the K and V rows of the key this far ahead (hardware prefetchers see
// strided 256-byte rows: a BF16 cache's 32K-context decode ran 1.3x faster with it, an F32 one ~1.1x).
constexpr int kPrefetchKeys = 16;  // rows per block of the AVX-512 tile (its scores scratch: kTileRows x kKeyTile)

// exp(x) for x <= 0 to ~2 ulp, written branch-free so the tile loops vectorize (the libm call
// does not, and would cost more than the q·k products): x = n ln2 + r, |r| <= ln2/2,
// exp(r) by a degree-6 minimax polynomial, 2^n by building the exponent bits.
[[gnu::always_inline]] inline float exp_nonpos(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  x = x < -87.0f ? -87.0f : x;           // keeps 2^n a normal float (the caller masks true zeros); NaN stays NaN
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t ni = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float r = (x - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((ni + 127) << 23);
}

// o[0, 8N) += Σ_j p[j] · v[j, 0, 8N) (v rows D apart) with the 8N outputs held in registers across
// the key loop; plain loops reload and store o for every key, which halves the speed.
using V8 = float __attribute__((vector_size(32)));
template <int N>
[[gnu::always_inline]] inline void accumulate_pv(float* __restrict o, const float* __restrict p,
                                                 const float* __restrict v, int nv, int D) {
  V8 acc[N], acc2[N];  // two chains per output: an FMA's latency would otherwise bound the loop
  for (int n = 0; n < N; ++n) {
    std::memcpy(&acc[n], o + 8 * n, sizeof(V8));
    acc2[n] = V8{};
  }
  int j = 0;
  for (; j + 2 <= nv; j += 2) {
    const float* vj = v + static_cast<ptrdiff_t>(j) * D;
    for (int n = 0; n < N; ++n) {
      V8 x, y;
      std::memcpy(&x, vj + 8 * n, sizeof(V8));
      std::memcpy(&y, vj + D + 8 * n, sizeof(V8));
      acc[n] += p[j] * x;
      acc2[n] += p[j + 1] * y;
    }
  }
  if (j < nv) {
    const float* vj = v + static_cast<ptrdiff_t>(j) * D;
    for (int n = 0; n < N; ++n) {
      V8 x;
      std::memcpy(&x, vj + 8 * n, sizeof(V8));
      acc[n] += p[j] * x;
    }
  }
  for (int n = 0; n < N; ++n) {
    acc[n] += acc2[n];
    std::memcpy(o + 8 * n, &acc[n], sizeof(V8));
  }
}

// One row's online-softmax step over a key tile: s [kKeyTile] holds the row's q·k and becomes the
// tile's weights exp(s·scale − m_new) (0 for keys at or past nv); m, l are updated and the output
// row o [D] rescaled to the new max. Masked keys (j >= nv) score -inf and weigh exactly 0 whatever
// they hold (selects, not arithmetic, so even a NaN there cannot leak in). The reductions (max, sum)
// run over kLanes partial results so they vectorize too.
template <int kLanes>
[[gnu::always_inline]] inline void softmax_tile_row(float* __restrict s, int nv, float scale, float& m, float& l,
                                                    float* __restrict o, int D) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  for (int j = 0; j < kKeyTile; ++j) s[j] = j < nv ? s[j] * scale : kNegInf;
  float lane[kLanes];
  for (int e = 0; e < kLanes; ++e) lane[e] = kNegInf;
  for (int j = 0; j < kKeyTile; j += kLanes)
    for (int e = 0; e < kLanes; ++e) lane[e] = s[j + e] > lane[e] ? s[j + e] : lane[e];
  float mx = m;
  for (int e = 0; e < kLanes; ++e) mx = std::max(mx, lane[e]);
  const float alpha = std::exp(m - mx);  // 0 on the row's first tile (m = -inf)
  for (int j = 0; j < kKeyTile; ++j) s[j] = j < nv ? exp_nonpos(s[j] - mx) : 0.0f;
  for (int e = 0; e < kLanes; ++e) lane[e] = 0.0f;
  for (int j = 0; j < kKeyTile; j += kLanes)
    for (int e = 0; e < kLanes; ++e) lane[e] += s[j + e];
  float sum = 0.0f;
  for (int e = 0; e < kLanes; ++e) sum += lane[e];
  l = l * alpha + sum;
  m = mx;
  if (alpha != 1.0f)
    for (int d = 0; d < D; ++d) o[d] *= alpha;
}

// Online-softmax update of R query rows with one key tile. q, o [R, D]; kt [D, kKeyTile] (keys
// transposed, columns >= the tile's key count are zero); v [kKeyTile, D]; n_valid[r] = how many
// leading keys of the tile row r may see (causal mask); m, l [R]; s [kKeyTile] scratch.
CPI_MULTIVERSION
void attend_tile(const float* __restrict q, int R, int D, const int* __restrict n_valid, const float* __restrict kt,
                 const float* __restrict v, float scale, float* __restrict m, float* __restrict l, float* __restrict o,
                 float* __restrict s) {
  for (int r = 0; r < R; ++r) {
    const int nv = n_valid[r];
    if (nv <= 0) continue;
    const float* qr = q + r * D;
    for (int j = 0; j < kKeyTile; ++j) s[j] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float qd = qr[d];
      const float* kd = kt + d * kKeyTile;
      for (int j = 0; j < kKeyTile; ++j) s[j] += qd * kd[j];
    }
    float* orow = o + r * D;
    softmax_tile_row<8>(s, nv, scale, m[r], l[r], orow, D);
    int d0 = 0;
    for (; d0 + 32 <= D; d0 += 32) accumulate_pv<4>(orow + d0, s, v + d0, nv, D);
    for (; d0 + 8 <= D; d0 += 8) accumulate_pv<1>(orow + d0, s, v + d0, nv, D);
    for (; d0 < D; ++d0)
      for (int j = 0; j < nv; ++j) orow[d0] += s[j] * v[j * D + d0];
  }
}

#ifdef CPINFER_X86_DISPATCH
// attend_tile on AVX-512 for D % 16 == 0 (64, 128, 256): the same online softmax, with the rows
// taken 4 at a time so that each load of K (scores) and of V (p·v) feeds 4 rows' FMAs; the
// portable tile loads once per FMA. Every output element still sees its terms one at a time in
// ascending d (scores) and ascending key (p·v), whichever rows share its block, so a row's result
// stays independent of how rows are cut (BlockSplitIsBitwiseInvariant); a key at or past a row's
// n_valid is never multiplied into that row (the rows of a block share the keys below the
// smallest n_valid of the block, each row then takes its own rest).
using V16 = float __attribute__((vector_size(64)));

// o[r][d0, d0 + 16N) += Σ_{j in [j0, j1)} p[r][j] · v[j][d0, d0 + 16N) for the B rows.
template <int B, int N>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"), always_inline)) inline void pv_rows(
    float* const (&o)[kTileRows], const float* const (&p)[kTileRows], const float* __restrict v, int j0, int j1, int D,
    int d0) {
  V16 acc[B][N];
  for (int i = 0; i < B; ++i)
    for (int n = 0; n < N; ++n) std::memcpy(&acc[i][n], o[i] + d0 + 16 * n, sizeof(V16));
  for (int j = j0; j < j1; ++j) {
    const float* vj = v + static_cast<ptrdiff_t>(j) * D + d0;
    V16 x[N];
    for (int n = 0; n < N; ++n) std::memcpy(&x[n], vj + 16 * n, sizeof(V16));
    for (int i = 0; i < B; ++i) {
      const float pj = p[i][j];
      for (int n = 0; n < N; ++n) acc[i][n] += pj * x[n];
    }
  }
  for (int i = 0; i < B; ++i)
    for (int n = 0; n < N; ++n) std::memcpy(o[i] + d0 + 16 * n, &acc[i][n], sizeof(V16));
}

template <int B>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void pv_block(float* const (&o)[kTileRows],
                                                                            const float* const (&p)[kTileRows],
                                                                            const float* __restrict v, int j0, int j1,
                                                                            int D) {
  if (j1 <= j0) return;
  int d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) pv_rows<B, 4>(o, p, v, j0, j1, D, d0);
  for (; d0 + 16 <= D; d0 += 16) pv_rows<B, 1>(o, p, v, j0, j1, D, d0);
}

// s: [kTileRows][kKeyTile] scratch.
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void attend_tile_avx512(
    const float* __restrict q, int R, int D, const int* __restrict n_valid, const float* __restrict kt,
    const float* __restrict v, float scale, float* __restrict m, float* __restrict l, float* __restrict o,
    float* __restrict s) {
  for (int r0 = 0; r0 < R; r0 += kTileRows) {
    const int nb = std::min(kTileRows, R - r0);
    bool any = false;
    for (int i = 0; i < nb; ++i) any = any || n_valid[r0 + i] > 0;
    if (!any) continue;
    // Scores of the block's rows (rows past R repeat the last one, unused).
    V16 acc[kTileRows][kKeyTile / 16] = {};
    const float* qr[kTileRows];
    for (int i = 0; i < kTileRows; ++i) qr[i] = q + static_cast<ptrdiff_t>(r0 + std::min(i, nb - 1)) * D;
    for (int d = 0; d < D; ++d) {
      V16 kd[kKeyTile / 16];
      for (int c = 0; c < kKeyTile / 16; ++c) std::memcpy(&kd[c], kt + d * kKeyTile + 16 * c, sizeof(V16));
      for (int i = 0; i < kTileRows; ++i) {
        const float qd = qr[i][d];
        for (int c = 0; c < kKeyTile / 16; ++c) acc[i][c] += qd * kd[c];
      }
    }
    // Online softmax per row, as attend_tile.
    float* orow[kTileRows];
    const float* prow[kTileRows];
    int common = kKeyTile;
    for (int i = 0; i < kTileRows; ++i) {
      float* sr = s + i * kKeyTile;
      orow[i] = o + static_cast<ptrdiff_t>(r0 + std::min(i, nb - 1)) * D;
      prow[i] = sr;
      if (i >= nb) continue;
      const int r = r0 + i, nv = n_valid[r];
      common = std::min(common, std::max(nv, 0));
      if (nv <= 0) continue;
      std::memcpy(sr, acc[i], sizeof(float) * kKeyTile);
      softmax_tile_row<16>(sr, nv, scale, m[r], l[r], orow[i], D);
    }
    // p·v: the keys every row of the block sees together, then each row's own rest.
    if (nb == kTileRows) {
      pv_block<kTileRows>(orow, prow, v, 0, common, D);
    } else {
      common = 0;
    }
    for (int i = 0; i < nb; ++i) {
      const int nv = n_valid[r0 + i];
      if (nv <= common) continue;
      float* const one_o[kTileRows] = {orow[i], orow[i], orow[i], orow[i]};
      const float* const one_p[kTileRows] = {prow[i], prow[i], prow[i], prow[i]};
      pv_block<1>(one_o, one_p, v, common, nv, D);
    }
  }
}
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which -Wmaybe-uninitialized reports
// when they inline (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// kt[(d0 + e) * kKeyTile + j0 + i] = rows[i][d0 + e] for 16 keys i and every 16 dims d0 of D: a 16 x 16
// transpose in registers per block (4 shuffle stages), where the scalar loop stores one float at a
// time with a stride of kKeyTile (it was most of a long decode step's attention).
// F32 or BF16 (widened exactly on the way) keys.
template <DType KT>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"))) void transpose_keys16_avx512(const void* const* rows,
                                                                                           int64_t D,
                                                                                           float* __restrict kt,
                                                                                           int j0) {
  for (int64_t d0 = 0; d0 < D; d0 += 16) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) {
      if constexpr (KT == DType::BF16) {
        const auto* p = reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(rows[i]) + d0);
        r[i] = bf16x16_to_f32(_mm256_loadu_si256(p));
      } else {
        r[i] = _mm512_loadu_ps(static_cast<const float*>(rows[i]) + d0);
      }
    }
    for (int i = 0; i < 16; i += 2) {  // 2 x 2 blocks of single floats
      t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // of pairs
      r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
      r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
      r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    for (int i = 0; i < 8; ++i) {  // 128-bit lanes: of 4 x 4 blocks
      const int a = (i / 4) * 8 + i % 4;
      t[a] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0x88);
      t[a + 4] = _mm512_shuffle_f32x4(r[a], r[a + 4], 0xdd);
    }
    for (int i = 0; i < 8; ++i) {  // of 8 x 8 blocks
      r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
      r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    }
    for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (d0 + i) * kKeyTile + j0, r[i]);
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

struct WorkItem {
  int32_t block;  // index into batch.blocks
  int32_t kv_head;
  int32_t i0;         // first query of the tile, relative to the block
  int32_t n_q;        // queries in the tile
  int64_t key_begin;  // keys [key_begin, key_end) are read: the block's range, cut at the causal
  int64_t key_end;    // frontier of the tile's last query (empty when key_end <= key_begin)
  int64_t n_keys() const { return std::max<int64_t>(0, key_end - key_begin); }
};

// The keys block b's queries i0 .. i0 + n_q - 1 read together: [kv_begin, min(kv_end, last + 1)).
WorkItem make_item(const AttnBlock& b, int32_t block, int32_t kv_head, int32_t i0, int32_t n_q) {
  return {block, kv_head, i0, n_q, b.kv_begin, std::min<int64_t>(b.kv_end, int64_t{b.pos_begin} + i0 + n_q)};
}

// Checks every block of the batch against q, the block table and the cache, so that the parallel
// loop can index without checks.
}  // namespace

void CpuBackend::qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                              const Tensor& positions, const RopeParams& rope) {
  const char* op = "qk_norm_rope";
  contract::qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, positions, rope);
  check_f32(q, op, "q");
  check_f32(k, op, "k");
  check_index(positions, op, "positions");
  const int64_t T = q.dim(0), Hq = q.dim(1), Hkv = k.dim(1), D = q.dim(2);
  const bool norm = q_norm_w.defined();
  for (int64_t t = 0; t < T; ++t)
    CPI_CHECK(index_at(positions, t) >= 0 && index_at(positions, t) <= std::numeric_limits<int32_t>::max(), op,
              ": positions[", t, "] = ", index_at(positions, t), " is negative or too large");
  const std::vector<float> qw = norm ? to_f32_vector(q_norm_w) : std::vector<float>(),
                           kw = norm ? to_f32_vector(k_norm_w) : std::vector<float>();
  const int64_t half = D / 2;
  float* qp = q.ptr<float>();
  float* kp = k.ptr<float>();
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (T * (Hq + Hkv) * D > kParallelMinElems)
  {
    std::vector<float> cs(static_cast<size_t>(D)), tmp(static_cast<size_t>(D));
    auto norm_rope = [&](float* x, const float* w) {
      if (w) {
        rms_row(x, w, D, eps, tmp.data());
      } else {
        std::copy(x, x + D, tmp.data());
      }
      for (int64_t i = 0; i < half; ++i) {
        const float c = cs[i], s = cs[half + i], x1 = tmp[i], x2 = tmp[half + i];
        x[i] = x1 * c - x2 * s;
        x[half + i] = x2 * c + x1 * s;
      }
    };
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      // transformers: freqs = inv_freq ⊗ float(position) in fp32, cos/sin scaled by attention_factor.
      const float pos = static_cast<float>(index_at(positions, t));
      for (int64_t i = 0; i < half; ++i) {
        const float f = pos * rope.inv_freq[i];
        cs[i] = std::cos(f) * rope.attention_factor;
        cs[half + i] = std::sin(f) * rope.attention_factor;
      }
      for (int64_t h = 0; h < Hq; ++h) norm_rope(qp + (t * Hq + h) * D, norm ? qw.data() : nullptr);
      for (int64_t h = 0; h < Hkv; ++h) norm_rope(kp + (t * Hkv + h) * D, norm ? kw.data() : nullptr);
    }
  }
}

void CpuBackend::kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) {
  const char* op = "kv_store";
  contract::kv_store(k, v, slots, cache);
  check_host(k, op, "k");
  check_host(v, op, "v");
  check_host(slots, op, "slots");
  check_host(cache.k, op, "cache.k");
  check_host(cache.v, op, "cache.v");
  const int64_t T = k.dim(0), row = k.dim(1) * k.dim(2);
  const int64_t n_slots = cache.k.dim(0) * cache.k.dim(1);
  // -1 marks a padding row (skipped); any other slot must lie in the cache.
  std::vector<int64_t> slot(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    slot[size_t(t)] = index_at(slots, t);
    CPI_CHECK(slot[size_t(t)] >= -1 && slot[size_t(t)] < n_slots, op, ": slots[", t, "] = ", slot[size_t(t)],
              " is out of range [0, ", n_slots, ") (-1: padding)");
  }
  const size_t src_row = static_cast<size_t>(row) * dtype_size(k.dtype);
  const size_t kc_row = static_cast<size_t>(row) * dtype_size(cache.k.dtype);
  const size_t vc_row = static_cast<size_t>(row) * dtype_size(cache.v.dtype);
  auto put = [&](const char* src, void* dst, DType dt) {
    if (dt == k.dtype) {
      std::memcpy(dst, src, src_row);
    } else if (dt == DType::F32) {
      to_f32(src, k.dtype, static_cast<float*>(dst), static_cast<size_t>(row));
    } else {
      std::vector<float> f(static_cast<size_t>(row));
      to_f32(src, k.dtype, f.data(), f.size());
      from_f32(f.data(), dst, dt, f.size());
    }
  };
  if (row == 0) return;
  // slot s is (block s / block_size, offset s % block_size), i.e. row s of the [n_blocks * block_size,
  // Hkv, D] reading of the cache.
  const OmpBudget budget;
#pragma omp parallel for schedule(static) num_threads(budget.threads()) if (2 * T * row > kParallelMinElems)
  for (int64_t t = 0; t < T; ++t) {
    if (slot[size_t(t)] < 0) continue;
    put(byte_ptr(k) + t * src_row, byte_ptr_mut(cache.k) + slot[t] * kc_row, cache.k.dtype);
    put(byte_ptr(v) + t * src_row, byte_ptr_mut(cache.v) + slot[t] * vc_row, cache.v.dtype);
  }
}

void CpuBackend::attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                           Tensor lse) {
  const char* op = "attention";
  // The kernel reads every table entry it is given: the contract checks them all.
  contract::attention(q, batch, cache, scale, out, lse, /*check_table_entries=*/true);
  check_f32(q, op, "q");
  check_f32(out, op, "out");
  check_host(cache.k, op, "cache.k");
  check_host(cache.v, op, "cache.v");
  const bool want_lse = lse.defined();
  if (want_lse) check_host(lse, op, "lse");
  const int64_t Hq = q.dim(1), D = q.dim(2);
  const int64_t bs = cache.k.dim(1), Hkv = cache.k.dim(2);

  const int64_t G = Hq / Hkv;
  const int64_t q_per_item = std::max<int64_t>(1, kRowsPerItem / G);
  std::vector<WorkItem> items;
  for (size_t bi = 0; bi < batch.blocks.size(); ++bi) {
    const AttnBlock& b = batch.blocks[bi];
    for (int64_t i0 = 0; i0 < b.q_len; i0 += q_per_item) {
      const int32_t n_q = static_cast<int32_t>(std::min<int64_t>(q_per_item, b.q_len - i0));
      for (int64_t g = 0; g < Hkv; ++g)
        items.push_back(make_item(b, static_cast<int32_t>(bi), static_cast<int32_t>(g), static_cast<int32_t>(i0), n_q));
    }
  }
  // Longest key ranges first so the dynamic schedule ends with the cheap tiles (causal imbalance).
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.n_keys() > b.n_keys(); });

  const float* qp = q.ptr<const float>();
  float* outp = out.ptr<float>();
  float* lsep = want_lse ? lse.ptr<float>() : nullptr;
  const DType kdt = cache.k.dtype, vdt = cache.v.dtype;
  const size_t kes = dtype_size(kdt), ves = dtype_size(vdt);
  const int64_t n_items = static_cast<int64_t>(items.size());
  double macs = 0.0;  // q·k and p·v over each item's key range (an upper bound: causal tiles are cut)
  for (const WorkItem& w : items) macs += 2.0 * static_cast<double>(w.n_q * G) * static_cast<double>(w.n_keys()) * D;
  // The AVX-512 key transpose and tile where the back-end's kernel level allows them (a
  // CpuBackend made with a lower level runs the portable ones, so tests reach both on one machine).
  const bool avx512 = kernels_ == cpu::Kernels::Avx512 && D % 16 == 0;
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (n_items > 1 && macs > kParallelMinMacs)
  {
    const size_t rows = static_cast<size_t>(q_per_item * G), d = static_cast<size_t>(D);
    std::vector<float> qt(rows * d), ot(rows * d), m(rows), l(rows), kt(d * kKeyTile), vt(kKeyTile * d),
        s(kTileRows * kKeyTile), krow(d);
    std::vector<int> n_valid(rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const WorkItem& w = items[static_cast<size_t>(it)];
      const AttnBlock& b = batch.blocks[static_cast<size_t>(w.block)];
      const int32_t* table = batch.block_table.data() + static_cast<int64_t>(b.seq) * batch.max_blocks_per_seq;
      const int R = static_cast<int>(w.n_q * G);
      // Element offset of key position p's row (this item's kv head) in cache.k / cache.v.
      auto key_offset = [&](int64_t p) {
        const int64_t slot = int64_t{table[p / bs]} * bs + p % bs;
        return static_cast<size_t>((slot * Hkv + w.kv_head) * D);
      };
      for (int qi = 0; qi < w.n_q; ++qi)
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t t = b.q_begin + w.i0 + qi, h = w.kv_head * G + hg;
          std::memcpy(&qt[(qi * G + hg) * d], qp + (t * Hq + h) * D, d * 4);
        }
      std::fill(m.begin(), m.begin() + R, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + R, 0.0f);
      std::fill(ot.begin(), ot.begin() + R * D, 0.0f);
      for (int64_t k0 = w.key_begin; k0 < w.key_end; k0 += kKeyTile) {
        const int nk = static_cast<int>(std::min<int64_t>(kKeyTile, w.key_end - k0));
        // F32 / BF16 keys on AVX-512: 16 at a time through a register transpose; the rest one by one.
        int j = 0;
#ifdef CPINFER_X86_DISPATCH
        if ((kdt == DType::F32 || kdt == DType::BF16) && avx512)
          for (; j + 16 <= nk; j += 16) {
            const void* rows[16];
            for (int i = 0; i < 16; ++i) {
              const int64_t p = k0 + j + i;
              const size_t off = key_offset(p);
              rows[i] = byte_ptr(cache.k) + off * kes;
              const char* vr = byte_ptr(cache.v) + off * ves;
              if (const int64_t pf = p + kPrefetchKeys; pf < w.key_end) {
                const size_t poff = key_offset(pf);
                for (size_t x = 0; x < d * kes; x += 64) _mm_prefetch(byte_ptr(cache.k) + poff * kes + x, _MM_HINT_T0);
                for (size_t x = 0; x < d * ves; x += 64) _mm_prefetch(byte_ptr(cache.v) + poff * ves + x, _MM_HINT_T0);
              }
              if (vdt == DType::BF16)
                bf16_to_f32_avx512(reinterpret_cast<const uint16_t*>(vr), &vt[(j + i) * d], D);
              else
                to_f32(vr, vdt, &vt[(j + i) * d], d);
            }
            if (kdt == DType::BF16)
              transpose_keys16_avx512<DType::BF16>(rows, D, kt.data(), j);
            else
              transpose_keys16_avx512<DType::F32>(rows, D, kt.data(), j);
          }
#endif
        for (; j < nk; ++j) {
          const size_t off = key_offset(k0 + j);
          const float* kr = krow.data();
          if (kdt == DType::F32) {
            kr = cache.k.ptr<const float>() + off;
          } else {
            to_f32(byte_ptr(cache.k) + off * kes, kdt, krow.data(), d);
          }
          for (size_t e = 0; e < d; ++e) kt[e * kKeyTile + j] = kr[e];
          to_f32(byte_ptr(cache.v) + off * ves, vdt, &vt[j * d], d);
        }
        if (nk < kKeyTile)
          for (size_t e = 0; e < d; ++e) std::fill(&kt[e * kKeyTile + nk], &kt[e * kKeyTile] + kKeyTile, 0.0f);
        for (int qi = 0; qi < w.n_q; ++qi) {
          const int64_t row_end = std::min<int64_t>(int64_t{b.pos_begin} + w.i0 + qi + 1, w.key_end);
          const int nv = static_cast<int>(std::clamp<int64_t>(row_end - k0, 0, nk));
          for (int64_t hg = 0; hg < G; ++hg) n_valid[qi * G + hg] = nv;
        }
#ifdef CPINFER_X86_DISPATCH
        if (avx512) {
          attend_tile_avx512(qt.data(), R, static_cast<int>(D), n_valid.data(), kt.data(), vt.data(), scale, m.data(),
                             l.data(), ot.data(), s.data());
          continue;
        }
#endif
        attend_tile(qt.data(), R, static_cast<int>(D), n_valid.data(), kt.data(), vt.data(), scale, m.data(), l.data(),
                    ot.data(), s.data());
      }
      for (int qi = 0; qi < w.n_q; ++qi)
        for (int64_t hg = 0; hg < G; ++hg) {
          const int64_t t = b.q_begin + w.i0 + qi, h = w.kv_head * G + hg, r = qi * G + hg;
          float* dst = outp + (t * Hq + h) * D;
          if (l[r] == 0.0f) {  // no key in range (a NaN seen keeps l NaN and propagates below)
            std::fill(dst, dst + D, 0.0f);
            if (lsep) lsep[t * Hq + h] = -std::numeric_limits<float>::infinity();
            continue;
          }
          for (int64_t e = 0; e < D; ++e) dst[e] = ot[r * D + e] / l[r];
          if (lsep) lsep[t * Hq + h] = m[r] + std::log(l[r]);
        }
    }
  }
}

void CpuBackend::attention_merge(Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) {
  const char* op = "attention_merge";
  contract::attention_merge(out, lse, out2, lse2);
  check_host(out, op, "out");
  check_host(out2, op, "out2");
  check_host(lse, op, "lse");
  check_host(lse2, op, "lse2");
  const int64_t rows = out.dim(0) * out.dim(1), D = out.dim(2);
  float* lp = lse.ptr<float>();
  const float* lp2 = lse2.ptr<const float>();
  const size_t es = dtype_size(out.dtype), row_bytes = static_cast<size_t>(D) * es;
  const OmpBudget budget;
#pragma omp parallel num_threads(budget.threads()) if (rows * D > kParallelMinElems)
  {
    std::vector<float> a(static_cast<size_t>(D)), b(static_cast<size_t>(D));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float l1 = lp[r], l2 = lp2[r];
      constexpr float kNegInf = -std::numeric_limits<float>::infinity();
      char* dst = byte_ptr_mut(out) + r * row_bytes;
      if (l1 == kNegInf && l2 == kNegInf) {  // both key sets empty: stays empty
        std::fill(a.begin(), a.end(), 0.0f);
        from_f32(a.data(), dst, out.dtype, a.size());
        continue;
      }
      // Weights relative to the larger lse (one of them is 1, so nothing overflows). A side with
      // weight 0 (an empty key set) is skipped rather than multiplied, so whatever its out holds
      // cannot leak in; a NaN lse gives NaN weights and propagates.
      const float m = std::max(l1, l2), w1 = std::exp(l1 - m), w2 = std::exp(l2 - m), inv = 1.0f / (w1 + w2);
      to_f32(dst, out.dtype, a.data(), a.size());
      to_f32(byte_ptr(out2) + r * row_bytes, out2.dtype, b.data(), b.size());
      for (int64_t e = 0; e < D; ++e) a[e] = ((w1 == 0.0f ? 0.0f : w1 * a[e]) + (w2 == 0.0f ? 0.0f : w2 * b[e])) * inv;
      from_f32(a.data(), dst, out.dtype, a.size());
      lp[r] = m + std::log(w1 + w2);
    }
  }
}

}  // namespace cpinfer
