// CPU back-end: sample (the reference of every back-end's sampler). Greedy and ties, determinism in
// (seed, step), exactly which ids each filter lets through, the drawn frequencies against the
// filtered distribution, non-finite logits, and agreement with a naive full-sort implementation.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <set>

#include "backends/cpu/cpu_backend.h"
#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

SampleRow make_row(float temperature, int top_k, float top_p, float min_p, uint64_t seed = 1, uint64_t step = 0) {
  SampleRow r;
  r.temperature = temperature;
  r.top_k = top_k;
  r.top_p = top_p;
  r.min_p = min_p;
  r.seed = seed;
  r.step = step;
  return r;
}

// The ids drawn over `steps` steps of one seed.
std::set<int32_t> drawn_ids(const std::vector<float>& l, SampleRow row, int steps) {
  std::set<int32_t> ids;
  for (int s = 0; s < steps; ++s) {
    row.step = static_cast<uint64_t>(s);
    ids.insert(sample_reference(l, row));
  }
  return ids;
}

// A naive implementation of the algorithm in ops/backend.h (full sorts, no shortcuts): the
// filtered, unnormalized distribution over all ids.
std::vector<double> naive_filtered(const std::vector<float>& logits, const SampleRow& row) {
  const size_t n = logits.size();
  std::vector<float> l(n);
  for (size_t i = 0; i < n; ++i) l[i] = std::isnan(logits[i]) ? -kInf : (logits[i] == 0.0f ? 0.0f : logits[i]);
  const float mx = *std::max_element(l.begin(), l.end());
  std::vector<float> e(n);
  for (size_t i = 0; i < n; ++i) {
    const float d = l[i] == mx ? 0.0f : (l[i] - mx) / row.temperature;
    e[i] = static_cast<float>(std::exp(static_cast<double>(d)));
  }
  std::vector<bool> kept(n, true);
  if (row.top_k > 0 && static_cast<size_t>(row.top_k) < n) {
    std::vector<size_t> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return l[a] > l[b]; });
    kept.assign(n, false);
    for (int k = 0; k < row.top_k; ++k) kept[order[k]] = true;
  }
  if (row.top_p < 1.0f) {
    double mass = 0.0;
    for (size_t i = 0; i < n; ++i)
      if (kept[i]) mass += e[i];
    std::vector<size_t> order;
    for (size_t i = 0; i < n; ++i)
      if (kept[i] && e[i] > 0.0f) order.push_back(i);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return e[a] > e[b]; });
    float tau = 0.0f;
    double cum = 0.0;
    for (size_t g = 0; g < order.size();) {
      size_t h = g;
      while (h < order.size() && e[order[h]] == e[order[g]]) cum += e[order[h++]];
      if (cum >= static_cast<double>(row.top_p) * mass) {
        tau = e[order[g]];
        break;
      }
      g = h;
    }
    for (size_t i = 0; i < n; ++i) kept[i] = kept[i] && e[i] >= tau;
  }
  std::vector<double> w(n, 0.0);
  for (size_t i = 0; i < n; ++i)
    if (kept[i] && (row.min_p <= 0.0f || e[i] >= row.min_p)) w[i] = e[i];
  return w;
}

int32_t naive_draw(const std::vector<float>& logits, const SampleRow& row) {
  const std::vector<double> w = naive_filtered(logits, row);
  double mass = 0.0;
  for (double x : w) mass += x;
  const double target = static_cast<double>(sample_uniform(row.seed, row.step)) * mass;
  double cum = 0.0;
  int32_t last = -1;
  for (size_t i = 0; i < w.size(); ++i) {
    if (w[i] == 0.0) continue;
    cum += w[i];
    last = static_cast<int32_t>(i);
    if (cum > target) return last;
  }
  return last;
}

TEST(CpuSample, UniformIsAPureFunctionOfSeedAndStep) {
  double sum = 0.0;
  std::set<float> distinct;
  for (uint64_t s = 0; s < 10000; ++s) {
    const float u = sample_uniform(99, s);
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    EXPECT_EQ(u, sample_uniform(99, s));
    EXPECT_EQ(u * 0x1p24f, std::floor(u * 0x1p24f)) << "not a 24-bit value";
    sum += u;
    distinct.insert(u);
  }
  EXPECT_NEAR(sum / 10000, 0.5, 0.01);
  EXPECT_GT(distinct.size(), 9990u);
  EXPECT_NE(sample_uniform(1, 0), sample_uniform(2, 0));
  EXPECT_NE(sample_uniform(1, 0), sample_uniform(1, 1));
}

TEST(CpuSample, GreedyIsTheArgmaxWithTiesToTheLowestId) {
  std::vector<float> l = {0.5f, 2.0f, -1.0f, 2.0f, 2.0f, std::nanf(""), 1.0f};
  EXPECT_EQ(sample_reference(l, make_row(0.0f, -1, 1.0f, 0.0f)), 1);
  EXPECT_EQ(sample_reference(l, make_row(-1.0f, 5, 0.5f, 0.5f)), 1);
  EXPECT_EQ(sample_reference(l, make_row(0.7f, 1, 1.0f, 0.0f)), 1) << "top_k = 1 is greedy";
  l[0] = kInf;  // +inf is the largest value, NaN is ignored (ranks as -inf)
  l[6] = kInf;
  EXPECT_EQ(sample_reference(l, make_row(0.0f, -1, 1.0f, 0.0f)), 0);
  std::vector<float> nan_first = {std::nanf(""), -3.0f, -2.0f, -2.0f};
  EXPECT_EQ(sample_reference(nan_first, make_row(0.0f, -1, 1.0f, 0.0f)), 2);
}

TEST(CpuSample, TopK1IsGreedyOnRandomRows) {
  std::mt19937 gen(5);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (int t = 0; t < 50; ++t) {
    std::vector<float> l(1000);
    for (float& x : l) x = std::round(nd(gen) * 4.0f) / 4.0f;  // many ties
    const int32_t want = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    for (uint64_t step = 0; step < 5; ++step)
      EXPECT_EQ(sample_reference(l, make_row(1.3f, 1, 0.9f, 0.1f, t, step)), want);
  }
}

TEST(CpuSample, DeterministicInSeedAndStep) {
  std::vector<float> l(300);
  for (size_t i = 0; i < l.size(); ++i) l[i] = std::cos(0.1f * i);
  const SampleRow row = make_row(1.0f, -1, 1.0f, 0.0f, 77);
  std::vector<int32_t> first, again, other_seed;
  for (uint64_t s = 0; s < 200; ++s) {
    SampleRow r = row;
    r.step = s;
    first.push_back(sample_reference(l, r));
  }
  for (uint64_t s = 200; s-- > 0;) {  // any order: each draw depends on (seed, step) only
    SampleRow r = row;
    r.step = s;
    again.push_back(sample_reference(l, r));
    r.seed = 78;
    other_seed.push_back(sample_reference(l, r));
  }
  std::reverse(again.begin(), again.end());
  std::reverse(other_seed.begin(), other_seed.end());
  EXPECT_EQ(first, again);
  EXPECT_NE(first, other_seed);
  EXPECT_GT(std::set<int32_t>(first.begin(), first.end()).size(), 50u) << "different steps must differ";
}

TEST(CpuSample, TopKKeepsTheKLargestWithTiesByLowestId) {
  // ranked: 1 (3.0), 2 (3.0), 4 (3.0), 3 (2.0), 0 (1.0), 5 (0.0)
  const std::vector<float> l = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f, 0.0f};
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, 2, 1.0f, 0.0f), 400), (std::set<int32_t>{1, 2}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, 3, 1.0f, 0.0f), 400), (std::set<int32_t>{1, 2, 4}));
  EXPECT_EQ(drawn_ids(l, make_row(5.0f, 4, 1.0f, 0.0f), 800), (std::set<int32_t>{1, 2, 3, 4}));
  EXPECT_EQ(drawn_ids(l, make_row(50.0f, 6, 1.0f, 0.0f), 800), (std::set<int32_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(drawn_ids(l, make_row(50.0f, 1000, 1.0f, 0.0f), 800), (std::set<int32_t>{0, 1, 2, 3, 4, 5}));
}

TEST(CpuSample, TopPKeepsEveryTokenTiedAtTheThreshold) {
  // e = 1, e^-1 (x3), e^-3: mass 2.154. The top token alone holds 0.464.
  const std::vector<float> l = {0.0f, -1.0f, -1.0f, -3.0f, -1.0f};
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 0.45f, 0.0f), 300), (std::set<int32_t>{0}));
  // 0.5 needs one more token; all three at e^-1 tie, so all three are kept.
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 0.5f, 0.0f), 600), (std::set<int32_t>{0, 1, 2, 4}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 0.97f, 0.0f), 600), (std::set<int32_t>{0, 1, 2, 4}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 0.99f, 0.0f), 3000), (std::set<int32_t>{0, 1, 2, 3, 4}));
  // After top-k = 2 (ids 0, 1) the mass is renormalized: 1 / 1.368 = 0.731 >= 0.7 -> id 0 only.
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, 2, 0.7f, 0.0f), 300), (std::set<int32_t>{0}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, 2, 0.75f, 0.0f), 600), (std::set<int32_t>{0, 1}));
}

TEST(CpuSample, MinPIsRelativeToTheTopToken) {
  const std::vector<float> l = {0.0f, -1.0f, -2.0f, -0.5f, -kInf};  // e: 1, .368, .135, .607, 0
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 1.0f, 0.3f), 800), (std::set<int32_t>{0, 1, 3}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 1.0f, 0.5f), 800), (std::set<int32_t>{0, 3}));
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 1.0f, 1.0f), 200), (std::set<int32_t>{0}));
  // Temperature 2 flattens: e = 1, .607, .368, .779 -> min_p 0.3 keeps 0..3.
  EXPECT_EQ(drawn_ids(l, make_row(2.0f, -1, 1.0f, 0.3f), 1500), (std::set<int32_t>{0, 1, 2, 3}));
}

TEST(CpuSample, FrequenciesFollowTheFilteredDistribution) {
  // 10 tokens; top-k 8 drops two, top-p 0.97 and min-p 0.04 each cut the tail; chi-square of 20000
  // draws against the expected distribution of the survivors, fixed seed (deterministic).
  const std::vector<float> l = {1.2f, -0.3f, 2.0f, 0.4f, -2.5f, 1.9f, 0.0f, -1.0f, 0.8f, -4.0f};
  const SampleRow row = make_row(0.8f, 8, 0.97f, 0.04f, 2024);
  const std::vector<double> w = naive_filtered(l, row);
  double mass = 0.0;
  for (double x : w) mass += x;
  std::map<int32_t, int> hist;
  const int n = 20000;
  for (int s = 0; s < n; ++s) {
    SampleRow r = row;
    r.step = static_cast<uint64_t>(s);
    hist[sample_reference(l, r)]++;
  }
  double chi2 = 0.0;
  int df = -1;
  for (size_t i = 0; i < l.size(); ++i) {
    if (w[i] == 0.0) {
      EXPECT_EQ(hist.count(static_cast<int32_t>(i)), 0u) << "filtered token " << i << " was drawn";
      continue;
    }
    const double expect = n * w[i] / mass;
    const double got = hist[static_cast<int32_t>(i)];
    chi2 += (got - expect) * (got - expect) / expect;
    ++df;
  }
  ASSERT_GE(df, 3) << "the filters should leave several tokens";
  // 99.9th percentile of chi-square: df 3..7 -> 16.3, 18.5, 20.5, 22.5, 24.3.
  const double crit[] = {0, 10.8, 13.8, 16.3, 18.5, 20.5, 22.5, 24.3};
  EXPECT_LT(chi2, crit[std::min(df, 7)]) << "df " << df;
  std::printf("[cpu_sample] chi2 = %.2f with %d degrees of freedom over %d draws\n", chi2, df, n);
}

TEST(CpuSample, NonFiniteLogits) {
  // -inf is never drawn; NaN counts as -inf; +inf takes all the mass (shared by the +inf ids).
  std::vector<float> l(50, -kInf);
  l[7] = 0.0f;
  l[20] = std::nanf("");
  l[33] = -0.5f;
  EXPECT_EQ(drawn_ids(l, make_row(3.0f, -1, 1.0f, 0.0f), 500), (std::set<int32_t>{7, 33}));
  EXPECT_EQ(drawn_ids(l, make_row(3.0f, 40, 1.0f, 0.0f), 500), (std::set<int32_t>{7, 33}));
  EXPECT_EQ(drawn_ids(l, make_row(3.0f, 40, 0.9999f, 0.0f), 500), (std::set<int32_t>{7, 33}));
  l[40] = kInf;
  l[45] = kInf;
  EXPECT_EQ(drawn_ids(l, make_row(1.0f, -1, 1.0f, 0.0f), 300), (std::set<int32_t>{40, 45}));
  // No logit above -inf: -1, greedy or not.
  std::vector<float> dead = {-kInf, std::nanf(""), -kInf};
  EXPECT_EQ(sample_reference(dead, make_row(1.0f, -1, 1.0f, 0.0f)), -1);
  EXPECT_EQ(sample_reference(dead, make_row(0.0f, -1, 1.0f, 0.0f)), -1);
  // A tiny temperature sends every other logit to -inf (no overflow, no NaN).
  std::vector<float> sharp = {1.0f, 3.0f, 2.999f};
  EXPECT_EQ(drawn_ids(sharp, make_row(1e-30f, -1, 1.0f, 0.0f), 100), (std::set<int32_t>{1}));
}

TEST(CpuSample, MatchesANaiveFullSortImplementation) {
  // Random rows large enough that top-p must grow its sorted prefix past the first 1024.
  std::mt19937 gen(11);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const SampleRow mixes[] = {
      make_row(1.0f, -1, 1.0f, 0.0f),    make_row(0.7f, 50, 1.0f, 0.0f),
      make_row(1.0f, -1, 0.9f, 0.0f),    make_row(1.5f, -1, 0.99f, 0.0f),
      make_row(1.0f, 3000, 0.95f, 0.0f), make_row(0.9f, 100, 0.8f, 0.05f),
      make_row(2.0f, -1, 1.0f, 0.01f),   make_row(1.0f, 5, 0.5f, 0.2f),
      make_row(1.0f, 4500, 0.9f, 0.0f),  // k above the small-k heap: the nth_element selection
  };
  int n_rows = 0;
  for (int t = 0; t < 6; ++t) {
    std::vector<float> l(5000);
    for (float& x : l) x = nd(gen) * (t % 2 ? 1.0f : 3.0f);
    if (t >= 4)
      for (float& x : l) x = std::round(x * 8.0f) / 8.0f;  // heavy ties
    for (const SampleRow& m : mixes)
      for (uint64_t step = 0; step < 8; ++step) {
        SampleRow r = m;
        r.seed = 1000 + t;
        r.step = step;
        EXPECT_EQ(sample_reference(l, r), naive_draw(l, r))
            << "row " << t << " step " << step << " top_k " << r.top_k << " top_p " << r.top_p << " min_p " << r.min_p;
        ++n_rows;
      }
  }
  EXPECT_EQ(n_rows, 6 * 9 * 8);
}

TEST(CpuSample, OpSamplesEveryRowAndChecksItsArguments) {
  auto be = make_cpu_backend();
  const int64_t r_count = 9, v = 700;
  HostTensor logits(DType::F32, {r_count, v});
  std::mt19937 gen(3);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (int64_t i = 0; i < r_count * v; ++i) logits.ptr<float>()[i] = nd(gen);
  std::vector<SampleRow> rows;
  for (int64_t r = 0; r < r_count; ++r)
    rows.push_back(make_row(r % 3 == 0 ? 0.0f : 0.9f, static_cast<int>(r * 7) - 1, r % 2 ? 0.9f : 1.0f,
                            r % 4 ? 0.0f : 0.05f, 42 + r, static_cast<uint64_t>(r * 3)));
  HostTensor ids(DType::I32, {r_count});
  be->sample(logits, rows, ids);
  for (int64_t r = 0; r < r_count; ++r) {
    std::span<const float> row(logits.ptr<float>() + r * v, static_cast<size_t>(v));
    EXPECT_EQ(ids.ptr<int32_t>()[r], sample_reference(row, rows[r])) << "row " << r;
  }
  std::vector<SampleRow> short_rows(rows.begin(), rows.end() - 1);
  EXPECT_THROW(be->sample(logits, short_rows, ids), Error);
  std::vector<SampleRow> bad = rows;
  bad[4].temperature = std::nanf("");
  EXPECT_THROW(be->sample(logits, bad, ids), Error);
  bad = rows;
  bad[2].top_p = 0.0f;
  EXPECT_THROW(be->sample(logits, bad, ids), Error);
  bad = rows;
  bad[1].min_p = 1.5f;
  EXPECT_THROW(be->sample(logits, bad, ids), Error);
  HostTensor wrong_ids(DType::I64, {r_count});
  EXPECT_THROW(be->sample(logits, rows, wrong_ids), Error);
}

}  // namespace
}  // namespace cpinfer::test
