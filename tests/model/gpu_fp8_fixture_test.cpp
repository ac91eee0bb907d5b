// The CUDA back-end on the FP8 fixture (tests/fixtures/moe_fp8): on Hopper its weights stay FP8 and
// prefill quantizes activations per (row, 128 columns) (W8A8, DeepSeek-V3's rule). The truth is
// transformers' fp32 forward of the dequantized weights; the fixture's FP8 reference is a W8A8
// forward by the same rule (transformers' own FP8 kernels when they could be loaded; on the offline
// GPU machine they cannot, and the fixture holds the plain-torch emulation of that rule, which
// reference.json says). Over every position of every prompt:
//  - nmse against the truth <= 2 x the reference's. On an H200 (2026-12-04) cpinfer measured
//    0.00308 against the emulation's 0.00197 (1.56x): on a random model (small top-2 gaps,
//    near-tied routers) two W8A8 forwards that round at different points scatter about each other,
//    and which one is the more faithful is not settled by these 431 positions. The bound catches a
//    broken FP8 path (wrong scales or blocks give nmse of order 1); "at least as faithful" is the
//    second test's, on ~6,400 positions;
//  - argmax agreement with the truth >= the reference's less 1.5% of the positions (measured: 406
//    against 410 of 431);
//  - greedy continuations (decode: the skinny FP8 kernels and row-wise FP8 experts) equal to the
//    truth's up to the first step whose fp32 top-2 gap is below 4x the largest logit error of the
//    reference at the prompts' last positions (at least 0.3): beyond a near-tie the two may
//    legitimately part.
// Skips, saying why, until the fixture has been generated, and without a usable GPU.
//
// The second test: at least as faithful to the fp32 truth as the W8A8 reference, over the fixture's
// prompts and fidelity.json's 36 more (tools/make_fp8_fidelity.py: 5,928 positions with the
// reference's error at each). Their truth is cpinfer's CPU forward of the fixture (fp32 activations,
// the FP8 weights dequantized exactly), checked at every position against the stored sum of squares,
// largest logit and argmax of transformers' fp32 truth. At least as faithful means all of: closer to
// the truth than the reference at half the positions or more; a median per-position squared error no
// larger than the reference's; nmse within 10% of the reference's (nmse is decided by the few
// positions where a near-tied router or top-2 gap flips: its top 1% of positions hold a third of it);
// argmax agreement no lower than the reference's less 0.5% of the positions. Measured (H100,
// 2026-12-06): closer at 0.5196 of 6,359 positions, median 1.870 against 1.895, nmse 1.046x the
// reference's, argmax 5,994 against 5,971.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "fp8_fixture.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

constexpr double kNmseAllowance = 2.0;

// Per position: the squared error over the vocabulary of the GPU forward and of the W8A8 reference
// against the truth, the truth's sum of squares, and argmax agreement with the truth.
struct PositionErrors {
  std::vector<double> ours, ref;
  double s = 0;
  size_t agree_ours = 0, agree_ref = 0;
  double nmse_ours() const { return std::accumulate(ours.begin(), ours.end(), 0.0) / s; }
  double nmse_ref() const { return std::accumulate(ref.begin(), ref.end(), 0.0) / s; }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : 0.5 * (v[v.size() / 2 - 1] + v[v.size() / 2]);
}

// The fixture's prompts through the GPU forward, against the stored truth and reference.
void add_fixture_prompts(Engine& gpu, const std::vector<Fp8RefPrompt>& refs, int64_t V, PositionErrors& e) {
  for (const Fp8RefPrompt& r : refs) {
    const std::vector<float> ours = all_logits(gpu, r.ref.ids);
    ASSERT_EQ(ours.size(), r.ref.ids.size() * size_t(V));
    for (size_t t = 0; t < r.ref.ids.size(); ++t) {
      const float* truth = r.logits_fp32.data() + t * V;
      const auto [d1, s1] = squared_error(ours.data() + t * V, truth, size_t(V));
      e.ours.push_back(d1);
      e.ref.push_back(squared_error(r.logits_fp8.data() + t * V, truth, size_t(V)).first);
      e.s += s1;
      e.agree_ours += argmax(std::span<const float>(ours.data() + t * V, V)) == r.ref.argmax_fp32[t];
      e.agree_ref += r.argmax_fp8[t] == r.ref.argmax_fp32[t];
    }
  }
}

}  // namespace

TEST(GpuFp8Fixture, WithinTwiceTheW8a8ReferenceError) {
  if (auto why = fp8_fixture_absent(); !why.empty()) GTEST_SKIP() << why;
  if (auto why = gpus_unavailable(1); !why.empty()) GTEST_SKIP() << why;
  EngineOptions eo;
  eo.device = "cuda";
  eo.quiet = true;
  eo.kv_cache_tokens = 1024;
  Engine gpu(fixture_dir(kFp8Fixture), eo);
  const int64_t V = gpu.config().vocab_size;
  const auto refs = load_fp8_reference(V);
  std::ifstream in(fixture_dir(kFp8Fixture) + "/reference.json");
  const nlohmann::json ref_json = nlohmann::json::parse(in);
  const std::string hf_impl = ref_json.at("reference_fp8").value("implementation", "?");

  PositionErrors e;
  add_fixture_prompts(gpu, refs, V, e);
  if (HasFatalFailure()) return;
  const size_t total = e.ours.size();
  const size_t agree_ours = e.agree_ours, agree_hf = e.agree_ref;
  double hf_last_err = 0;  // the reference's largest logit error at the prompts' last positions
  for (const Fp8RefPrompt& r : refs) {
    if (r.ref.ids.empty()) continue;
    const size_t last = (r.ref.ids.size() - 1) * size_t(V);
    for (int64_t v = 0; v < V; ++v)
      hf_last_err = std::max(hf_last_err, std::fabs(double(r.logits_fp8[last + v]) - r.logits_fp32[last + v]));
  }
  const double margin = std::max(0.3, 4 * hf_last_err);
  size_t greedy_checked = 0, greedy_equal = 0, hf_greedy_equal = 0;
  for (const Fp8RefPrompt& r : refs) {
    const RefPrompt& p = r.ref;
    const auto [g, gaps] = greedy_with_gaps(gpu, p.ids, static_cast<int>(p.greedy_fp32.size()));
    ASSERT_EQ(r.greedy_gap_fp32.size(), p.greedy_fp32.size());
    for (size_t i = 0; i < g.size() && r.greedy_gap_fp32[i] > margin; ++i, ++greedy_checked) {
      EXPECT_EQ(g[i], p.greedy_fp32[i]) << "greedy step " << i << " after the " << p.ids.size()
                                        << "-token prompt (fp32 top-2 gap " << r.greedy_gap_fp32[i] << ")";
      if (g[i] != p.greedy_fp32[i]) break;
    }
    greedy_equal += g == p.greedy_fp32;
    hf_greedy_equal += r.greedy_fp8 == p.greedy_fp32;
  }
  const double nmse_ours = e.nmse_ours(), nmse_hf = e.nmse_ref();
  std::printf(
      "[gpu %s] weights FP8 on the GPU: %s; against the fp32 truth over %zu positions: nmse %.3g (transformers' FP8 "
      "forward %.3g: %s), argmax agreement %zu (transformers' FP8 %zu); greedy equal to the truth on %zu/%zu "
      "prompts (transformers' FP8 %zu), %zu steps checked before a gap below %.3g\n",
      kFp8Fixture, gpu.model().backend().fp8_weights_supported() ? "yes" : "no (dequantized to BF16)", total, nmse_ours,
      nmse_hf, hf_impl.c_str(), agree_ours, agree_hf, greedy_equal, refs.size(), hf_greedy_equal, greedy_checked,
      margin);
  EXPECT_GT(nmse_hf, 0.0) << "the fixture's FP8 reference equals the truth: it was not made by an FP8 forward";
  EXPECT_LE(nmse_ours, kNmseAllowance * nmse_hf) << "far less faithful to the fp32 truth than the W8A8 reference";
  EXPECT_GE(double(agree_ours), double(agree_hf) - 0.015 * double(total));
}

TEST(GpuFp8Fixture, AtLeastAsFaithfulAsTheW8a8Reference) {
  if (auto why = fidelity_absent(); !why.empty()) GTEST_SKIP() << why;
  if (auto why = gpus_unavailable(1); !why.empty()) GTEST_SKIP() << why;
  EngineOptions eo;
  eo.quiet = true;
  eo.kv_cache_tokens = 1024;
  Engine cpu(fixture_dir(kFp8Fixture), eo);
  eo.device = "cuda";
  Engine gpu(fixture_dir(kFp8Fixture), eo);
  const int64_t V = gpu.config().vocab_size;
  PositionErrors e;  // the fixture's prompts: truth and reference as stored
  add_fixture_prompts(gpu, load_fp8_reference(V), V, e);
  if (HasFatalFailure()) return;
  // fidelity.json's prompts: the truth is the CPU forward, checked against the stored fingerprints.
  TruthCheck tc;
  for (const FidelityPrompt& p : load_fidelity()) {
    const std::vector<float> truth = all_logits(cpu, p.ids), ours = all_logits(gpu, p.ids);
    ASSERT_EQ(truth.size(), p.ids.size() * size_t(V));
    ASSERT_EQ(ours.size(), truth.size());
    check_truth(tc, p, truth, V);
    for (size_t t = 0; t < p.ids.size(); ++t) {
      e.ours.push_back(squared_error(ours.data() + t * V, truth.data() + t * V, size_t(V)).first);
      e.ref.push_back(p.ref_err[t]);
      e.s += p.truth_sq[t];
      e.agree_ours += argmax(std::span<const float>(ours.data() + t * V, V)) == p.truth_arg[t];
      e.agree_ref += p.ref_arg[t] == p.truth_arg[t];
    }
  }
  EXPECT_EQ(tc.off, 0u) << "the CPU forward is not the stored fp32 truth at " << tc.off << " of " << tc.positions
                        << " positions (worst: sum of squares " << tc.worst_sq << " relative, largest logit "
                        << tc.worst_max << ")";
  const size_t n = e.ours.size();
  size_t closer = 0;
  for (size_t i = 0; i < n; ++i) closer += e.ours[i] < e.ref[i];
  const double nmse_ours = e.nmse_ours(), nmse_ref = e.nmse_ref();
  const double med_ours = median(e.ours), med_ref = median(e.ref);
  const double frac = double(closer) / double(n);
  std::printf(
      "[gpu %s] against the fp32 truth over %zu positions (%zu on fidelity.json's prompts, whose truth is the CPU "
      "forward: off the stored fingerprints by at most %.2g relative in the sum of squares and %.2g in the largest "
      "logit): closer than the W8A8 reference at %.4f of the positions; median per-position squared error %.4g "
      "(reference %.4g); nmse %.5g (reference %.5g, ratio %.3f); argmax agreement %zu (reference %zu)\n",
      kFp8Fixture, n, tc.positions, tc.worst_sq, tc.worst_max, frac, med_ours, med_ref, nmse_ours, nmse_ref,
      nmse_ours / nmse_ref, e.agree_ours, e.agree_ref);
  EXPECT_GE(frac, 0.5) << "farther from the fp32 truth than the W8A8 reference at most positions";
  EXPECT_LE(med_ours, med_ref) << "median per-position error above the W8A8 reference's";
  EXPECT_LE(nmse_ours, 1.1 * nmse_ref) << "nmse more than 10% above the W8A8 reference's";
  EXPECT_GE(double(e.agree_ours), double(e.agree_ref) - 0.005 * double(n));
}
