// CPU back-end: paged causal GQA attention (several sequences, shuffled block tables, query blocks
// in the middle of a sequence, key ranges, lse), against double-precision references; plus
// attention_merge, the LSE merge that context parallelism relies on, and a timing line for a long
// prefill. q/k norm + RoPE and the KV store, tests of the same CpuAttention suite (fixture in
// ops_test_util.h), are in test_cpu_rope_kv.cpp.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <numeric>

#include "backends/cpu/cpu_backend.h"
#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

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
  void add_block(int32_t q_begin, int32_t q_len, int32_t pos_begin, int32_t seq, int32_t kv_begin = 0,
                 int32_t kv_end = AttnBlock::kNoBound) {
    batch.blocks.push_back({q_begin, q_len, pos_begin, seq, kv_begin, kv_end});
    batch.max_q_len = std::max(batch.max_q_len, q_len);
    batch.max_kv_len = std::max(batch.max_kv_len, pos_begin + q_len);
  }
};

// Naive attention in double of every block's rows over its key range [kv_begin, min(kv_end,
// pos + 1)); a row with no key gets out 0 and lse -inf.
void ref_attention(const HostTensor& q, const PagedCase& pc, double scale, std::vector<double>& out,
                   std::vector<double>& lse) {
  const int64_t T = q.t.dim(0), Hq = q.t.dim(1), D = q.t.dim(2), G = Hq / pc.Hkv;
  out.assign(static_cast<size_t>(T * Hq * D), 0.0);
  lse.assign(static_cast<size_t>(T * Hq), 0.0);
  for (const AttnBlock& b : pc.batch.blocks)
    for (int64_t i = 0; i < b.q_len; ++i)
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t t = b.q_begin + i, g = h / G;
        const int64_t lo = b.kv_begin, hi = std::min<int64_t>(b.kv_end, b.pos_begin + i + 1);
        if (hi <= lo) {
          lse[t * Hq + h] = -std::numeric_limits<double>::infinity();
          continue;
        }
        std::vector<double> s(static_cast<size_t>(hi - lo));
        double mx = -1e300;
        for (int64_t p = lo; p < hi; ++p) {
          const int64_t off = (pc.slot(b.seq, p) * pc.Hkv + g) * D;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q.get((t * Hq + h) * D + d) * pc.k.get(off + d);
          s[p - lo] = dot * scale;
          mx = std::max(mx, s[p - lo]);
        }
        double sum = 0;
        for (auto& x : s) sum += x = std::exp(x - mx);
        for (int64_t p = lo; p < hi; ++p) {
          const int64_t off = (pc.slot(b.seq, p) * pc.Hkv + g) * D;
          for (int64_t d = 0; d < D; ++d) out[(t * Hq + h) * D + d] += s[p - lo] / sum * pc.v.get(off + d);
        }
        lse[t * Hq + h] = mx + std::log(sum);
      }
}

// all_close for lse, where -inf (no key in range) must match exactly.
::testing::AssertionResult lse_close(const HostTensor& actual, const std::vector<double>& ref, double rtol,
                                     const std::string& what) {
  HostTensor finite = actual;
  std::vector<double> ref_finite = ref;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double a = actual.get(static_cast<int64_t>(i));
    if (std::isinf(ref[i]) || std::isinf(a)) {
      if (a != ref[i])
        return ::testing::AssertionFailure() << what << ": element " << i << " is " << a << ", want " << ref[i];
      finite.set(static_cast<int64_t>(i), 0.0);
      ref_finite[i] = 0.0;
    }
  }
  return all_close(finite, ref_finite, rtol, what);
}

// On the back-end's best kernels and on the portable ones (on an AVX-512 machine the first are the
// AVX-512 key transpose and tile).
TEST_F(CpuAttention, PagedCausalGqa) {
  CpuBackend generic(cpu::Kernels::Generic, /*fp8=*/false);
  for (Backend* be : {this->be.get(), static_cast<Backend*>(&generic)}) {
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
          const std::string tag = "D=" + std::to_string(D) + " Hq/Hkv=" + std::to_string(ratio) +
                                  " T=" + std::to_string(T) + " bs=" + std::to_string(bs) + " " + dtype_str(dt);
          EXPECT_TRUE(all_close(out, ro, 1e-5, "out " + tag));
          EXPECT_TRUE(all_close(lse, rl, 1e-6, "lse " + tag));
          HostTensor out2(DType::F32, {rows, Hq, D});  // lse is optional
          out2.poison();
          be->attention(q, pc.batch, pc.layer(), scale, out2, Tensor());
          EXPECT_EQ(std::memcmp(out2.t.data, out.t.data, out.t.nbytes()), 0);
        }
  }
}

// NaN in K and V at every position of seq no block of pc reads, so that reading one shows up.
void poison_unread_keys(PagedCase& pc, const std::vector<int64_t>& seq_lens) {
  for (size_t seq = 0; seq < seq_lens.size(); ++seq) {
    std::vector<uint8_t> read(static_cast<size_t>(seq_lens[seq]), 0);
    for (const AttnBlock& b : pc.batch.blocks)
      if (b.seq == static_cast<int32_t>(seq) && b.q_len > 0)
        for (int64_t p = b.kv_begin; p < std::min<int64_t>(b.kv_end, int64_t{b.pos_begin} + b.q_len); ++p) read[p] = 1;
    const int64_t row = pc.Hkv * pc.D;
    for (int64_t p = 0; p < seq_lens[seq]; ++p)
      if (!read[p])
        for (int64_t e = 0; e < row; ++e) {
          pc.k.set(pc.slot(static_cast<int32_t>(seq), p) * row + e, std::numeric_limits<double>::quiet_NaN());
          pc.v.set(pc.slot(static_cast<int32_t>(seq), p) * row + e, std::numeric_limits<double>::quiet_NaN());
        }
  }
}

// Every block attends to its key range only: diagonal (kv_begin = pos_begin), prefix (kv_end =
// pos_begin), arbitrary and empty ranges, at offsets on and off the 64-key tile, several blocks of
// one sequence in one batch, rows out of block order. Keys no block reads are NaN.
TEST_F(CpuAttention, KeyRangesMatchReference) {
  Rng rng(29);
  constexpr int32_t kNo = AttnBlock::kNoBound;
  struct Range {
    int32_t q_len, pos_begin, seq, kv_begin, kv_end;
  };
  const std::vector<Range> ranges = {
      {70, 130, 0, 130, kNo},  // diagonal at an offset off the tile grid
      {37, 200, 0, 0, 200},    // prefix (no causal mask needed)
      {65, 64, 1, 64, kNo},    // diagonal on the tile grid
      {20, 130, 1, 0, 130},    // prefix, longer than one tile and not a multiple of one
      {30, 100, 0, 17, 90},    // range ending before every query
      {30, 100, 0, 50, 115},   // range ending inside the block: kv_end cuts the causal frontier
      {9, 250, 0, 254, kNo},   // kv_begin inside the block: its first 4 queries see nothing
      {5, 40, 1, 33, 33},      // empty range
      {4, 10, 1, 90, kNo},     // range after every query: empty
      {1, 299, 0, 260, kNo},   // decode, a range to the end
      {1, 149, 1, 140, 145},   // decode, a range
  };
  const std::vector<int64_t> seq_lens = {300, 150};
  int n_case = 0;
  for (int64_t D : {16, 64, 128})
    for (auto [Hq, Hkv] : {std::pair<int64_t, int64_t>{8, 2}, {3, 1}, {4, 4}}) {
      const int64_t bs = n_case % 3 == 0 ? 16 : (n_case % 3 == 1 ? 5 : 1);
      const DType dt = n_case % 2 ? DType::BF16 : DType::F32;
      ++n_case;
      PagedCase pc(rng, seq_lens, bs, Hkv, D, dt);
      int32_t rows = 0;
      for (const Range& r : ranges) rows += r.q_len;
      int32_t row = rows;
      for (const Range& r : ranges) {  // rows in reverse block order
        row -= r.q_len;
        pc.add_block(row, r.q_len, r.pos_begin, r.seq, r.kv_begin, r.kv_end);
      }
      poison_unread_keys(pc, seq_lens);
      HostTensor q = rng.normal_tensor(DType::F32, {rows, Hq, D}, 1.5);
      HostTensor out(DType::F32, {rows, Hq, D}), lse(DType::F32, {rows, Hq});
      out.poison();
      lse.poison();
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      be->attention(q, pc.batch, pc.layer(), scale, out, lse);
      std::vector<double> ro, rl;
      ref_attention(q, pc, scale, ro, rl);
      const std::string tag = "D=" + std::to_string(D) + " Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) +
                              " bs=" + std::to_string(bs) + " " + dtype_str(dt);
      EXPECT_TRUE(all_close(out, ro, 1e-5, "out " + tag));
      EXPECT_TRUE(lse_close(lse, rl, 1e-6, "lse " + tag));
      int64_t n_empty = 0;
      for (int64_t r = 0; r < rows * Hq; ++r) {
        if (!std::isinf(rl[r])) continue;
        ++n_empty;
        for (int64_t d = 0; d < D; ++d) ASSERT_EQ(out.get(r * D + d), 0.0) << "empty row " << r << " " << tag;
      }
      EXPECT_EQ(n_empty, (4 + 5 + 4) * Hq) << tag;  // the rows of the three empty cases
      HostTensor out2(DType::F32, {rows, Hq, D});
      out2.poison();
      be->attention(q, pc.batch, pc.layer(), scale, out2, Tensor());
      EXPECT_EQ(std::memcmp(out2.t.data, out.t.data, out.t.nbytes()), 0) << tag;
    }
}

// Context parallelism overlaps the K/V exchange with the diagonal part of each local block's
// attention (kv_begin = pos_begin: keys this rank computed), then adds the prefix (kv_end =
// pos_begin: keys from the other ranks) by attention_merge. The merge must equal one full
// attention, out and lse, for zigzag blocks after a cached prefix; the block at position 0 has an
// empty prefix, and merging with it is the identity. Each part is also run alone on a cache whose
// other keys are NaN (the diagonal pass runs before the prefix has arrived) and must give bitwise
// the rows of the batched run.
TEST_F(CpuAttention, DiagonalMergedWithPrefixEqualsFull) {
  Rng rng(24);
  for (auto [Hq, Hkv, D, bs, cached] : {std::tuple<int64_t, int64_t, int64_t, int64_t, int32_t>{8, 2, 64, 16, 0},
                                        {8, 1, 32, 5, 37},
                                        {6, 3, 128, 1, 64}}) {
    // Zigzag split of L new tokens over C = 2 ranks: 4 blocks, rank 0 holds 0 and 3, rank 1 holds 1
    // and 2; rows ordered rank 0 then rank 1.
    const int32_t L = 203, kC2 = 4;
    int32_t cut[kC2 + 1] = {0};
    for (int i = 0; i < kC2; ++i) cut[i + 1] = cut[i] + L / kC2 + (i < L % kC2 ? 1 : 0);
    const std::vector<int64_t> seq_lens = {cached + L};
    PagedCase pc(rng, seq_lens, bs, Hkv, D, DType::F32);
    PagedCase full = pc, diag = pc, prefix = pc;
    int32_t row = 0;
    for (int blk : {0, 3, 1, 2}) {
      const int32_t len = cut[blk + 1] - cut[blk], pos = cached + cut[blk];
      full.add_block(row, len, pos, 0);
      diag.add_block(row, len, pos, 0, pos);
      prefix.add_block(row, len, pos, 0, 0, pos);
      row += len;
    }
    HostTensor q = rng.normal_tensor(DType::F32, {L, Hq, D}, 2.0);
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    auto run = [&](const PagedCase& c, HostTensor& out, HostTensor& lse) {
      out = HostTensor(DType::F32, {L, Hq, D});
      lse = HostTensor(DType::F32, {L, Hq});
      out.poison();
      lse.poison();
      be->attention(q, c.batch, c.layer(), scale, out, lse);
    };
    HostTensor diag_o, diag_l, pre_o, pre_l, full_o, full_l;
    run(diag, diag_o, diag_l);
    run(prefix, pre_o, pre_l);
    run(full, full_o, full_l);
    const std::string tag = "Hq=" + std::to_string(Hq) + " Hkv=" + std::to_string(Hkv) + " D=" + std::to_string(D) +
                            " bs=" + std::to_string(bs) + " cached=" + std::to_string(cached);
    std::vector<double> ro, rl;
    ref_attention(q, diag, scale, ro, rl);
    EXPECT_TRUE(all_close(diag_o, ro, 1e-5, "diagonal out " + tag));
    EXPECT_TRUE(lse_close(diag_l, rl, 1e-6, "diagonal lse " + tag));
    ref_attention(q, prefix, scale, ro, rl);
    EXPECT_TRUE(all_close(pre_o, ro, 1e-5, "prefix out " + tag));
    EXPECT_TRUE(lse_close(pre_l, rl, 1e-6, "prefix lse " + tag));

    HostTensor m_o = diag_o, m_l = diag_l;
    be->attention_merge(m_o, m_l, pre_o, pre_l);
    ref_attention(q, full, scale, ro, rl);
    EXPECT_TRUE(all_close(m_o, ro, 1e-5, "merged out " + tag));
    EXPECT_TRUE(all_close(m_l, rl, 1e-6, "merged lse " + tag));
    EXPECT_TRUE(all_close(full_o, ro, 1e-5, "full out " + tag));
    // The merge is symmetric: prefix ⊕ diagonal gives the same bits.
    HostTensor m2_o = pre_o, m2_l = pre_l;
    be->attention_merge(m2_o, m2_l, diag_o, diag_l);
    EXPECT_EQ(std::memcmp(m2_o.t.data, m_o.t.data, m_o.t.nbytes()), 0) << tag;
    EXPECT_EQ(std::memcmp(m2_l.t.data, m_l.t.data, m_l.t.nbytes()), 0) << tag;
    if (cached == 0) {  // block 0 sits at position 0: its prefix is empty and the merge keeps its diagonal
      const int32_t n0 = cut[1];
      for (int64_t r = 0; r < n0 * Hq; ++r) ASSERT_EQ(pre_l.get(r), -std::numeric_limits<double>::infinity());
      EXPECT_EQ(std::memcmp(m_o.t.data, diag_o.t.data, static_cast<size_t>(n0 * Hq * D) * 4), 0) << tag;
      EXPECT_EQ(std::memcmp(m_l.t.data, diag_l.t.data, static_cast<size_t>(n0 * Hq) * 4), 0) << tag;
    }

    // Each block's part alone, every key outside its range NaN.
    for (size_t bi = 0; bi < full.batch.blocks.size(); ++bi)
      for (const PagedCase* part : {&diag, &prefix}) {
        PagedCase alone = pc;
        alone.batch.blocks = {part->batch.blocks[bi]};
        poison_unread_keys(alone, seq_lens);
        HostTensor o(DType::F32, {L, Hq, D}), l(DType::F32, {L, Hq});
        be->attention(q, alone.batch, alone.layer(), scale, o, l);
        const HostTensor& want_o = part == &diag ? diag_o : pre_o;
        const HostTensor& want_l = part == &diag ? diag_l : pre_l;
        const AttnBlock& b = alone.batch.blocks[0];
        const size_t off = static_cast<size_t>(b.q_begin * Hq), n = static_cast<size_t>(b.q_len * Hq);
        EXPECT_EQ(std::memcmp(o.ptr<float>() + off * D, want_o.t.ptr<const float>() + off * D, n * D * 4), 0)
            << (part == &diag ? "diagonal" : "prefix") << " block " << bi << " " << tag;
        EXPECT_EQ(std::memcmp(l.ptr<float>() + off, want_l.t.ptr<const float>() + off, n * 4), 0)
            << (part == &diag ? "diagonal" : "prefix") << " block " << bi << " " << tag;
      }
  }
}

// attention_merge row by row: two finite sides (close and far apart lse), one empty side (-inf:
// the other side comes back bit for bit, whatever the empty side's out holds), both empty (0 and
// -inf), in F32 and BF16.
TEST_F(CpuAttention, AttentionMergeCases) {
  Rng rng(30);
  const int64_t T = 6, Hq = 5, D = 20, R = T * Hq;
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (DType dt : {DType::F32, DType::BF16}) {
    HostTensor o1 = rng.normal_tensor(dt, {T, Hq, D}), o2 = rng.normal_tensor(dt, {T, Hq, D});
    HostTensor l1(DType::F32, {T, Hq}), l2(DType::F32, {T, Hq});
    for (int64_t r = 0; r < R; ++r) {
      double a = rng.uniform(-3, 8), b = rng.uniform(-3, 8);
      switch (r % 5) {
        case 1:
          a = -inf;
          break;
        case 2:
          b = -inf;
          break;
        case 3:
          a = b = -inf;
          break;
        case 4:
          b = a + 60.0;
          break;  // weight e^-60 on side 1
        default:
          break;
      }
      l1.set(r, a);
      l2.set(r, b);
      for (int64_t d = 0; d < D; ++d) {  // an empty side's out is never read
        if (std::isinf(a)) o1.set(r * D + d, nan);
        if (std::isinf(b)) o2.set(r * D + d, nan);
      }
    }
    std::vector<double> want_o(static_cast<size_t>(R * D)), want_l(static_cast<size_t>(R));
    for (int64_t r = 0; r < R; ++r) {
      const double a = l1.get(r), b = l2.get(r), m = std::max(a, b);
      if (std::isinf(m)) {
        want_l[r] = -inf;
        continue;  // out 0
      }
      const double w1 = std::exp(a - m), w2 = std::exp(b - m);
      want_l[r] = m + std::log(w1 + w2);
      for (int64_t d = 0; d < D; ++d)
        want_o[r * D + d] =
            ((w1 > 0 ? w1 * o1.get(r * D + d) : 0.0) + (w2 > 0 ? w2 * o2.get(r * D + d) : 0.0)) / (w1 + w2);
    }
    HostTensor o = o1, l = l1;
    be->attention_merge(o, l, o2, l2);
    const std::string tag = dtype_str(dt);
    EXPECT_TRUE(all_close(o, want_o, dt == DType::F32 ? 1e-6 : 1e-2, "merged out " + tag));
    EXPECT_TRUE(lse_close(l, want_l, 1e-7, "merged lse " + tag));
    for (int64_t r = 0; r < R; ++r) {
      const HostTensor* kept = r % 5 == 1 ? &o2 : r % 5 == 2 ? &o1 : nullptr;
      for (int64_t d = 0; d < D; ++d) {
        if (kept) ASSERT_EQ(o.get(r * D + d), kept->get(r * D + d)) << "row " << r << " " << tag;
        if (r % 5 == 3) ASSERT_EQ(o.get(r * D + d), 0.0) << "row " << r << " " << tag;
      }
    }
  }
  HostTensor o(DType::F32, {2, 3, 4}), l(DType::F32, {2, 3});
  EXPECT_THROW(be->attention_merge(o, l, HostTensor(DType::F32, {2, 3, 5}), l), Error);
  EXPECT_THROW(be->attention_merge(o, l, HostTensor(DType::BF16, {2, 3, 4}), l), Error);
  EXPECT_THROW(be->attention_merge(o, HostTensor(DType::F32, {2, 4}), o, HostTensor(DType::F32, {2, 4})), Error);
  EXPECT_THROW(be->attention_merge(o, l, o, HostTensor(DType::F32, {3, 3})), Error);
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
  for (int64_t p = 0; p < L; ++p) std::memcpy(qs.ptr<char>() + row_of[p] * rb, q.ptr<char>() + p * rb, rb);
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
  attn({{0, 8, 32, 0}});                                       // keys 0..39: fine
  EXPECT_THROW(attn({{0, 8, 41, 0}}), Error);                  // keys 0..48 need a 4th page the table lacks
  EXPECT_THROW(attn({{0, 8, 0, 1}}), Error);                   // sequence 1 does not exist
  EXPECT_THROW(attn({{4, 8, 0, 0}}), Error);                   // rows 4..11 of an 8-row q
  EXPECT_THROW(attn({{0, 5, 0, 0}, {4, 4, 0, 0}}), Error);     // row 4 in two blocks
  attn({{0, 8, 0, 0}}, {0, 99, 1});                            // only page 0 is read: fine
  EXPECT_THROW(attn({{0, 8, 20, 0}}, {0, 99, 1}), Error);      // page 1 -> block 99 out of range
  attn({{0, 8, 32, 0, 32}}, {99, 99, 1});                      // diagonal: keys 32..39 = page 2 only
  attn({{0, 8, 32, 0, 0, 16}}, {0, 99, 99});                   // prefix [0, 16): page 0 only
  EXPECT_THROW(attn({{0, 8, 32, 0, 16}}, {0, 99, 1}), Error);  // keys 16..39 read page 1
  EXPECT_THROW(attn({{0, 8, 32, 0, -1}}), Error);              // kv_begin < 0
  EXPECT_THROW(attn({{0, 8, 32, 0, 20, 19}}), Error);          // kv_begin > kv_end
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
