#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "core/check.h"
#include "engine/sampler.h"

using namespace cpinfer;

TEST(Sampler, GreedyTakesTheFirstMaximum) {
  std::vector<float> l = {0.1f, 3.0f, 3.0f, -1.0f};
  SamplingParams p;
  p.temperature = 0;
  Sampler s(p);
  EXPECT_EQ(s.sample(l), 1);
  EXPECT_EQ(argmax(l), 1);
}

TEST(Sampler, SameSeedSameTokens) {
  std::vector<float> l(50);
  for (int i = 0; i < 50; ++i) l[i] = float(i % 7) * 0.3f;
  SamplingParams p;
  p.temperature = 1.0f;
  p.seed = 42;
  Sampler a(p), b(p);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.sample(l), b.sample(l));
}

TEST(Sampler, TopKTopPMinPRestrictTheCandidates) {
  std::vector<float> l = {5.0f, 4.0f, 3.0f, 0.0f, -2.0f};
  SamplingParams p;
  p.seed = 1;
  p.top_k = 2;
  Sampler k(p);
  for (int i = 0; i < 500; ++i) EXPECT_LT(k.sample(l), 2);

  SamplingParams q;
  q.seed = 2;
  q.top_p = 0.5f;  // softmax: 0.66, 0.24, ... -> only token 0
  Sampler tp(q);
  for (int i = 0; i < 500; ++i) EXPECT_EQ(tp.sample(l), 0);

  SamplingParams m;
  m.seed = 3;
  m.min_p = 0.3f;  // p1/p0 = e^-1 = 0.37 kept, p2/p0 = e^-2 = 0.135 dropped
  Sampler mp(m);
  std::map<int, int> hist;
  for (int i = 0; i < 2000; ++i) hist[mp.sample(l)]++;
  EXPECT_GT(hist[0], 0);
  EXPECT_GT(hist[1], 0);
  EXPECT_EQ(hist.count(2), 0u);
}

TEST(Sampler, TemperatureFollowsTheDistribution) {
  std::vector<float> l = {0.0f, std::log(3.0f)};  // probabilities 1/4, 3/4
  SamplingParams p;
  p.seed = 7;
  Sampler s(p);
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.sample(l);
  EXPECT_NEAR(double(ones) / n, 0.75, 0.02);
}

TEST(Sampler, RejectsOutOfRangeParameters) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.top_p = 0;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.min_p = 1.5f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.top_k = -5;
  EXPECT_THROW(p.validate(), Error);
}

TEST(Sampler, EachDrawIsTheReferenceAtItsStep) {
  // The sampler is Backend::sample's algorithm keyed by (seed, step): draw i of a sampler equals the
  // reference at step i, whatever happened before, so batched (back-end) and host draws agree.
  std::vector<float> l(64);
  for (int i = 0; i < 64; ++i) l[i] = std::sin(0.37f * i) * 2.0f;
  SamplingParams p;
  p.seed = 1234;
  p.top_k = 20;
  p.top_p = 0.9f;
  p.min_p = 0.02f;
  p.temperature = 0.8f;
  Sampler s(p);
  EXPECT_EQ(s.seed(), 1234u);
  bool any_differ = false;
  int32_t first = -1;
  for (uint64_t step = 0; step < 50; ++step) {
    const SampleRow row = s.next_row();
    EXPECT_EQ(row.step, step);
    EXPECT_EQ(row.seed, 1234u);
    const int32_t want = sample_reference(l, row);
    const int32_t got = s.sample(l);
    EXPECT_EQ(got, want) << "step " << step;
    if (step == 0) first = got;
    any_differ |= got != first;
  }
  EXPECT_EQ(s.step(), 50u);
  EXPECT_TRUE(any_differ) << "50 draws over a spread distribution all gave the same token";
}

TEST(Sampler, UnseededSamplersDiffer) {
  SamplingParams p;
  Sampler a(p), b(p);
  EXPECT_NE(a.seed(), b.seed()) << "two samplers without a seed got the same random_device seed";
}

TEST(Sampler, NoUsableLogitIsAnError) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> l = {-inf, std::nanf(""), -inf};
  SamplingParams p;
  p.seed = 1;
  Sampler s(p);
  EXPECT_THROW(s.sample(l), Error);
  p.temperature = 0;
  Sampler g(p);
  EXPECT_THROW(g.sample(l), Error);
}
