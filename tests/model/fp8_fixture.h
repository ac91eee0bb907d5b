// The transformers-made FP8 fixture (tests/fixtures/moe_fp8, made by tools/make_fp8_fixture.py on
// the GPU machine): its references and the all-position logits of reference_logits.safetensors.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
#include "engine/engine.h"
#include "engine/sampler.h"
#include "fixtures.h"
#include "loader/safetensors.h"

namespace cpinfer::test {

inline const char* kFp8Fixture = "moe_fp8";

// Why the FP8 fixture tests must skip ("" once tests/fixtures/moe_fp8 exists; from then on they
// assert, and a fixture missing a file fails them).
inline std::string fp8_fixture_absent() {
  if (std::filesystem::exists(fixture_dir(kFp8Fixture))) return "";
  return fixture_dir(kFp8Fixture) +
         " is not generated yet: run `python3 tools/make_fp8_fixture.py --out tests/fixtures` on the GPU machine";
}

// One prompt's references: RefPrompt (fixtures.h) plus transformers' FP8 forward and both all-position
// logit matrices ([T, V], row-major).
struct Fp8RefPrompt {
  RefPrompt ref;
  std::vector<int32_t> argmax_fp8, greedy_fp8;
  std::vector<float> greedy_gap_fp32;
  std::vector<float> logits_fp32, logits_fp8;
};

inline std::vector<float> tensor_as_f32(const TensorInfo& t) {
  std::vector<float> v(t.nbytes / dtype_size(t.dtype));
  for (size_t i = 0; i < v.size(); ++i) {
    if (t.dtype == DType::F32) {
      std::memcpy(&v[i], static_cast<const char*>(t.data) + 4 * i, 4);
    } else {
      CPI_CHECK(t.dtype == DType::BF16, t.name, ": reference logits must be F32 or BF16");
      uint16_t h;
      std::memcpy(&h, static_cast<const char*>(t.data) + 2 * i, 2);
      v[i] = bf16_to_f32(h);
    }
  }
  return v;
}

inline std::vector<Fp8RefPrompt> load_fp8_reference(int64_t vocab) {
  const std::string dir = fixture_dir(kFp8Fixture);
  const std::vector<RefPrompt> base = load_reference(kFp8Fixture);
  CPI_CHECK(!base.empty(), dir, "/reference.json is missing or holds no prompts");
  std::ifstream in(dir + "/reference.json");
  const nlohmann::json j = nlohmann::json::parse(in);
  const Checkpoint logits = Checkpoint::open_file(dir + "/reference_logits.safetensors");
  std::vector<Fp8RefPrompt> out;
  for (size_t i = 0; i < base.size(); ++i) {
    const nlohmann::json& p = j.at("prompts").at(i);
    Fp8RefPrompt r;
    r.ref = base[i];
    r.argmax_fp8 = p.at("argmax_fp8").get<std::vector<int32_t>>();
    r.greedy_fp8 = p.at("greedy_fp8").get<std::vector<int32_t>>();
    r.greedy_gap_fp32 = p.at("greedy_gap_fp32").get<std::vector<float>>();
    const std::string n = std::to_string(r.ref.ids.size());
    r.logits_fp32 = tensor_as_f32(logits.get("fp32." + n));
    r.logits_fp8 = tensor_as_f32(logits.get("fp8." + n));
    const size_t want = r.ref.ids.size() * static_cast<size_t>(vocab);
    CPI_CHECK(r.logits_fp32.size() == want && r.logits_fp8.size() == want, "reference logits of the ", n,
              "-token prompt are not [", n, ", ", vocab, "]");
    out.push_back(std::move(r));
  }
  return out;
}

// Sum of squared differences and of squared references (nmse = first / second), over n values.
inline std::pair<double, double> squared_error(const float* got, const float* want, size_t n) {
  double d = 0, s = 0;
  for (size_t i = 0; i < n; ++i) {
    d += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    s += double(want[i]) * want[i];
  }
  return {d, s};
}

// Sum of squares over n values (squared_error's second, without the differences).
inline double sum_of_squares(const float* v, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += double(v[i]) * v[i];
  return s;
}

// fidelity.json (tools/make_fp8_fidelity.py): more prompts, and per position only the W8A8 reference's
// error against the fp32 truth and the truth's fingerprints (sum of squares, largest logit, top-2 gap,
// argmax), not the logits.
struct FidelityPrompt {
  std::vector<int32_t> ids;
  std::vector<double> truth_sq, truth_max, truth_gap, ref_err;
  std::vector<int> truth_arg, ref_arg;
};

// One prompt's logits at every position [T, V] (the sequence released after).
inline std::vector<float> all_logits(Engine& e, const std::vector<int32_t>& ids) {
  std::vector<int> seqs;
  auto l = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
  e.release(seqs[0]);
  return std::move(l[0]);
}

inline std::string fidelity_path() { return fixture_dir(kFp8Fixture) + "/fidelity.json"; }

// Why a test of fidelity.json must skip ("" once it exists).
inline std::string fidelity_absent() {
  if (auto why = fp8_fixture_absent(); !why.empty()) return why;
  if (std::filesystem::exists(fidelity_path())) return "";
  return fidelity_path() + " is not generated yet: run `python3 tools/make_fp8_fidelity.py` on the GPU machine";
}

inline std::vector<FidelityPrompt> load_fidelity() {
  std::ifstream in(fidelity_path());
  const nlohmann::json j = nlohmann::json::parse(in);
  std::vector<FidelityPrompt> out;
  for (const nlohmann::json& p : j.at("prompts")) {
    FidelityPrompt f;
    f.ids = p.at("ids").get<std::vector<int32_t>>();
    f.truth_sq = p.at("truth_sq").get<std::vector<double>>();
    f.truth_max = p.at("truth_max").get<std::vector<double>>();
    f.truth_gap = p.at("truth_gap").get<std::vector<double>>();
    f.truth_arg = p.at("truth_arg").get<std::vector<int>>();
    f.ref_err = p.at("ref_err").get<std::vector<double>>();
    f.ref_arg = p.at("ref_arg").get<std::vector<int>>();
    const size_t n = f.ids.size();
    CPI_CHECK(n > 0 && f.truth_sq.size() == n && f.truth_max.size() == n && f.truth_gap.size() == n &&
                  f.truth_arg.size() == n && f.ref_err.size() == n && f.ref_arg.size() == n,
              fidelity_path(), ": a prompt's per-position lists do not match its ids");
    out.push_back(std::move(f));
  }
  CPI_CHECK(!out.empty(), fidelity_path(), " holds no prompts");
  return out;
}

// How far all-position logits [T, V] are from the stored truth's fingerprints: positions off (sum of
// squares by more than 1e-5 relative, largest logit by more than 1e-4 (1 + |it|), or another argmax
// where the top-2 gap exceeds 1e-3), and the worst of the first two.
struct TruthCheck {
  size_t positions = 0, off = 0;
  double worst_sq = 0, worst_max = 0;
};

inline void check_truth(TruthCheck& c, const FidelityPrompt& p, const std::vector<float>& logits, int64_t vocab) {
  for (size_t t = 0; t < p.ids.size(); ++t) {
    const float* l = logits.data() + t * vocab;
    const double sq = sum_of_squares(l, size_t(vocab));
    const int arg = argmax(std::span<const float>(l, size_t(vocab)));
    const double rel_sq = std::fabs(sq - p.truth_sq[t]) / p.truth_sq[t];
    const double abs_max = std::fabs(double(l[arg]) - p.truth_max[t]);
    c.worst_sq = std::max(c.worst_sq, rel_sq);
    c.worst_max = std::max(c.worst_max, abs_max);
    c.off += rel_sq > 1e-5 || abs_max > 1e-4 * (1 + std::fabs(p.truth_max[t])) ||
             (p.truth_gap[t] > 1e-3 && arg != p.truth_arg[t]);
    ++c.positions;
  }
}

}  // namespace cpinfer::test
