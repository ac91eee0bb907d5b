// cpinfer bench prefill (bench decode is in bench_decode.cpp): time to first token of one long prompt per CP size and
// length, with the time spent in communication and per kind of op, tokens/s, and model FLOP utilisation.
//
// Each timed prefill is one request through the step loop that serve runs (engine/bench_loop.h:
// Scheduler over an EngineRunner, the other ranks following rank 0's steps): the whole prompt in
// one forward, then the first token drawn; timed from submission to that token.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <mutex>
#include <nlohmann/json.hpp>
#include <random>

#include "common.h"
#include "core/log.h"
#include "engine/bench_loop.h"

namespace cpinfer {

namespace {

struct BenchFlags {
  EngineFlags ef;
  std::string random_weights;
  std::string seqs = "4096";
  std::string cps = "1";
  int warmup = 1;
  int repeats = -1;  // -1: 3 on cuda, 1 on cpu
  bool json = false;
  bool profile = true;
  bool exposed_comm = true;
  int moe_chunks = 0;
  double peak_tflops = 0;  // 0: measured (cuda)
};

// FLOPs of one prefill of S tokens: projections + experts (or dense MLP) per token, causal
// attention (QK^T and PV over the causal half), the LM head for the last token.
double prefill_flops(const ModelConfig& c, int64_t S) {
  const double H = c.hidden_size, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads, D = c.head_dim;
  double linear = 0, attn = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    double per_tok = 2 * H * (Hq * D + 2 * Hkv * D) + 2 * Hq * D * H;
    if (c.is_moe_layer(l)) {
      per_tok += 2 * H * c.num_experts + c.num_experts_per_tok * 3 * 2 * H * double(c.moe_intermediate_size);
    } else {
      per_tok += 3 * 2 * H * double(c.intermediate_size);
    }
    linear += per_tok * double(S);
    attn += 4.0 * Hq * D * double(S) * double(S + 1) / 2.0;
  }
  return linear + attn + 2 * H * double(c.vocab_size);
}

struct Row {
  int seq = 0, cp = 0, tp = 1, ranks = 1;  // CP size, attention TP size, world size
  double ttft_s = 0, exposed_comm_s = -1, comm_s = 0, attn_s = 0, moe_s = 0, dense_s = 0, other_s = 0, flops = 0;
};

double measure_gemm_peak(Backend& be) {
  // bf16 activations × bf16 weights at 8192³, as the method asks: the ceiling MFU is measured against.
  const int64_t n = 8192;
  Buffer a(be, n * n * 2), w(be, n * n * 2), o(be, n * n * 2);
  std::vector<uint16_t> host(n * n);
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0, 1);
  for (auto& x : host) x = f32_to_bf16(d(rng));
  be.upload(a.data(), host.data(), host.size() * 2);
  be.upload(w.data(), host.data(), host.size() * 2);
  Tensor ta = a.tensor(DType::BF16, {n, n}), tw = w.tensor(DType::BF16, {n, n}), to = o.tensor(DType::BF16, {n, n});
  for (int i = 0; i < 3; ++i) be.linear(ta, tw, to);
  be.sync();
  std::vector<double> times;
  for (int i = 0; i < 10; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    be.linear(ta, tw, to);
    be.sync();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(times.begin(), times.end());
  return 2.0 * n * n * n / times[times.size() / 2] / 1e12;
}

int run_bench_prefill(BenchFlags& f) {
  CPI_CHECK(f.ef.model_path.empty() != f.random_weights.empty(),
            "give exactly one of --model-path and --random-weights");
  const auto seqs = parse_positive_list(f.seqs, "--seq");
  const auto cps = parse_positive_list(f.cps, "--attn-cp-size");
  const bool cuda = f.ef.device == "cuda";
  const int warmup = std::max(0, f.warmup);
  const int repeats = f.repeats > 0 ? f.repeats : (cuda ? 3 : 1);
  const int max_seq = *std::max_element(seqs.begin(), seqs.end());
  std::vector<Row> rows;
  ModelConfig cfg;
  double peak = f.peak_tflops;
  std::string device_name;
  std::mutex mu;

  for (int cp : cps) {
    EngineFlags ef = f.ef;
    ef.attn_cp_size = cp;
    ef.enable_prefill_cp = true;
    launch(ef.launch(), [&](ParallelCtx& par) {
      EngineOptions eo = ef.engine(max_seq + 16);
      eo.random_weights = f.random_weights;
      eo.quiet = par.world_rank() != 0;
      Engine engine(f.ef.model_path, eo, par);
      engine.model().options().moe_chunks = f.moe_chunks;
      if (par.world_rank() == 0) {
        std::lock_guard<std::mutex> lock(mu);
        cfg = engine.config();
        device_name = engine.model().backend().name();
        if (cuda && peak == 0) peak = measure_gemm_peak(engine.model().backend());
      }
      for (int S : seqs) {
        std::mt19937 rng(S);
        std::vector<int32_t> ids(S);
        for (auto& t : ids) t = static_cast<int32_t>(rng() % engine.config().vocab_size);
        // Rank 0's time from submission to the first token (the other ranks follow its steps).
        auto once = [&](bool profile) {
          engine.model().options().profiling = profile;
          if (par.control) par.control->barrier();
          return time_prefill(engine, ids).ttft_s;
        };
        for (int i = 0; i < warmup; ++i) once(false);
        std::vector<double> times;
        // On the CPU profiling costs nothing (no device to synchronize), so every run is profiled.
        for (int i = 0; i < repeats; ++i) times.push_back(once(!cuda && f.profile));
        std::sort(times.begin(), times.end());
        ForwardProfile prof;  // zeros with --no-profile
        if (!cuda && f.profile) prof = engine.model().last_profile();
        // Exposed communication: the same forward with every collective skipped (wrong results,
        // same kernels) is this much faster.
        double elided = -1;
        if (par.world_size() > 1 && f.exposed_comm) {
          engine.model().options().elide_comm = true;
          std::vector<double> t2;
          for (int i = 0; i < repeats; ++i) t2.push_back(once(false));
          engine.model().options().elide_comm = false;
          std::sort(t2.begin(), t2.end());
          elided = t2[t2.size() / 2];
        }
        if (cuda && f.profile) {
          once(true);
          prof = engine.model().last_profile();
        }
        if (par.world_rank() == 0) {
          Row r;
          r.seq = S;
          r.cp = cp;
          r.tp = par.attn_tp_size();
          r.ranks = par.world_size();
          r.ttft_s = times[times.size() / 2];
          if (elided >= 0) r.exposed_comm_s = std::max(0.0, r.ttft_s - elided);
          r.comm_s = prof.comm_s;
          r.attn_s = prof.attention_s;
          r.moe_s = prof.moe_s;
          r.dense_s = prof.dense_gemm_s;
          r.other_s = prof.other_s;
          r.flops = prefill_flops(engine.config(), S);
          std::lock_guard<std::mutex> lock(mu);
          rows.push_back(r);
        }
      }
    });
  }

  if (rows.empty()) return 0;  // not rank 0 (mpirun): rank 0 prints
  nlohmann::ordered_json j;
  j["model"] = f.random_weights.empty() ? f.ef.model_path : "random:" + f.random_weights;
  j["device"] = device_name;
  j["layers"] = cfg.num_hidden_layers;
  if (peak > 0) j["gemm_peak_tflops"] = peak;
  j["results"] = nlohmann::json::array();
  if (!f.json) {
    std::printf("model %s, device %s%s\n", j["model"].get<std::string>().c_str(), device_name.c_str(),
                peak > 0 ? (", bf16 GEMM peak " + std::to_string(int(peak)) + " TFLOP/s").c_str() : "");
    std::printf("%8s %4s %4s %10s %10s %8s %8s %9s %9s %9s %9s %9s %9s %7s\n", "seq", "cp", "tp", "ttft_s", "tok/s",
                "speedup", "eff", "exposed_s", "comm_s", "attn_s", "moe_s", "gemm_s", "other_s",
                peak > 0 ? "MFU" : "GFLOP/s");
  }
  for (const Row& r : rows) {
    double base = 0;
    for (const Row& b : rows)
      if (b.seq == r.seq && b.ranks == 1) base = b.ttft_s;
    double speedup = base > 0 ? base / r.ttft_s : 0;
    double eff = speedup / r.ranks;
    double rate = r.flops / r.ttft_s;
    double mfu = peak > 0 ? rate / (peak * 1e12 * r.ranks) : 0;
    nlohmann::ordered_json o = {{"seq", r.seq},
                                {"cp", r.cp},
                                {"attn_tp", r.tp},
                                {"ranks", r.ranks},
                                {"ttft_s", r.ttft_s},
                                {"tokens_per_s", r.seq / r.ttft_s},
                                {"speedup", speedup},
                                {"efficiency", eff},
                                {"exposed_comm_s", r.exposed_comm_s},
                                {"comm_s", r.comm_s},
                                {"attention_s", r.attn_s},
                                {"moe_s", r.moe_s},
                                {"dense_gemm_s", r.dense_s},
                                {"other_s", r.other_s},
                                {"flops", r.flops},
                                {"tflops_per_s", rate / 1e12}};
    if (peak > 0) o["mfu"] = mfu;
    j["results"].push_back(o);
    if (!f.json)
      std::printf("%8d %4d %4d %10.3f %10.0f %8.2f %8.2f %9s %9.3f %9.3f %9.3f %9.3f %9.3f %7.3g\n", r.seq, r.cp, r.tp,
                  r.ttft_s, r.seq / r.ttft_s, speedup, eff,
                  r.exposed_comm_s >= 0 ? std::to_string(r.exposed_comm_s).substr(0, 5).c_str() : "-", r.comm_s,
                  r.attn_s, r.moe_s, r.dense_s, r.other_s, peak > 0 ? mfu : rate / 1e9);
  }
  if (f.json) std::printf("%s\n", j.dump(2).c_str());
  return 0;
}

}  // namespace

Command add_bench_command(CLI::App& app) {
  auto f = std::make_shared<BenchFlags>();
  CLI::App* c = app.add_subcommand("bench", "Benchmarks");
  c->require_subcommand(1);
  CLI::App* p = c->add_subcommand("prefill",
                                  "Prefill time (TTFT: submission to first token through the serving step loop) of one "
                                  "prompt per CP size and length");
  f->ef.add_to(p, false);
  p->remove_option(p->get_option("--attn-cp-size"));
  p->remove_option(p->get_option("--enable-prefill-cp"));
  p->add_option("--random-weights", f->random_weights,
                "Random weights instead of a checkpoint: qwen3-30b-a3b, qwen3-30b-a3b-fp8 or a config.json path");
  p->add_option("--seq", f->seqs, "Prompt lengths, comma-separated")->capture_default_str();
  p->add_option("--attn-cp-size", f->cps,
                "CP sizes, comma-separated (each runs on that many ranks, or on --world-size / --tp-size ranks "
                "with attention TP over world / cp)")
      ->capture_default_str();
  p->add_option("--warmup", f->warmup, "Untimed runs first")->capture_default_str();
  p->add_option("--repeats", f->repeats, "Timed runs; the median is reported (default: 3 on cuda, 1 on cpu)");
  p->add_option("--peak-tflops", f->peak_tflops, "GEMM peak for MFU (default on cuda: measured, bf16 8192^3)");
  p->add_flag("!--no-profile", f->profile,
              "Skip the per-op breakdown (a separate run that synchronizes after every op group, so its "
              "comm_s is the communication time without overlap)");
  p->add_flag("!--no-exposed-comm", f->exposed_comm,
              "Skip measuring exposed communication (several ranks: TTFT minus the TTFT of the same forward with "
              "every collective skipped)");
  p->add_option("--moe-chunks", f->moe_chunks,
                "Chunks of the sharded-expert MoE pipeline (0: the default, which is 1: no pipelining)")
      ->check(CLI::Range(0, 64))
      ->capture_default_str();
  p->add_flag("--json", f->json, "Print JSON instead of the table");
  CommandFn decode = add_bench_decode_command(c);
  return {c, [f, p, decode] { return p->parsed() ? run_bench_prefill(*f) : decode(); }};
}

}  // namespace cpinfer
