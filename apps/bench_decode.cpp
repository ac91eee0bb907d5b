// cpinfer bench decode: per-step latency of batched decode at a given context length, tokens/s,
// the bytes a step must read (weights it touches + the KV of every sequence) and the bandwidth that
// makes, against the device's copy bandwidth measured in the same process.
//
// The steps are those of the serving step loop (engine/bench_loop.h: Scheduler over an
// EngineRunner, decode graphs replayed as serve replays them). The context is not prefilled: each
// sequence is a request admitted with a synthetic context (SchedRequest::synthetic_context: its
// KV pages reserved and counted as present), so the step reads real pages of the cache (their
// values are whatever the pool holds; the kernels' work does not depend on them). The first step
// feeds each request's one-token prompt at the context, every later one the token drawn before
// (greedily, on the device); each Scheduler::step is timed.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "common.h"
#include "core/log.h"
#include "engine/bench_loop.h"
#include "model/decode_graph.h"

namespace cpinfer {

namespace {

struct DecodeFlags {
  EngineFlags ef;
  std::string random_weights;
  std::string batches = "1,8,32,64,128,256";
  std::string contexts = "1024,32768";
  int warmup = 2;
  int steps = -1;        // -1: 20 on cuda, 3 on cpu
  double copy_gib = -1;  // -1: 1 on cuda, 0.25 on cpu
  bool json = false;
  SamplingParams sampling{.temperature = 0.0f, .seed = std::nullopt};  // every sequence's; greedy unless asked
};

// Bytes of weights one decode step of `batch` tokens reads. Every matrix outside the experts is read
// once; an MoE layer reads the experts its tokens route to, modeled as uniform routing (the expected
// number of distinct experts among batch draws of top_k: E * (1 - (1 - k/E)^batch)). Norm vectors
// are left out (kilobytes).
struct StepBytes {
  double weights = 0, experts = 0, kv = 0;
  double total() const { return weights + experts + kv; }
};

// lbytes: bytes per weight of the linear layers (attention projections, MLPs, experts): wbytes, or
// for FP8 weights kept FP8 one byte plus the F32 scale of its 128x128 block.
StepBytes step_bytes(const ModelConfig& c, int batch, int64_t context, double wbytes, double lbytes, double kvbytes) {
  const double H = c.hidden_size, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, D = c.head_dim;
  StepBytes b;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    b.weights += (H * (Hq * D + 2 * Hkv * D) + Hq * D * H) * lbytes;
    if (c.is_moe_layer(l)) {
      const double E = c.num_experts, k = c.num_experts_per_tok;
      const double touched = E * (1.0 - std::pow(1.0 - k / E, batch));
      b.weights += H * E * wbytes;  // router
      b.experts += touched * 3.0 * H * double(c.moe_intermediate_size) * lbytes;
    } else {
      b.weights += 3.0 * H * double(c.intermediate_size) * lbytes;
    }
    b.kv += double(batch) * double(context + 1) * 2.0 * Hkv * D * kvbytes;
  }
  b.weights += double(c.vocab_size) * H * wbytes;  // LM head (the embedding rows read are negligible)
  return b;
}

// Device-to-device copy bandwidth (bytes read + bytes written per second), median of 5.
double measure_copy_gbps(Backend& be, double gib) {
  const size_t n = size_t(gib * double(1ull << 30)) & ~size_t(4095);
  Buffer a(be, n), b(be, n);
  be.fill_zero(a.tensor(DType::U8, {int64_t(n)}));
  be.copy(b.data(), a.data(), n);
  be.sync();
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    be.copy(b.data(), a.data(), n);
    be.sync();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return 2.0 * double(n) / t[t.size() / 2] / 1e9;
}

struct Row {
  int batch = 0, context = 0;
  std::string skipped;  // why the pair did not run (time_decode); empty: it ran
  double step_s = 0, p90_s = 0;
  StepBytes bytes;
};

int run_bench_decode(DecodeFlags& f) {
  CPI_CHECK(f.ef.model_path.empty() != f.random_weights.empty(),
            "give exactly one of --model-path and --random-weights");
  f.sampling.validate();
  const auto batches = parse_positive_list(f.batches, "--batch");
  const auto contexts = parse_positive_list(f.contexts, "--context");
  const bool cuda = f.ef.device == "cuda";
  const int warmup = std::max(0, f.warmup);
  const int steps = f.steps > 0 ? f.steps : (cuda ? 20 : 3);
  const double copy_gib = f.copy_gib > 0 ? f.copy_gib : (cuda ? 1.0 : 0.25);
  int64_t need = 0;  // the KV cache by default: the largest pair, as the loop's admission counts it
  for (int B : batches)
    for (int C : contexts)
      need = std::max<int64_t>(need, int64_t(B) * decode_bench_positions(C, warmup, steps, f.ef.block_size));
  CPI_CHECK(f.ef.kv_cache_tokens > 0 || need <= (int64_t(1) << 30), "--batch x --context needs ", need,
            " KV positions; give --kv-cache-tokens (pairs that do not fit it are skipped)");

  EngineFlags ef = f.ef;
  ef.attn_cp_size = 1;
  std::vector<Row> rows;
  ModelConfig cfg;
  std::string device_name;
  double copy_gbps = 0;
  int cache_tokens = 0;
  DecodeGraphs::Stats graph_stats;
  bool fp8_kept = false;  // the linear layers' weights are FP8 on the device (1 byte per weight)
  launch(ef.launch(), [&](ParallelCtx& par) {
    CPI_CHECK(par.world_size() == 1, "bench decode runs on one rank (world size ", par.world_size(), ")");
    EngineOptions eo = ef.engine(int(need));
    eo.random_weights = f.random_weights;
    Engine engine(f.ef.model_path, eo, par);
    cfg = engine.config();
    Backend& be = engine.model().backend();
    device_name = be.name();
    copy_gbps = measure_copy_gbps(be, copy_gib);
    KvCache& kv = engine.cache();
    cache_tokens = kv.n_blocks() * kv.block_size();
    const double kvbytes = dtype_size(kv.shape().dtype);
    const double wbytes = cfg.dtype == "float32" && f.random_weights.empty() ? 4.0 : 2.0;
    fp8_kept = cfg.quant.fp8 && be.fp8_weights_supported();
    const double lbytes = fp8_kept ? 1.0 + 4.0 / (128.0 * 128.0) : wbytes;
    std::mt19937 rng(1);
    for (int C : contexts) {
      for (int B : batches) {
        Row r;
        r.batch = B;
        r.context = C;
        r.bytes = step_bytes(cfg, B, C, wbytes, lbytes, kvbytes);
        std::vector<int32_t> tok(B);
        for (auto& t : tok) t = int32_t(rng() % uint64_t(cfg.vocab_size));
        DecodeTiming t = time_decode(engine, tok, C, warmup, steps, f.sampling);
        r.skipped = t.skipped;
        if (r.skipped.empty()) {
          std::vector<double>& times = t.step_s;
          std::sort(times.begin(), times.end());
          r.step_s = times[times.size() / 2];
          r.p90_s = times[std::min(times.size() - 1, size_t(std::ceil(0.9 * double(times.size()))) - 1)];
        }
        rows.push_back(r);
      }
    }
    if (const DecodeGraphs* g = engine.model().decode_graphs()) graph_stats = g->stats();
  });

  nlohmann::ordered_json j;
  j["model"] = f.random_weights.empty() ? f.ef.model_path : "random:" + f.random_weights;
  j["device"] = device_name;
  j["layers"] = cfg.num_hidden_layers;
  j["kv_cache_tokens"] = cache_tokens;
  j["copy_gbps"] = copy_gbps;
  j["cuda_graph"] = !f.ef.disable_cuda_graph && graph_stats.replays > 0;
  j["graphs_recorded"] = graph_stats.captures;
  j["steps_replayed"] = graph_stats.replays;
  j["pdl"] = f.ef.backend.pdl && f.ef.device == "cuda";
  j["linear_weights"] = fp8_kept ? "fp8 (1 byte per weight + F32 block scales)" : "as stored";
  j["expert_bytes_model"] = "uniform routing: E * (1 - (1 - k/E)^batch) distinct experts per MoE layer";
  const SamplingParams& sp = f.sampling;
  j["sampling"] = {{"temperature", sp.temperature}, {"top_k", sp.top_k}, {"top_p", sp.top_p}, {"min_p", sp.min_p}};
  j["results"] = nlohmann::json::array();
  if (!f.json) {
    std::printf("model %s, device %s, copy bandwidth %.0f GB/s (read + write), KV cache %d positions%s\n",
                j["model"].get<std::string>().c_str(), device_name.c_str(), copy_gbps, cache_tokens,
                fp8_kept ? ", linear weights FP8" : "");
    if (sp.greedy())
      std::printf("sampling: greedy\n");
    else
      std::printf("sampling: temperature %g, top-k %d, top-p %g, min-p %g\n", sp.temperature, sp.top_k, sp.top_p,
                  sp.min_p);
    std::printf("decode graphs: %lld recorded, %lld steps replayed (warm-up included)%s%s\n",
                static_cast<long long>(graph_stats.captures), static_cast<long long>(graph_stats.replays),
                f.ef.disable_cuda_graph ? ", --disable-cuda-graph" : "",
                f.ef.device == "cuda" && !f.ef.backend.pdl ? ", --disable-pdl" : "");
    std::printf("%6s %8s %10s %10s %11s %9s %9s %9s %8s %7s\n", "batch", "context", "step_ms", "p90_ms", "tok/s",
                "weight_MB", "expert_MB", "kv_MB", "GB/s", "%copy");
  }
  for (const Row& r : rows) {
    nlohmann::ordered_json o = {{"batch", r.batch}, {"context", r.context}};
    if (!r.skipped.empty()) {
      o["skipped"] = r.skipped;
      if (!f.json && r.skipped == kDecodeBatchDoesNotFit)
        std::printf("%6d %8d  skipped: KV does not fit the cache\n", r.batch, r.context);
      else if (!f.json)
        std::printf("%6d %8d  skipped: %s\n", r.batch, r.context, r.skipped.c_str());
      j["results"].push_back(o);
      continue;
    }
    const double gbps = r.bytes.total() / r.step_s / 1e9;
    o["step_s"] = r.step_s;
    o["p90_step_s"] = r.p90_s;
    o["tokens_per_s"] = r.batch / r.step_s;
    o["weight_bytes"] = r.bytes.weights;
    o["expert_bytes"] = r.bytes.experts;
    o["kv_bytes"] = r.bytes.kv;
    o["achieved_gbps"] = gbps;
    o["share_of_copy_bandwidth"] = gbps / copy_gbps;
    j["results"].push_back(o);
    if (!f.json)
      std::printf("%6d %8d %10.3f %10.3f %11.1f %9.0f %9.0f %9.0f %8.0f %6.1f%%\n", r.batch, r.context, r.step_s * 1e3,
                  r.p90_s * 1e3, r.batch / r.step_s, r.bytes.weights / 1e6, r.bytes.experts / 1e6, r.bytes.kv / 1e6,
                  gbps, 100.0 * gbps / copy_gbps);
  }
  if (f.json) std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

}  // namespace

CommandFn add_bench_decode_command(CLI::App* bench) {
  auto f = std::make_shared<DecodeFlags>();
  CLI::App* d = bench->add_subcommand(
      "decode",
      "Batched decode through the serving step loop: step latency, tokens/s, bytes read per step and bandwidth per "
      "batch and context (the context is reserved in the KV cache, not prefilled)");
  f->ef.add_to(d, false);
  for (const char* o : {"--attn-cp-size", "--enable-prefill-cp", "--cp-min-tokens", "--world-size", "--tp-size",
                        "--ep-size", "--comm", "--comm-timeout"})
    d->remove_option(d->get_option(o));
  d->add_option("--random-weights", f->random_weights,
                "Random weights instead of a checkpoint: qwen3-30b-a3b, qwen3-30b-a3b-fp8 or a config.json path");
  d->add_option("--batch", f->batches, "Batch sizes (sequences per step), comma-separated")->capture_default_str();
  d->add_option(
       "--context", f->contexts,
       "Context lengths (positions counted in the KV cache before the first step, not prefilled), comma-separated")
      ->capture_default_str();
  d->add_option("--warmup", f->warmup, "Untimed steps first")->capture_default_str();
  d->add_option("--steps", f->steps, "Timed steps; the median is reported (default: 20 on cuda, 3 on cpu)");
  d->add_option("--copy-gib", f->copy_gib,
                "Size of the device copy that measures the bandwidth (default: 1 on cuda, 0.25 on cpu)");
  d->add_option("--temperature", f->sampling.temperature,
                "Sampling temperature of every sequence (0: greedy argmax, the default)")
      ->capture_default_str();
  d->add_option("--top-k", f->sampling.top_k, "Top-k sampling (-1: off)")->capture_default_str();
  d->add_option("--top-p", f->sampling.top_p, "Top-p (nucleus) sampling (1: off)")->capture_default_str();
  d->add_option("--min-p", f->sampling.min_p, "Min-p sampling (0: off)")->capture_default_str();
  d->add_flag("--json", f->json, "Print JSON instead of the table");
  return [f] { return run_bench_decode(*f); };
}

}  // namespace cpinfer
