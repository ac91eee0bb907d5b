// The transformers reference fixtures (tests/fixtures/<name>, made by tools/make_fixtures.py).
#pragma once
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace cpinfer::test {

// Why GPU tests must skip here ("" when `n_devices` CUDA devices, and NCCL for more than one, are
// usable).
inline std::string gpus_unavailable(int n_devices = 1) {
#ifndef CPINFER_HAVE_CUDA
  return "this build has no CUDA back-end";
#else
#ifndef CPINFER_HAVE_NCCL
  if (n_devices > 1) return "this build has no NCCL";
#endif
  try {
    make_backend("cuda", n_devices - 1);
    return "";
  } catch (const std::exception& e) {
    return "fewer than " + std::to_string(n_devices) + " usable CUDA devices: " + e.what();
  }
#endif
}

inline const std::vector<std::string>& fixture_names() {
  static const std::vector<std::string> names = {"moe_v4_gqa",  "moe_v5_yarn_mha", "moe_dense_mix_fused",
                                                 "dense_qwen3", "moe_trained",     "llama3_gqa"};
  return names;
}

inline std::string fixture_dir(const std::string& name) {
  return std::string(CPINFER_SOURCE_DIR) + "/tests/fixtures/" + name;
}

struct RefPrompt {
  std::vector<int32_t> ids, argmax_fp32, greedy_fp32, argmax_bf16, greedy_bf16;
  std::vector<float> last_logits_fp32;
  std::vector<float> top2_gap_fp32;  // fp32 top-1 minus top-2 logit at every position
};

inline std::vector<RefPrompt> load_reference(const std::string& name) {
  std::ifstream in(fixture_dir(name) + "/reference.json");
  if (!in) return {};
  nlohmann::json j = nlohmann::json::parse(in);
  std::vector<RefPrompt> out;
  for (const auto& p : j.at("prompts")) {
    RefPrompt r;
    r.ids = p.at("ids").get<std::vector<int32_t>>();
    r.argmax_fp32 = p.at("argmax_fp32").get<std::vector<int32_t>>();
    r.greedy_fp32 = p.at("greedy_fp32").get<std::vector<int32_t>>();
    r.last_logits_fp32 = p.at("last_logits_fp32").get<std::vector<float>>();
    if (p.contains("argmax_bf16")) r.argmax_bf16 = p.at("argmax_bf16").get<std::vector<int32_t>>();
    if (p.contains("greedy_bf16")) r.greedy_bf16 = p.at("greedy_bf16").get<std::vector<int32_t>>();
    if (p.contains("top2_gap_fp32")) r.top2_gap_fp32 = p.at("top2_gap_fp32").get<std::vector<float>>();
    out.push_back(std::move(r));
  }
  return out;
}

// max |a - b| / max |b|
inline double rel_max_err(const float* a, const float* b, size_t n) {
  double d = 0, m = 0;
  for (size_t i = 0; i < n; ++i) {
    d = std::max(d, std::abs(double(a[i]) - double(b[i])));
    m = std::max(m, std::abs(double(b[i])));
  }
  return m > 0 ? d / m : d;
}

// n token ids drawn uniformly from [0, vocab) by a seeded generator (the same ids everywhere).
inline std::vector<int32_t> random_ids(int n, int vocab, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng() % vocab);
  return v;
}

// Index of the largest of v[begin, begin + n), counted from begin.
inline int argmax_in(const std::vector<float>& v, size_t begin, size_t n) {
  return int(std::max_element(v.begin() + long(begin), v.begin() + long(begin + n)) - v.begin() - long(begin));
}

// Largest minus second-largest value of a row of logits.
inline float top2_gap(std::span<const float> row) {
  float a = -INFINITY, b = -INFINITY;
  for (float x : row) {
    if (x > a)
      b = a, a = x;
    else if (x > b)
      b = x;
  }
  return a - b;
}

// Greedy continuation of n tokens with the top-2 gap of every step.
inline std::pair<std::vector<int32_t>, std::vector<float>> greedy_with_gaps(Engine& e, const std::vector<int32_t>& ids,
                                                                            int n) {
  std::vector<int> seqs;
  auto logits = e.prefill({std::span<const int32_t>(ids)}, seqs);
  std::vector<int32_t> out;
  std::vector<float> gaps;
  for (int i = 0; i < n; ++i) {
    out.push_back(argmax(logits[0]));
    gaps.push_back(top2_gap(logits[0]));
    if (i + 1 < n) logits = e.decode({seqs[0]}, {out.back()});
  }
  e.release(seqs[0]);
  return {out, gaps};
}

// fn(weight, checkpoint name) for every linear weight of the loaded model (attention projections,
// dense MLP, each local expert), in the checkpoint's per-expert naming.
template <class Fn>
void for_each_linear_weight(const ModelWeights& w, Fn&& fn) {
  for (size_t l = 0; l < w.layers.size(); ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    fn(L.q_proj.weight, p + "self_attn.q_proj.weight");
    fn(L.k_proj.weight, p + "self_attn.k_proj.weight");
    fn(L.v_proj.weight, p + "self_attn.v_proj.weight");
    fn(L.o_proj.weight, p + "self_attn.o_proj.weight");
    if (!L.moe) {
      fn(L.mlp_gate.weight, p + "mlp.gate_proj.weight");
      fn(L.mlp_up.weight, p + "mlp.up_proj.weight");
      fn(L.mlp_down.weight, p + "mlp.down_proj.weight");
      continue;
    }
    for (int32_t e = 0; e < L.experts.count; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(L.experts.first + e) + ".";
      fn(L.experts.gate[e], x + "gate_proj.weight");
      fn(L.experts.up[e], x + "up_proj.weight");
      fn(L.experts.down[e], x + "down_proj.weight");
    }
  }
}

// n tokens drawn by the host Sampler from the engine's prefill and decode logits (the reference
// for generation that samples on the back-end).
inline std::vector<int32_t> host_sampled(Engine& e, const std::vector<int32_t>& prompt, const SamplingParams& sp,
                                         int n) {
  Sampler host(sp);
  std::vector<int> seqs;
  auto logits = e.prefill({std::span<const int32_t>(prompt)}, seqs);
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(host.sample(logits[0]));
    if (i + 1 < n) logits = e.decode({seqs[0]}, {out.back()});
  }
  e.release(seqs[0]);
  return out;
}

// Batched greedy decode: n_seqs prompts of different lengths (7, 12, 17, ... tokens) prefilled, then
// `steps` decode steps of all of them feeding each argmax back, then `steps` more with the last
// sequence released (a smaller batch). Returns the logits of every decode step, [step][seq][V].
inline std::vector<std::vector<std::vector<float>>> batched_greedy_decode(Engine& e, int n_seqs, int steps) {
  std::vector<int> seqs;
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(n_seqs));
  std::vector<std::span<const int32_t>> spans;
  for (int s = 0; s < n_seqs; ++s) {
    for (int i = 0; i < 7 + 5 * s; ++i) prompts[size_t(s)].push_back(int32_t((s * 31 + i * 7 + 3) % 200));
    spans.push_back(prompts[size_t(s)]);
  }
  auto logits = e.prefill(spans, seqs);
  std::vector<std::vector<std::vector<float>>> out;
  for (int step = 0; step < 2 * steps; ++step) {
    if (step == steps) {
      e.release(seqs.back());
      seqs.pop_back();
      logits.pop_back();
    }
    std::vector<int32_t> next;
    for (const auto& l : logits) next.push_back(argmax(l));
    logits = e.decode(seqs, next);
    out.push_back(logits);
  }
  for (int s : seqs) e.release(s);
  return out;
}

}  // namespace cpinfer::test
