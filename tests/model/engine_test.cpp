// Engine behaviour on a fixture: EOS ids from generation_config.json stop generation (unless
// ignored), decode reuses the cache (prefill + decode equals one longer prefill), capacity errors,
// decode steps padded as a decode graph runs them.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "engine/engine.h"
#include "fixtures.h"
#include "model/decode_graph.h"

using namespace cpinfer;
using namespace cpinfer::test;
namespace fs = std::filesystem;

namespace {
EngineOptions opts() {
  EngineOptions eo;
  eo.quiet = true;
  eo.kv_cache_tokens = 512;
  return eo;
}
GenerateOptions greedy(int n, bool ignore_eos) {
  GenerateOptions g;
  g.max_new_tokens = n;
  g.ignore_eos = ignore_eos;
  g.sampling.temperature = 0;
  return g;
}
}  // namespace

TEST(Engine, EosFromGenerationConfigStopsGeneration) {
  const std::string src = fixture_dir("moe_v4_gqa");
  const fs::path dir = fs::temp_directory_path() / "cpinfer_eos_fixture";
  fs::remove_all(dir);
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(src)) fs::copy(e.path(), dir / e.path().filename());
  std::vector<int32_t> prompt = {5, 17, 99, 3, 250};
  std::vector<int32_t> free_run;
  {
    Engine e(dir.string(), opts());
    free_run = e.generate(prompt, greedy(8, true)).output_ids;
  }
  ASSERT_EQ(free_run.size(), 8u);
  // Declare the third greedy token the model's EOS: generation must stop right there.
  std::ofstream(dir / "generation_config.json") << "{\"eos_token_id\": [" << free_run[2] << "]}";
  Engine e(dir.string(), opts());
  auto stopped = e.generate(prompt, greedy(8, false));
  EXPECT_EQ(stopped.finish_reason, "stop");
  EXPECT_EQ(stopped.output_ids, std::vector<int32_t>(free_run.begin(), free_run.begin() + 3));
  auto ignored = e.generate(prompt, greedy(8, true));
  EXPECT_EQ(ignored.output_ids, free_run);
  EXPECT_EQ(ignored.finish_reason, "length");
  EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks()) << "generate must release its KV blocks";
  fs::remove_all(dir);
}

TEST(Engine, DecodeReusesTheCache) {
  Engine e(fixture_dir("moe_v5_yarn_mha"), opts());
  const int64_t V = e.config().vocab_size;
  std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13};
  std::vector<int> seqs;
  auto full = e.prefill({std::span<const int32_t>(ids)}, seqs, LogitsWanted::All);
  e.release(seqs[0]);
  // Prefill the first 10, then decode 3 tokens one at a time.
  std::vector<int32_t> head(ids.begin(), ids.begin() + 10);
  auto last = e.prefill({std::span<const int32_t>(head)}, seqs, LogitsWanted::Last);
  EXPECT_LE(rel_max_err(last[0].data(), full[0].data() + 9 * V, V), 1e-5);
  for (int t = 10; t < 13; ++t) {
    auto step = e.decode({seqs[0]}, {ids[t]});
    EXPECT_LE(rel_max_err(step[0].data(), full[0].data() + t * V, V), 1e-5) << "position " << t;
  }
  EXPECT_EQ(e.cache().length(seqs[0]), 13);
  e.release(seqs[0]);
}

// --kv-cache-dtype bf16: the cache holds BF16 (half the bytes of the CPU's fp32 cache); logits stay
// within BF16 rounding of the fp32 cache's, and decode still equals one longer prefill (both read the
// same rounded keys and values). An unknown dtype is refused before the weights load.
TEST(Engine, Bf16KvCacheHalvesTheCacheAndStaysClose) {
  EngineOptions b16 = opts();
  b16.kv_cache_dtype = "bf16";
  Engine f(fixture_dir("moe_v4_gqa"), opts()), b(fixture_dir("moe_v4_gqa"), b16);
  EXPECT_EQ(f.cache().shape().dtype, DType::F32);
  EXPECT_EQ(b.cache().shape().dtype, DType::BF16);
  EXPECT_EQ(2 * b.cache().shape().bytes(), f.cache().shape().bytes());
  const int64_t V = f.config().vocab_size;
  std::vector<int32_t> ids(40);
  for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 37 + 11) % 300);
  std::vector<int> sf, sb;
  auto full_f = f.prefill({std::span<const int32_t>(ids)}, sf, LogitsWanted::All);
  auto full_b = b.prefill({std::span<const int32_t>(ids)}, sb, LogitsWanted::All);
  b.release(sb[0]);
  double worst = 0;
  for (size_t t = 0; t < ids.size(); ++t)
    worst = std::max(worst, rel_max_err(full_b[0].data() + t * V, full_f[0].data() + t * V, V));
  EXPECT_GT(worst, 0.0) << "a BF16 cache that changes nothing: is it fp32 after all?";
  EXPECT_LE(worst, 1e-2);
  std::vector<int32_t> head(ids.begin(), ids.end() - 3);
  b.prefill({std::span<const int32_t>(head)}, sb, LogitsWanted::Last);
  for (size_t t = head.size(); t < ids.size(); ++t) {
    auto step = b.decode({sb[0]}, {ids[t]});
    EXPECT_LE(rel_max_err(step[0].data(), full_b[0].data() + t * V, V), 1e-5) << "position " << t;
  }
  EngineOptions bad = opts();
  bad.kv_cache_dtype = "fp8";
  EXPECT_THROW(Engine(fixture_dir("moe_v4_gqa"), bad), Error);
}

TEST(Engine, PromptsThatDoNotFitAreRefusedAndLoseNothing) {
  EngineOptions eo = opts();
  eo.kv_cache_tokens = 64;
  Engine e(fixture_dir("dense_qwen3"), eo);
  std::vector<int32_t> big(100, 3), empty;
  std::vector<int> seqs;
  EXPECT_THROW(e.prefill({std::span<const int32_t>(big)}, seqs), Error);
  EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks());
  EXPECT_THROW(e.prefill({std::span<const int32_t>(empty)}, seqs), Error);
  std::vector<int32_t> bad = {1, 2, 100000};
  EXPECT_THROW(e.prefill({std::span<const int32_t>(bad)}, seqs), Error);
  EXPECT_THROW(e.generate(std::vector<int32_t>(60, 1), greedy(10, true)), Error);
  // Still usable afterwards.
  EXPECT_EQ(e.generate(std::vector<int32_t>{1, 2, 3}, greedy(4, true)).output_ids.size(), 4u);
}

// generate draws on the back-end (Backend::sample); with a seed that must be exactly the host
// Sampler's draw from the same logits, step after step (temperature, top-k, top-p, min-p).
TEST(Engine, GenerateDrawsWhatTheHostSamplerDraws) {
  Engine e(fixture_dir("moe_v4_gqa"), opts());
  const std::vector<int32_t> prompt = {7, 8, 9, 10, 11, 200, 3};
  for (const SamplingParams& sp : {SamplingParams{1.0f, -1, 1.0f, 0.0f, 11}, SamplingParams{0.7f, 20, 0.9f, 0.0f, 12},
                                   SamplingParams{1.3f, -1, 1.0f, 0.05f, 13}}) {
    GenerateOptions g;
    g.max_new_tokens = 12;
    g.ignore_eos = true;
    g.sampling = sp;
    auto out = e.generate(prompt, g).output_ids;
    ASSERT_EQ(out.size(), 12u);
    EXPECT_EQ(out, host_sampled(e, prompt, sp, 12))
        << "temperature " << sp.temperature << " top_k " << sp.top_k << " top_p " << sp.top_p;
    std::set<int32_t> distinct(out.begin(), out.end());
    EXPECT_GT(distinct.size(), 1u) << "a sampled continuation that never varies: is the draw keyed by the step?";
  }
}

TEST(DecodeGraphs, BatchBucketsAndTableWidths) {
  const std::vector<std::pair<int, int>> buckets = {{1, 1},   {2, 2},   {3, 4},     {5, 8},     {9, 16},
                                                    {63, 64}, {65, 80}, {129, 160}, {256, 256}, {257, 320}};
  for (auto [n, b] : buckets) EXPECT_EQ(decode_graph_batch(n, 1024), b) << n;
  EXPECT_EQ(decode_graph_batch(100, 100), 100) << "the cap is a bucket of its own";
  EXPECT_EQ(decode_graph_batch(101, 100), 0);
  EXPECT_EQ(decode_graph_batch(0, 100), 0);
  EXPECT_EQ(decode_graph_width(1), 8);
  EXPECT_EQ(decode_graph_width(9), 16);
  EXPECT_EQ(decode_graph_width(64), 64);
}

// What a decode graph replays is the step padded to its bucket (DecodeGraphMode::Eager runs that
// without a graph, on any back-end): padding rows store no K/V and attend to no key, so the real
// rows' logits are those of the unpadded step, and later steps see an unchanged cache.
TEST(DecodeGraphs, PaddedStepsGiveTheUnpaddedLogits) {
  for (const char* name : {"moe_v4_gqa", "dense_qwen3"}) {
    EngineOptions off = opts(), padded = opts();
    off.model.decode_graphs = DecodeGraphMode::Off;
    padded.model.decode_graphs = DecodeGraphMode::Eager;
    Engine a(fixture_dir(name), off), b(fixture_dir(name), padded);
    const auto la = batched_greedy_decode(a, 3, 3), lb = batched_greedy_decode(b, 3, 3);
    ASSERT_EQ(la.size(), lb.size());
    for (size_t step = 0; step < la.size(); ++step) {
      ASSERT_EQ(la[step].size(), lb[step].size());
      for (size_t s = 0; s < la[step].size(); ++s)
        EXPECT_LE(rel_max_err(lb[step][s].data(), la[step][s].data(), la[step][s].size()), 1e-5)
            << name << " step " << step << " sequence " << s;
    }
    ASSERT_NE(b.model().decode_graphs(), nullptr);
    EXPECT_EQ(b.model().decode_graphs()->stats().padded_eager, 6) << "every decode step padded (3 to 4, then 2)";
    EXPECT_EQ(a.model().decode_graphs()->stats().padded_eager, 0);
    EXPECT_EQ(a.model().decode_graphs()->stats().captures + b.model().decode_graphs()->stats().captures, 0)
        << "the CPU back-end records no graphs";
  }
}
