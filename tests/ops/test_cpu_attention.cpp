// CPU back-end: q/k norm + RoPE, the paged KV store and paged causal GQA attention (several
// sequences, shuffled block tables, query blocks in the middle of a sequence, lse), against
// double-precision references; plus the LSE merge that context parallelism relies on and a timing
// line for a long prefill.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

class CpuAttention : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

RopeParams make_rope(int64_t D, double theta, float factor) {
  RopeParams r;
  for (int64_t i = 0; i < D / 2; ++i)
    r.inv_freq.push_back(static_cast<float>(1.0 / std::pow(theta, static_cast<double>(2 * i) / D)));
  r.attention_factor = factor;
  return r;
}

// Per-head RMSNorm then rotate_half RoPE, in double; the angle is the fp32 product as in transformers.
std::vector<double> ref_norm_rope(const HostTensor& x, const HostTensor& w, const HostTensor& pos, int64_t T,
                                  int64_t H, int64_t D, double eps, const RopeParams& rope) {
  std::vector<double> out(static_cast<size_t>(T * H * D));
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t base = (t * H + h) * D;
      double ss = 0;
      for (int64_t i = 0; i < D; ++i) ss += x.get(base + i) * x.get(base + i);
      const double r = 1.0 / std::sqrt(ss / D + eps);
      std::vector<double> n(static_cast<size_t>(D));
      for (int64_t i = 0; i < D; ++i) n[i] = x.get(base + i) * r * w.get(i);
      for (int64_t i = 0; i < half; ++i) {
        const double f = static_cast<float>(static_cast<float>(pos.get(t)) * rope.inv_freq[i]);
        const double c = std::cos(f) * rope.attention_factor, s = std::sin(f) * rope.attention_factor;
        out[base + i] = n[i] * c - n[half + i] * s;
        out[base + half + i] = n[half + i] * c + n[i] * s;
      }
    }
  return out;
}

TEST_F(CpuAttention, QkNormRope) {
  Rng rng(21);
  for (int64_t D : {16, 32, 64, 128})
    for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{1, 1}, {4, 2}, {8, 1}, {16, 2}})
      for (int64_t T : {1, 3, 17, 200}) {
        const RopeParams rope = make_rope(D, D == 64 ? 10000.0 : 1e6, D == 32 ? 1.25f : 1.0f);
        HostTensor q = rng.normal_tensor(DType::F32, {T, Hq, D}, 1.5);
        HostTensor k = rng.normal_tensor(DType::F32, {T, Hkv, D}, 0.7);
        HostTensor qw = rng.normal_tensor(DType::BF16, {D}, 0.2, 1.0);
        HostTensor kw = rng.normal_tensor(DType::F32, {D}, 0.2, 1.0);
        std::vector<int64_t> p(static_cast<size_t>(T));
        for (auto& v : p) v = rng.integer(0, 40000);
        p[0] = 0;
        HostTensor pos = index_tensor(p);
        const auto rq = ref_norm_rope(q, qw, pos, T, Hq, D, 1e-6, rope);
        const auto rk = ref_norm_rope(k, kw, pos, T, Hkv, D, 1e-6, rope);
        be->qk_norm_rope(q, k, qw, kw, 1e-6f, pos, rope);
        const std::string tag = " D=" + std::to_string(D) + " Hq=" + std::to_string(Hq) + " T=" + std::to_string(T);
        EXPECT_TRUE(all_close(q, rq, 1e-5, "q" + tag));
        EXPECT_TRUE(all_close(k, rk, 1e-5, "k" + tag));
      }
  HostTensor q(DType::F32, {2, 2, 16}), k(DType::F32, {2, 1, 16}), w(DType::F32, {16});
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0, 1}), make_rope(32, 1e4, 1)), Error);
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0, -1}), make_rope(16, 1e4, 1)), Error);
  EXPECT_THROW(be->qk_norm_rope(q, k, w, w, 1e-6f, index_tensor({0}), make_rope(16, 1e4, 1)), Error);
}

TEST_F(CpuAttention, KvStore) {
  Rng rng(22);
  for (DType cache_t : {DType::F32, DType::BF16, DType::F16}) {
    const int64_t nb = 5, bs = 4, Hkv = 2, D = 16, T = 7;
    HostTensor kc = rng.normal_tensor(cache_t, {nb, bs, Hkv, D}), vc = rng.normal_tensor(cache_t, {nb, bs, Hkv, D});
    const HostTensor k0 = kc, v0 = vc;
    HostTensor k = rng.normal_tensor(DType::F32, {T, Hkv, D}), v = rng.normal_tensor(DType::F32, {T, Hkv, D});
    const std::vector<int64_t> slots = {19, 0, 6, 7, 13, 3, 8};
    be->kv_store(k, v, index_tensor(slots), KvLayer{kc, vc});
    const int64_t row = Hkv * D;
    for (int64_t s = 0; s < nb * bs; ++s) {
      const auto it = std::find(slots.begin(), slots.end(), s);
      for (int64_t e = 0; e < row; ++e) {
        if (it == slots.end()) {  // untouched slots keep their contents
          ASSERT_EQ(kc.get(s * row + e), k0.get(s * row + e));
          ASSERT_EQ(vc.get(s * row + e), v0.get(s * row + e));
        } else {
          HostTensor want(cache_t, {2});
          const int64_t t = it - slots.begin();
          want.set(0, k.get(t * row + e));
          want.set(1, v.get(t * row + e));
          ASSERT_EQ(kc.get(s * row + e), want.get(0));
          ASSERT_EQ(vc.get(s * row + e), want.get(1));
        }
      }
    }
    EXPECT_THROW(be->kv_store(k, v, index_tensor({0, 1, 2, 3, 4, 5, 20}), KvLayer{kc, vc}), Error);
    EXPECT_THROW(be->kv_store(k, v, index_tensor({0, 1}), KvLayer{kc, vc}), Error);
  }
}

// A paged cache of random K/V for several sequences, with a shuffled physical block order.
struct PagedCase {
  HostTensor k, v;  // [n_blocks, bs, Hkv, D]
  AttnBatch batch;
  int64_t bs = 0, Hkv = 0, D = 0;

  PagedCase(Rng& rng, const std::vector<int64_t>& seq_lens, int64_t bs_, int64_t Hkv_, int64_t D_, DType dt)
      : bs(bs_), Hkv(Hkv_), D(D_) {
    int64_t mbps = 1, total = 0;
    for (int64_t L : seq_lens) {
      mbps = std::max(mbps, (L + bs - 1) / bs);
      total += (L + bs - 1) / bs;
    }
    const int64_t n_blocks = total + 3;  // a few spare blocks nobody owns
    std::vector<int32_t> phys(static_cast<size_t>(n_blocks));
    std::iota(phys.begin(), phys.end(), 0);
    std::shuffle(phys.begin(), phys.end(), rng.gen());
    batch.max_blocks_per_seq = static_cast<int32_t>(mbps);
    batch.block_table.assign(seq_lens.size() * static_cast<size_t>(mbps), -1);  // -1: unused, never read
    size_t next = 0;
    for (size_t s = 0; s < seq_lens.size(); ++s)
      for (int64_t p = 0; p < (seq_lens[s] + bs - 1) / bs; ++p) batch.block_table[s * mbps + p] = phys[next++];
    k = rng.normal_tensor(dt, {n_blocks, bs, Hkv, D});
    v = rng.normal_tensor(dt, {n_blocks, bs, Hkv, D});
  }
  KvLayer layer() const { return KvLayer{k, v}; }
  int64_t slot(int32_t seq, int64_t p) const {
    return int64_t{batch.block_table[seq * batch.max_blocks_per_seq + p / bs]} * bs + p % bs;
  }
  void add_block(int32_t q_begin, int32_t q_len, int32_t pos_begin, int32_t seq) {
    batch.blocks.push_back({q_begin, q_len, pos_begin, seq});
    batch.max_q_len = std::max(batch.max_q_len, q_len);
    batch.max_kv_len = std::max(batch.max_kv_len, pos_begin + q_len);
  }
};

// Naive causal attention in double for the listed query rows (all rows of every block if empty).
void ref_attention(const HostTensor& q, const PagedCase& pc, double scale, std::vector<double>& out,
                   std::vector<double>& lse) {
  const int64_t T = q.t.dim(0), Hq = q.t.dim(1), D = q.t.dim(2), G = Hq / pc.Hkv;
  out.assign(static_cast<size_t>(T * Hq * D), 0.0);
  lse.assign(static_cast<size_t>(T * Hq), 0.0);
  for (const AttnBlock& b : pc.batch.blocks)
    for (int64_t i = 0; i < b.q_len; ++i)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t t = b.q_begin + i, g = h / G, n = b.pos_begin + i + 1;
        std::vector<double> s(static_cast<size_t>(n));
        double mx = -1e300;
        for (int64_t p = 0; p < n; ++p) {
          const int64_t off = (pc.slot(b.seq, p) * pc.Hkv + g) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q.get((t * Hq + h) * D + d) * pc.k.get(off + d);
          s[p] = dot * scale;
          mx = std::max(mx, s[p]);
        }
        double sum = 0;
        for (auto& x : s) sum += x = std::exp(x - mx);
        for (int64_t p = 0; p < n; ++p) {
          const int64_t off = (pc.slot(b.seq, p) * pc.Hkv + g) * D;
          for (int64_t d = 0; d < D; ++d) out[(t * Hq + h) * D + d] += s[p] / sum * pc.v.get(off + d);
        }
        lse[t * Hq + h] = mx + std::log(sum);
      }
}

TEST_F(CpuAttention, PagedCausalGqa) {
  Rng rng(23);
  int n_case = 0;
  for (int64_t D : {16, 32, 64, 128})
    for (int64_t ratio : {1, 2, 4, 8})
      for (int64_t T : {1, 3, 17, 200}) {
        const int64_t bs = (n_case % 2) ? 16 : 1, Hkv = 2, Hq = Hkv * ratio;
        const DType dt = (n_case % 3 == 2) ? DType::BF16 : DType::F32;
        ++n_case;
        // seq 0: T queries in the middle of a longer sequence (keys after them are cached but unseen);
        // seq 1: two zigzag-style blocks of one sequence; seq 2: one decode query.
        const int32_t P0 = 37;
        PagedCase pc(rng, {P0 + T + 11, 60, 71}, bs, Hkv, D, dt);
        const int32_t t32 = static_cast<int32_t>(T);
        pc.add_block(1, 1, 70, 2);
        pc.add_block(2, t32, P0, 0);
        pc.add_block(2 + t32, 5, 0, 1);
        pc.add_block(0, 1, 45, 1);  // rows need not follow block order
        pc.add_block(7 + t32, 4, 50, 1);
        const int64_t rows = T + 11;
        HostTensor q = rng.normal_tensor(DType::F32, {rows, Hq, D});
        HostTensor out(DType::F32, {rows, Hq, D}), lse(DType::F32, {rows, Hq});
        out.poison();
        lse.poison();
        const float scale = 1.0f / std::sqrt(static_cast<float>(D));
        be->attention(q, pc.batch, pc.layer(), scale, out, lse);
        std::vector<double> ro, rl;
        ref_attention(q, pc, scale, ro, rl);
        const std::string tag = "D=" + std::to_string(D) + " Hq/Hkv=" + std::to_string(ratio) + " T=" +
                                std::to_string(T) + " bs=" + std::to_string(bs) + " " + dtype_str(dt);
        EXPECT_TRUE(all_close(out, ro, 1e-5, "out " + tag));
        EXPECT_TRUE(all_close(lse, rl, 1e-6, "lse " + tag));
        HostTensor out2(DType::F32, {rows, Hq, D});  // lse is optional
        out2.poison();
        be->attention(q, pc.batch, pc.layer(), scale, out2, Tensor());
        EXPECT_EQ(std::memcmp(out2.t.data, out.t.data, out.t.nbytes()), 0);
      }
}

// Context parallelism splits a query block's keys into the cached prefix and the diagonal block,
// computes each partial attention with its lse on whichever rank holds it, and merges them:
// out = Σ exp(lse_i - lse) out_i with lse = log Σ exp(lse_i). The merge must equal the full attention.
TEST_F(CpuAttention, LseMergeOfSplitKeyRangeEqualsFull) {
  Rng rng(24);
  for (auto [Hq, Hkv, D] : {std::tuple<int64_t, int64_t, int64_t>{4, 2, 64}, {8, 1, 32}}) {
    const int64_t bs = 16, P = 48, L = 37;
    PagedCase pc(rng, {P + L}, bs, Hkv, D, DType::F32);
    // Row 1 of the table sees the same cache from position P on: the "diagonal" keys only.
    const int32_t mbps = pc.batch.max_blocks_per_seq;
    std::vector<int32_t> row1(static_cast<size_t>(mbps), -1);
    for (int64_t p = P / bs; p < mbps; ++p) row1[p - P / bs] = pc.batch.block_table[p];
    pc.batch.block_table.insert(pc.batch.block_table.end(), row1.begin(), row1.end());

    HostTensor q = rng.normal_tensor(DType::F32, {L, Hq, D}, 2.0);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    auto run = [&](const std::vector<AttnBlock>& blocks, HostTensor& out, HostTensor& lse) {
      AttnBatch b = pc.batch;
      b.blocks = blocks;
      out = HostTensor(DType::F32, {L, Hq, D});
      lse = HostTensor(DType::F32, {L, Hq});
      out.poison();
      lse.poison();
      be->attention(q, b, pc.layer(), scale, out, lse);
    };
    HostTensor full_o, full_l, pre_o, pre_l, diag_o, diag_l;
    run({{0, static_cast<int32_t>(L), static_cast<int32_t>(P), 0}}, full_o, full_l);
    std::vector<AttnBlock> prefix;  // every query sees exactly keys [0, P): one q_len=1 block each
    for (int32_t i = 0; i < L; ++i) prefix.push_back({i, 1, static_cast<int32_t>(P - 1), 0});
    run(prefix, pre_o, pre_l);
    run({{0, static_cast<int32_t>(L), 0, 1}}, diag_o, diag_l);  // causal over keys [P, P + i]

    std::vector<double> merged(static_cast<size_t>(L * Hq * D)), merged_lse(static_cast<size_t>(L * Hq));
    for (int64_t r = 0; r < L * Hq; ++r) {
      const double l1 = pre_l.get(r), l2 = diag_l.get(r), m = std::max(l1, l2);
      const double w1 = std::exp(l1 - m), w2 = std::exp(l2 - m);
      merged_lse[r] = m + std::log(w1 + w2);
      for (int64_t d = 0; d < D; ++d)
        merged[r * D + d] = (w1 * pre_o.get(r * D + d) + w2 * diag_o.get(r * D + d)) / (w1 + w2);
    }
    EXPECT_TRUE(all_close(full_o, merged, 1e-5, "merged out"));
    EXPECT_TRUE(all_close(full_l, merged_lse, 1e-6, "merged lse"));
  }
}

// Cutting a sequence's queries into blocks (as context parallelism's zigzag split does) and
// listing them in another row order gives bitwise the same rows as one block.
TEST_F(CpuAttention, BlockSplitIsBitwiseInvariant) {
  Rng rng(28);
  const int64_t L = 150, Hq = 8, Hkv = 2, D = 64;
  PagedCase pc(rng, {L}, 16, Hkv, D, DType::BF16);
  HostTensor q = rng.normal_tensor(DType::F32, {L, Hq, D});
  const float scale = 0.125f;
  PagedCase one = pc;
  one.add_block(0, static_cast<int32_t>(L), 0, 0);
  HostTensor out1(DType::F32, {L, Hq, D}), lse1(DType::F32, {L, Hq});
  be->attention(q, one.batch, one.layer(), scale, out1, lse1);
  // Blocks [0, 37), [37, 113), [113, 150) stored in q rows in the order 2, 0, 1.
  const int32_t cuts[4] = {0, 37, 113, 150};
  const int order[3] = {2, 0, 1};
  PagedCase split = pc;
  HostTensor qs(DType::F32, {L, Hq, D}), outs(DType::F32, {L, Hq, D}), lses(DType::F32, {L, Hq});
  std::vector<int64_t> row_of(static_cast<size_t>(L));  // position -> row in qs
  int32_t row = 0;
  for (int c : order) {
    split.add_block(row, cuts[c + 1] - cuts[c], cuts[c], 0);
    for (int32_t p = cuts[c]; p < cuts[c + 1]; ++p) row_of[p] = row++;
  }
  const size_t rb = static_cast<size_t>(Hq * D) * 4;
  for (int64_t p = 0; p < L; ++p)
    std::memcpy(qs.ptr<char>() + row_of[p] * rb, q.ptr<char>() + p * rb, rb);
  be->attention(qs, split.batch, split.layer(), scale, outs, lses);
  for (int64_t p = 0; p < L; ++p) {
    ASSERT_EQ(std::memcmp(outs.ptr<char>() + row_of[p] * rb, out1.ptr<char>() + p * rb, rb), 0) << "position " << p;
    ASSERT_EQ(std::memcmp(lses.ptr<float>() + row_of[p] * Hq, lse1.ptr<float>() + p * Hq, Hq * 4), 0) << p;
  }
}

// A NaN reaches exactly the outputs whose softmax includes it: a masked (future) key in the same
// tile must not leak into earlier queries, and a NaN query must not be hidden.
TEST_F(CpuAttention, NanPropagatesOnlyWhereItIsSeen) {
  Rng rng(27);
  PagedCase pc(rng, {8}, 16, 1, 16, DType::F32);
  pc.add_block(0, 8, 0, 0);
  HostTensor q = rng.normal_tensor(DType::F32, {8, 1, 16}), out(DType::F32, {8, 1, 16}), lse(DType::F32, {8, 1});
  const double nan = std::numeric_limits<double>::quiet_NaN();
  pc.k.set(pc.slot(0, 5) * 16 + 3, nan);  // key 5: seen by queries 5..7 only
  q.set(2 * 16 + 7, nan);                 // query 2
  be->attention(q, pc.batch, pc.layer(), 0.25f, out, lse);
  for (int64_t t = 0; t < 8; ++t) {
    const bool want_nan = t == 2 || t >= 5;
    EXPECT_EQ(std::isnan(lse.get(t)), want_nan) << "row " << t;
    for (int64_t d = 0; d < 16; ++d) ASSERT_EQ(std::isnan(out.get(t * 16 + d)), want_nan) << "row " << t;
  }
}

TEST_F(CpuAttention, BadMetadataThrows) {
  Rng rng(25);
  PagedCase pc(rng, {40}, 16, 2, 16, DType::F32);
  HostTensor q = rng.normal_tensor(DType::F32, {8, 4, 16}), out(DType::F32, {8, 4, 16}), lse(DType::F32, {8, 4});
  auto attn = [&](std::vector<AttnBlock> blocks, std::vector<int32_t> table = {}) {
    AttnBatch b = pc.batch;
    b.blocks = std::move(blocks);
    if (!table.empty()) b.block_table = std::move(table);
    be->attention(q, b, pc.layer(), 0.25f, out, lse);
  };
  attn({{0, 8, 32, 0}});                                      // keys 0..39: fine
  EXPECT_THROW(attn({{0, 8, 41, 0}}), Error);                 // keys 0..48 need a 4th page the table lacks
  EXPECT_THROW(attn({{0, 8, 0, 1}}), Error);                  // sequence 1 does not exist
  EXPECT_THROW(attn({{4, 8, 0, 0}}), Error);                  // rows 4..11 of an 8-row q
  EXPECT_THROW(attn({{0, 5, 0, 0}, {4, 4, 0, 0}}), Error);    // row 4 in two blocks
  attn({{0, 8, 0, 0}}, {0, 99, 1});                           // only page 0 is read: fine
  EXPECT_THROW(attn({{0, 8, 20, 0}}, {0, 99, 1}), Error);     // page 1 -> block 99 out of range
  HostTensor q3 = rng.normal_tensor(DType::F32, {8, 3, 16}), out3(DType::F32, {8, 3, 16});
  EXPECT_THROW(be->attention(q3, pc.batch, pc.layer(), 0.25f, out3, Tensor()), Error);  // 3 % 2 heads
  EXPECT_THROW(be->attention(q, pc.batch, pc.layer(), 0.25f, out, HostTensor(DType::F32, {8, 3})), Error);
}

TEST_F(CpuAttention, LongPrefillTiming) {
  Rng rng(26);
  const int64_t T = kSanitized ? 1024 : 4096, Hq = 4, Hkv = 2, D = 32, bs = 16;
  PagedCase pc(rng, {T}, bs, Hkv, D, DType::F32);
  pc.add_block(0, static_cast<int32_t>(T), 0, 0);
  HostTensor q = rng.normal_tensor(DType::F32, {T, Hq, D}), out(DType::F32, {T, Hq, D}), lse(DType::F32, {T, Hq});
  out.poison();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  be->attention(q, pc.batch, pc.layer(), scale, out, lse);  // warm-up (thread team, pages)
  const auto t0 = std::chrono::steady_clock::now();
  be->attention(q, pc.batch, pc.layer(), scale, out, lse);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  const double gflop = 2.0 * 2.0 * Hq * D * (static_cast<double>(T) * (T + 1) / 2) * 1e-9;
  std::printf("[ timing ] cpu attention T=%lld Hq=%lld Hkv=%lld D=%lld causal: %.1f ms (%.2f GFLOP/s)\n",
              static_cast<long long>(T), static_cast<long long>(Hq), static_cast<long long>(Hkv),
              static_cast<long long>(D), ms, gflop / (ms * 1e-3));
  // Spot-check the first, a middle and the last rows against the reference (a full reference would
  // be too slow): every key tile of the long prefix is exercised by the last row.
  PagedCase spot = pc;
  spot.batch.blocks.clear();
  HostTensor qs(DType::F32, {3, Hq, D}), os(DType::F32, {3, Hq, D});
  const int64_t picks[3] = {0, T / 2 + 5, T - 1};
  for (int r = 0; r < 3; ++r) {
    std::memcpy(qs.ptr<float>() + r * Hq * D, q.ptr<float>() + picks[r] * Hq * D, Hq * D * 4);
    std::memcpy(os.ptr<float>() + r * Hq * D, out.ptr<float>() + picks[r] * Hq * D, Hq * D * 4);
    spot.add_block(r, 1, static_cast<int32_t>(picks[r]), 0);
  }
  std::vector<double> ro, rl;
  ref_attention(qs, spot, scale, ro, rl);
  EXPECT_TRUE(all_close(os, ro, 1e-5, "long prefill rows"));
}

}  // namespace
}  // namespace cpinfer::test
