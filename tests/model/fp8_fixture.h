// The transformers-made FP8 fixture (tests/fixtures/moe_fp8, made by tools/make_fp8_fixture.py on
// the GPU machine): its references and the all-position logits of reference_logits.safetensors.
#pragma once
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/dtype.h"
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

}  // namespace cpinfer::test
