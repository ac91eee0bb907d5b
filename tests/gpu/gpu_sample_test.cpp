// CUDA sample vs the CPU reference (backends/cpu/cpu_sample.cpp) on full-vocabulary rows: the same
// (logits, SampleRow) must give the same id, except where the reference's draw lies within
// rounding of a CDF boundary or of the top-p threshold: there a different summation order may
// legitimately pick the neighbour. Those rows are counted and must stay under 1%.
// "Within rounding" is 1e-9 of the kept mass, not 1e-5: a flat row keeps ~150K tokens of mean
// share 6.6e-6, so nearly every such draw lies within 1e-5 of some boundary (the test prints that
// count too). Both back-ends sum in double, so order-of-summation differences stay near 1e-12.
// The CUDA kernel has three drawn-row paths (kernels/sample.cu): top-k rows whose k-th bucket fits
// in shared memory (k <= 4096) and top-p / min-p rows without top-k whose nucleus fits run on a few
// thousand candidates, every other row on the full row; the tests below mix them, and greedy rows,
// in one launch. cuda::sample_path_rows tells which path the rows of a launch took.
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <span>
#include <utility>

#include "backends/cpu/cpu_backend.h"
#include "backends/cuda/kernels/kernels.h"
#include "gpu_test_util.h"

namespace cpinfer::gputest {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr double kNearBoundary = 1e-9;
constexpr double kLooseBoundary = 1e-5;  // only reported

SampleRow mix_row(float temperature, int top_k, float top_p, float min_p) {
  SampleRow r;
  r.temperature = temperature;
  r.top_k = top_k;
  r.top_p = top_p;
  r.min_p = min_p;
  return r;
}

class GpuSample : public GpuOpsTest {
 protected:
  // Row r of [R, V] logits: N(0, s²) with s varying by row, some rows rounded to bf16 or to
  // quarter steps (many ties), some with -inf / NaN stretches, some with one dominant token.
  static std::vector<float> make_logits(int64_t r_count, int64_t v, uint32_t seed) {
    Rng rng(seed);
    std::vector<float> l(static_cast<size_t>(r_count * v));
    std::normal_distribution<float> nd(0.0f, 1.0f);
    for (int64_t r = 0; r < r_count; ++r) {
      const float scale = 0.5f * static_cast<float>(1 << (r % 4));  // 0.5, 1, 2, 4
      float* row = l.data() + r * v;
      for (int64_t i = 0; i < v; ++i) row[i] = nd(rng.gen()) * scale;
      if (r % 8 == 3)
        for (int64_t i = 0; i < v; ++i) row[i] = bf16_to_f32(f32_to_bf16(row[i]));
      if (r % 8 == 5)
        for (int64_t i = 0; i < v; ++i) row[i] = std::round(row[i] * 4.0f) / 4.0f;
      if (r % 16 == 7) {
        for (int64_t i = v / 3; i < v; ++i) row[i] = -kInf;
        for (int64_t i = 0; i < v; i += 997) row[i] = std::nanf("");
      }
      if (r % 16 == 9) row[(r * 7919) % v] = 25.0f;
    }
    return l;
  }

  // One launch of a mixed batch: `host` [R, V] uploaded into logits; row r takes mix
  // (3r + step + shift) % |mixes|, seeded seed0 + r, draw number `step`. Returns the rows and ids.
  std::pair<std::vector<SampleRow>, std::vector<int32_t>> sample_step(const std::vector<float>& host, Tensor& logits,
                                                                      Tensor& ids, std::span<const SampleRow> mixes,
                                                                      int step, int shift, uint64_t seed0) {
    const int64_t r_count = logits.dim(0);
    gpu_->upload(logits.data, host.data(), host.size() * sizeof(float));
    std::vector<SampleRow> rows(static_cast<size_t>(r_count));
    for (int64_t r = 0; r < r_count; ++r) {
      rows[r] = mixes[static_cast<size_t>(r * 3 + step + shift) % mixes.size()];
      rows[r].seed = seed0 + static_cast<uint64_t>(r);
      rows[r].step = static_cast<uint64_t>(step);
    }
    gpu_->sample(logits, rows, ids);
    return {rows, gpu_read_i32(ids)};
  }
};

TEST_F(GpuSample, MatchesTheCpuReferenceOnFullVocabularyRows) {
  const int64_t r_count = 64, v = 151936;
  const std::vector<float> host = make_logits(r_count, v, 1234);
  Tensor logits = gpu_tensor("logits", DType::F32, {r_count, v}, &host);
  Tensor ids = gpu_tensor("ids", DType::I32, {r_count}, nullptr);
  const SampleRow mixes[] = {
      mix_row(0.0f, -1, 1.0f, 0.0f),    // greedy
      mix_row(1.0f, -1, 1.0f, 0.0f),    // plain temperature over 152K tokens
      mix_row(0.7f, 50, 1.0f, 0.0f),    // top-k
      mix_row(1.0f, -1, 0.9f, 0.0f),    // top-p over a flat distribution (most of the vocabulary)
      mix_row(1.2f, 40, 0.95f, 0.02f),  // all three
      mix_row(0.8f, -1, 1.0f, 0.05f),   // min-p
      mix_row(1.0f, 1, 0.5f, 0.0f),     // top_k = 1: greedy
      mix_row(1.0f, 1000, 0.8f, 0.0f),  // top-k then top-p
      mix_row(1.5f, -1, 0.99f, 0.0f),   // top-p near 1
      mix_row(0.6f, 20, 0.5f, 0.1f),   mix_row(0.3f, 100000, 0.7f, 0.0f),
  };
  const int n_mixes = static_cast<int>(std::size(mixes));
  const int n_steps = 12;
  int n_greedy = 0, n_drawn = 0, n_near = 0, n_near_differ = 0, n_no_token = 0, n_loose = 0;
  double gpu_ms = 0.0;
  for (int step = 0; step < n_steps; ++step) {
    std::vector<SampleRow> rows(static_cast<size_t>(r_count));
    for (int64_t r = 0; r < r_count; ++r) {
      rows[r] = mixes[(r + step) % n_mixes];
      rows[r].seed = 1000 + static_cast<uint64_t>(r);
      rows[r].step = static_cast<uint64_t>(step);
    }
    gpu_->sync();
    const auto t0 = std::chrono::steady_clock::now();
    gpu_->sample(logits, rows, ids);
    gpu_->sync();
    gpu_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const std::vector<int32_t> got = gpu_read_i32(ids);
    for (int64_t r = 0; r < r_count; ++r) {
      SampleTrace trace;
      const std::span<const float> row(host.data() + r * v, static_cast<size_t>(v));
      const int32_t want = sample_reference(row, rows[r], &trace);
      const SampleRow& p = rows[r];
      n_no_token += want < 0;
      if (sample_row_greedy(p)) {
        ++n_greedy;
        ASSERT_EQ(got[r], want) << "greedy row " << r << " step " << step;
        continue;
      }
      ++n_drawn;
      const bool near = trace.draw_margin < kNearBoundary || trace.top_p_margin < kNearBoundary;
      n_near += near;
      n_loose += trace.draw_margin < kLooseBoundary || trace.top_p_margin < kLooseBoundary;
      if (near) {
        n_near_differ += got[r] != want;
        continue;
      }
      EXPECT_EQ(got[r], want) << "row " << r << " step " << step << " (T " << p.temperature << ", top_k " << p.top_k
                              << ", top_p " << p.top_p << ", min_p " << p.min_p << "): u " << trace.u << ", kept "
                              << trace.n_kept << ", draw margin " << trace.draw_margin << ", top-p margin "
                              << trace.top_p_margin;
    }
  }
  std::printf(
      "[gpu_sample] %d greedy + %d drawn rows of V=%lld: %d within 1e-9 of a boundary (%d of them "
      "differ), %d within 1e-5; %d without a token; %.3f ms per call of %lld rows\n",
      n_greedy, n_drawn, static_cast<long long>(v), n_near, n_near_differ, n_loose, n_no_token, gpu_ms / n_steps,
      static_cast<long long>(r_count));
  EXPECT_GT(n_greedy, 0);
  EXPECT_GT(n_drawn, 0);
  EXPECT_LT(100 * n_near, n_drawn) << "more than 1% of the draws land within 1e-9 of a boundary";
}

// [R, V] logits whose row r fill(row, r, rng) writes: the frame of the row makers below.
template <class Fill>
std::vector<float> make_rows(int64_t r_count, int64_t v, uint32_t seed, Fill&& fill) {
  Rng rng(seed);
  std::vector<float> l(static_cast<size_t>(r_count * v));
  for (int64_t r = 0; r < r_count; ++r) fill(l.data() + r * v, r, rng);
  return l;
}

// Rows meant to stress the top-k candidate path: ties at the k-th logit (a block of equal values
// under a few distinct leaders), quantized rows (crowded buckets), a bucket too crowded for the
// candidate buffer, rows with fewer finite logits than k, NaN / -inf stretches, flat and peaked rows.
// Row r is of kind (r + first_kind) % 8.
std::vector<float> make_hard_rows(int64_t r_count, int64_t v, uint32_t seed, int first_kind = 0) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> pick(0, v - 1);
  return make_rows(r_count, v, seed, [&](float* row, int64_t r, Rng& rng) {
    const int64_t kind = r + first_kind;
    const float scale = 0.5f * static_cast<float>(1 << (kind % 4));
    for (int64_t i = 0; i < v; ++i) row[i] = nd(rng.gen()) * scale;
    switch (kind % 8) {
      case 0:  // 12 distinct leaders, then 80 ties at 9.0 (so k = 20 and 40 cut inside the ties)
        for (int64_t j = 0; j < 80; ++j) row[pick(rng.gen())] = 9.0f;
        for (int64_t j = 0; j < 12; ++j) row[(j * 7919 + r) % v] = 10.0f + static_cast<float>(j);
        break;
      case 1:  // quarter steps: buckets of thousands of equal values
        for (int64_t i = 0; i < v; ++i) row[i] = std::round(row[i] * 4.0f) / 4.0f;
        break;
      case 2:  // a bucket too full for the candidate buffer: 6000 ties just below 3 leaders
        for (int64_t j = 0; j < std::min<int64_t>(6000, v / 2); ++j) row[pick(rng.gen())] = 7.0f;
        for (int64_t j = 0; j < 3; ++j) row[(j * 104729 + r) % v] = 8.0f;
        break;
      case 3:  // only 10 finite logits (fewer than most k): the rest -inf or NaN
        for (int64_t i = 0; i < v; ++i) row[i] = i % 5 == 0 ? std::nanf("") : -kInf;
        for (int64_t j = 0; j < 10; ++j) row[(j * 31 + r) % v] = nd(rng.gen());
        break;
      case 4:  // NaN and -inf stretches
        for (int64_t i = v / 4; i < v / 2; ++i) row[i] = -kInf;
        for (int64_t i = 0; i < v; i += 13) row[i] = std::nanf("");
        break;
      case 5:  // one dominant token, and +inf-free large values
        row[(r * 7919) % v] = 40.0f;
        break;
      case 6:  // bf16-rounded (ties at bf16 resolution)
        for (int64_t i = 0; i < v; ++i) row[i] = bf16_to_f32(f32_to_bf16(row[i]));
        break;
      default:  // plain N(0, s²)
        break;
    }
  });
}

// The parameter mixes of the top-k tests: k = 1 (greedy), 2, 20, 40, 1000, 4096 (the candidate
// buffer's size), 4097 and off, with top-p 0.8 / 1, min-p, temperature near 0 and greedy rows.
const SampleRow kTopKMixes[] = {
    mix_row(0.0f, -1, 1.0f, 0.0f),   mix_row(0.7f, 20, 0.8f, 0.0f),   mix_row(1.0f, 1, 1.0f, 0.0f),
    mix_row(1.0f, 2, 1.0f, 0.0f),    mix_row(0.7f, 1000, 0.8f, 0.0f), mix_row(1.0f, 1000, 1.0f, 0.0f),
    mix_row(0.8f, 20, 1.0f, 0.1f),   mix_row(1.2f, 40, 0.95f, 0.02f), mix_row(1.0f, 4096, 0.9f, 0.0f),
    mix_row(1.0f, 4097, 0.9f, 0.0f), mix_row(0.7f, -1, 0.8f, 0.0f),   mix_row(1.0f, -1, 1.0f, 0.05f),
    mix_row(1e-30f, 20, 0.8f, 0.0f), mix_row(2.0f, 20, 0.5f, 0.0f),   mix_row(0.6f, 1000, 0.8f, 0.1f),
    mix_row(0.7f, 40, 1.0f, 0.0f),
};

struct Tally {
  int greedy = 0, drawn = 0, near = 0, near_differ = 0;
};

// got[r] must equal the reference's id for every row, except drawn rows whose reference draw or
// top-p threshold lies within kNearBoundary of a boundary (counted in the tally).
void expect_reference(const std::vector<float>& host, int64_t v, const std::vector<SampleRow>& rows,
                      const std::vector<int32_t>& got, const std::string& what, Tally* tally) {
  for (size_t r = 0; r < rows.size(); ++r) {
    SampleTrace trace;
    const std::span<const float> row(host.data() + static_cast<int64_t>(r) * v, static_cast<size_t>(v));
    const int32_t want = sample_reference(row, rows[r], &trace);
    const SampleRow& p = rows[r];
    if (sample_row_greedy(p)) {
      ++tally->greedy;
      ASSERT_EQ(got[r], want) << what << ": greedy row " << r;
      continue;
    }
    ++tally->drawn;
    if (trace.draw_margin < kNearBoundary || trace.top_p_margin < kNearBoundary) {
      ++tally->near;
      tally->near_differ += got[r] != want;
      continue;
    }
    EXPECT_EQ(got[r], want) << what << ": row " << r << " (T " << p.temperature << ", top_k " << p.top_k << ", top_p "
                            << p.top_p << ", min_p " << p.min_p << "): u " << trace.u << ", kept " << trace.n_kept
                            << ", draw margin " << trace.draw_margin << ", top-p margin " << trace.top_p_margin;
  }
}

TEST_F(GpuSample, TopKPathMatchesTheReferenceAtEveryBatch) {
  // Full vocabulary and a small one whose rows are not 16-byte aligned (the kernel's scalar head
  // and tail); batch 1, a ragged 5 and 64, several launches back to back with changing parameters.
  const int n_mixes = static_cast<int>(std::size(kTopKMixes));
  for (const int64_t v : {int64_t{151936}, int64_t{1001}}) {
    for (const int64_t r_count : {int64_t{1}, int64_t{5}, int64_t{64}}) {
      Tally tally;
      Tensor logits = gpu_tensor("logits", DType::F32, {r_count, v}, nullptr);
      Tensor ids = gpu_tensor("ids", DType::I32, {r_count}, nullptr);
      // Batch 1 meets every (row kind, mix) pair: step 8a + b has kind b and mix (9a + b) % 16.
      const int n_steps = r_count == 1 ? 8 * n_mixes : r_count == 64 ? 6 : 2 * n_mixes;
      for (int step = 0; step < n_steps; ++step) {
        // Fresh rows every step, the kinds shifting by one a step.
        const std::vector<float> host = make_hard_rows(r_count, v, static_cast<uint32_t>(77 + step), step % 8);
        const int shift = r_count == 1 ? step / 8 : 0;  // step + step / 8 = 9a + b
        const auto [rows, got] = sample_step(host, logits, ids, kTopKMixes, step, shift, 42);
        const std::string what =
            "V " + std::to_string(v) + ", batch " + std::to_string(r_count) + ", step " + std::to_string(step);
        expect_reference(host, v, rows, got, what, &tally);
      }
      std::printf("[gpu_sample] V=%lld batch %lld: %d greedy + %d drawn rows, %d near a boundary (%d differ)\n",
                  static_cast<long long>(v), static_cast<long long>(r_count), tally.greedy, tally.drawn, tally.near,
                  tally.near_differ);
      EXPECT_GT(tally.drawn, 0);
    }
  }
}

TEST_F(GpuSample, ARowsIdDependsOnlyOnItsOwnInputs) {
  // The same launch twice gives the same ids, and each row of a 64-row launch of mixed paths gives
  // the id it gets alone, boundary draws included: no timing and no other row leaks into a result.
  const int64_t r_count = 64, v = 151936;
  const int n_mixes = static_cast<int>(std::size(kTopKMixes));
  const std::vector<float> host = make_hard_rows(r_count, v, 9);
  Tensor logits = gpu_tensor("logits", DType::F32, {r_count, v}, &host);
  Tensor ids = gpu_tensor("ids", DType::I32, {r_count}, nullptr);
  std::vector<SampleRow> rows(static_cast<size_t>(r_count));
  for (int64_t r = 0; r < r_count; ++r) {
    rows[r] = kTopKMixes[(r * 5 + 1) % n_mixes];
    rows[r].seed = 7 + static_cast<uint64_t>(r);
    rows[r].step = 3;
  }
  gpu_->sample(logits, rows, ids);
  const std::vector<int32_t> first = gpu_read_i32(ids);
  gpu_->sample(logits, rows, ids);
  EXPECT_EQ(gpu_read_i32(ids), first);
  Tensor one_id = gpu_tensor("one_id", DType::I32, {1}, nullptr);
  for (int64_t r = 0; r < r_count; ++r) {
    const std::vector<float> row(host.begin() + r * v, host.begin() + (r + 1) * v);
    Tensor one = gpu_tensor("row", DType::F32, {1, v}, &row);
    gpu_->sample(one, {rows[r]}, one_id);
    EXPECT_EQ(gpu_read_i32(one_id)[0], first[r]) << "row " << r << " alone";
  }
}

TEST_F(GpuSample, EdgeRows) {
  // Small vocabularies, non-finite logits, all-greedy launches (no scratch), ties at the k-th logit.
  const int64_t v = 37;
  std::vector<float> host;
  std::vector<SampleRow> rows;
  auto add = [&](std::vector<float> l, SampleRow p) {
    l.resize(static_cast<size_t>(v), -kInf);
    host.insert(host.end(), l.begin(), l.end());
    rows.push_back(p);
  };
  const float nan = std::nanf("");
  add({-kInf, nan, -kInf}, mix_row(1.0f, -1, 1.0f, 0.0f));            // no token: -1
  add({-kInf, nan, -kInf}, mix_row(0.0f, -1, 1.0f, 0.0f));            // no token, greedy: -1
  add({nan, 1.0f, 3.0f, 3.0f}, mix_row(0.0f, -1, 1.0f, 0.0f));        // greedy tie: 2
  add({1.0f, kInf, 0.0f, kInf}, mix_row(1.0f, -1, 1.0f, 0.0f));       // +inf share the mass
  add({2.0f, 2.0f, 2.0f, 2.0f, 1.0f}, mix_row(1.0f, 2, 1.0f, 0.0f));  // ties at the k-th: ids 0, 1
  add({0.0f, -1.0f, -1.0f, -3.0f, -1.0f}, mix_row(1.0f, -1, 0.5f, 0.0f));
  add({0.0f, -0.0f, 0.0f}, mix_row(1.0f, 2, 1.0f, 0.0f));    // -0 == +0: ids 0, 1
  add({5.0f, 4.0f, 1.0f}, mix_row(1e-30f, -1, 1.0f, 0.0f));  // tiny temperature: 0
  const int64_t r_count = static_cast<int64_t>(rows.size());
  Tensor logits = gpu_tensor("logits", DType::F32, {r_count, v}, &host);
  Tensor ids = gpu_tensor("ids", DType::I32, {r_count}, nullptr);
  for (uint64_t step = 0; step < 200; ++step) {
    for (SampleRow& p : rows) {
      p.seed = 5;
      p.step = step;
    }
    gpu_->sample(logits, rows, ids);
    const std::vector<int32_t> got = gpu_read_i32(ids);
    for (int64_t r = 0; r < r_count; ++r) {
      const std::span<const float> row(host.data() + r * v, static_cast<size_t>(v));
      ASSERT_EQ(got[r], sample_reference(row, rows[r])) << "row " << r << " step " << step;
    }
  }
  // All rows greedy: the op needs no scratch.
  std::vector<SampleRow> greedy = rows;
  for (SampleRow& p : greedy) p.temperature = 0.0f;
  gpu_->sample(logits, greedy, ids);
  const std::vector<int32_t> got = gpu_read_i32(ids);
  for (int64_t r = 0; r < r_count; ++r) {
    const std::span<const float> row(host.data() + r * v, static_cast<size_t>(v));
    EXPECT_EQ(got[r], sample_reference(row, greedy[r])) << "greedy row " << r;
  }
  // Bad arguments throw on the host, before any launch.
  std::vector<SampleRow> bad = rows;
  bad[0].top_p = std::nanf("");
  EXPECT_THROW(gpu_->sample(logits, bad, ids), Error);
  bad.pop_back();
  EXPECT_THROW(gpu_->sample(logits, bad, ids), Error);
}

// Rows per path (cuda::sample_path_rows) finished since the last call.
class PathCounter {
 public:
  PathCounter() { read(last_); }
  std::array<unsigned long long, cuda::kSamplePaths> delta() {
    unsigned long long now[cuda::kSamplePaths];
    read(now);
    std::array<unsigned long long, cuda::kSamplePaths> d{};
    for (int i = 0; i < cuda::kSamplePaths; ++i) {
      d[i] = now[i] - last_[i];
      last_[i] = now[i];
    }
    return d;
  }

 private:
  static void read(unsigned long long (&v)[cuda::kSamplePaths]) { ASSERT_EQ(cuda::sample_path_rows(v), cudaSuccess); }
  unsigned long long last_[cuda::kSamplePaths] = {};
};

// Rows for top-p / min-p without top-k. Row r is of kind (r + first_kind) % 8:
// 0: peaked, as a trained model's: 40 leaders 20, 19.8, ... 12.2 (two of them tied) over 152K
//    N(0, 1) logits. At T <= 1 every top-p <= 0.999 and min-p nucleus lies among the leaders, so
//    these rows take the candidate path; at T 1.5 and top-p 0.999 the tail holds > 0.1% of the mass.
// 1: Zipf-like, bf16-rounded (ties): the logit of rank q is 18 - 2.2 ln(1 + q) + N(0, 0.2²), ranks
//    spread over the ids.
// 2: flat N(0, 1): nuclei of ~100K tokens, which must fall back to the general path.
// 3: kind 1 with a third of the row -inf and NaN every 997 ids.
// 4: only 10 finite logits (all of them candidates).
// 5: 3 leaders at 12 over 2000 ties at 11 (top-p cuts inside the ties: every one is kept).
// 6: flat bf16-rounded N(0, 2²).
// 7: 6000 ties at 7 under 3 leaders at 8: the tied bucket overflows the candidate buffer.
std::vector<float> make_nucleus_rows(int64_t r_count, int64_t v, uint32_t seed, int first_kind = 0) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int64_t> pick(0, v - 1);
  return make_rows(r_count, v, seed, [&](float* row, int64_t r, Rng& rng) {
    const int64_t kind = (r + first_kind) % 8;
    const float scale = kind == 6 ? 2.0f : 1.0f;
    for (int64_t i = 0; i < v; ++i) row[i] = nd(rng.gen()) * scale;
    auto zipf = [&] {
      const int64_t stride = 7919 % v == 0 ? 1 : 7919;  // coprime with the full vocabulary
      for (int64_t q = 0; q < v; ++q) {
        const float x = 18.0f - 2.2f * std::log(1.0f + static_cast<float>(q)) + 0.2f * nd(rng.gen());
        row[(q * stride + r) % v] = bf16_to_f32(f32_to_bf16(x));
      }
    };
    switch (kind) {
      case 0:
        for (int64_t j = 0; j < 40; ++j) row[(j * 104729 + r * 31) % v] = 20.0f - 0.2f * static_cast<float>(j);
        row[(r * 13 + 5) % v] = 20.0f - 0.2f * 5.0f;
        break;
      case 1:
        zipf();
        break;
      case 3:
        zipf();
        for (int64_t i = v / 3; i < 2 * v / 3; ++i) row[i] = -kInf;
        for (int64_t i = 0; i < v; i += 997) row[i] = std::nanf("");
        break;
      case 4:
        for (int64_t i = 0; i < v; ++i) row[i] = i % 5 == 0 ? std::nanf("") : -kInf;
        for (int64_t j = 0; j < 10; ++j) row[(j * 31 + r) % v] = nd(rng.gen());
        break;
      case 5:
        for (int64_t j = 0; j < std::min<int64_t>(2000, v / 4); ++j) row[pick(rng.gen())] = 11.0f;
        for (int64_t j = 0; j < 3; ++j) row[(j * 104729 + r) % v] = 12.0f;
        break;
      case 6:
        for (int64_t i = 0; i < v; ++i) row[i] = bf16_to_f32(f32_to_bf16(row[i]));
        break;
      case 7:
        for (int64_t j = 0; j < std::min<int64_t>(6000, v / 2); ++j) row[pick(rng.gen())] = 7.0f;
        for (int64_t j = 0; j < 3; ++j) row[(j * 104729 + r) % v] = 8.0f;
        break;
      default:  // 2: flat
        break;
    }
  });
}

// Top-k off with top-p 0.5 / 0.8 / 0.95 / 0.999 and min-p, at several temperatures, mixed with
// greedy rows, top-k rows and a plain-temperature row.
const SampleRow kNucleusMixes[] = {
    mix_row(0.7f, -1, 0.8f, 0.0f),   mix_row(0.7f, -1, 0.95f, 0.0f),  mix_row(1.0f, -1, 0.5f, 0.0f),
    mix_row(1.0f, -1, 0.999f, 0.0f), mix_row(0.8f, -1, 1.0f, 0.05f),  mix_row(1.2f, -1, 0.95f, 0.02f),
    mix_row(0.0f, -1, 0.9f, 0.0f),   mix_row(0.7f, 20, 0.8f, 0.0f),   mix_row(1.0f, -1, 0.9f, 0.1f),
    mix_row(0.6f, -1, 0.95f, 0.0f),  mix_row(1.5f, -1, 0.999f, 0.0f), mix_row(1.0f, 1000, 0.9f, 0.0f),
    mix_row(1e-30f, -1, 0.8f, 0.0f), mix_row(1.0f, -1, 1.0f, 0.0f),   mix_row(0.7f, -1, 0.999f, 0.3f),
    mix_row(0.7f, -1, 0.95f, 0.0f),
};

TEST_F(GpuSample, NucleusPathMatchesTheReferenceAtEveryBatch) {
  // Batch 1 meets every (row kind, mix) pair and checks which path each row took; batch 64 mixes
  // all paths in one launch. Full vocabulary and a small unaligned one.
  const int n_mixes = static_cast<int>(std::size(kNucleusMixes));
  constexpr int kCandCap = 4096;  // the kernel's candidate buffer
  for (const int64_t v : {int64_t{151936}, int64_t{1001}}) {
    for (const int64_t r_count : {int64_t{1}, int64_t{64}}) {
      Tally tally;
      std::array<unsigned long long, cuda::kSamplePaths> paths{};
      PathCounter counter;
      Tensor logits = gpu_tensor("logits", DType::F32, {r_count, v}, nullptr);
      Tensor ids = gpu_tensor("ids", DType::I32, {r_count}, nullptr);
      const int n_steps = r_count == 1 ? 8 * n_mixes : 6;
      for (int step = 0; step < n_steps; ++step) {
        const std::vector<float> host = make_nucleus_rows(r_count, v, static_cast<uint32_t>(300 + step), step % 8);
        const int shift = r_count == 1 ? step / 8 : 0;  // batch 1: step 8a + b has kind b, mix (9a + b) % 16
        const auto [rows, got] = sample_step(host, logits, ids, kNucleusMixes, step, shift, 91);
        const std::string what =
            "nucleus V " + std::to_string(v) + ", batch " + std::to_string(r_count) + ", step " + std::to_string(step);
        expect_reference(host, v, rows, got, what, &tally);
        const auto d = counter.delta();
        for (int i = 0; i < cuda::kSamplePaths; ++i) paths[i] += d[i];
        if (r_count != 1) continue;
        // Which path the row took: a nucleus of more than kCandCap tokens cannot be a candidate
        // one; the peaked rows (kind 0) at T <= 1 must take it; tiny rows always fit.
        const SampleRow& p = rows[0];
        SampleTrace trace;
        sample_reference(std::span<const float>(host.data(), static_cast<size_t>(v)), p, &trace);
        const bool nucleus_row = !sample_row_greedy(p) && p.top_k <= 0 && (p.top_p < 1.0f || p.min_p > 0.0f);
        const int kind = step % 8;
        if (trace.n_kept > kCandCap) {
          EXPECT_EQ(d[cuda::kSamplePaths - 1], 1u) << what << ": " << trace.n_kept << " kept tokens, kind " << kind;
        }
        if (nucleus_row && ((kind == 0 && p.temperature <= 1.0f) || v < kCandCap || kind == 4)) {
          EXPECT_EQ(d[2], 1u) << what << ": kind " << kind << " (T " << p.temperature << ", top_p " << p.top_p
                              << ", min_p " << p.min_p << ") should take the nucleus candidate path";
        }
      }
      std::printf(
          "[gpu_sample] nucleus rows V=%lld batch %lld: %d greedy + %d drawn rows, %d near a boundary (%d differ); "
          "paths: %llu greedy, %llu top-k, %llu nucleus, %llu general\n",
          static_cast<long long>(v), static_cast<long long>(r_count), tally.greedy, tally.drawn, tally.near,
          tally.near_differ, paths[0], paths[1], paths[2], paths[3]);
      EXPECT_GT(tally.drawn, 0);
      EXPECT_GT(paths[2], 0u);
      if (v > kCandCap) EXPECT_GT(paths[3], 0u);
    }
  }
}

}  // namespace
}  // namespace cpinfer::gputest
