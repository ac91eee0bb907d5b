// What the engine-loop tests of server_unit_test share: the fixture model, deterministic prompts,
// and rank 0's Scheduler over an EngineRunner on `cp` thread ranks, the other ranks replaying its
// steps (follow_steps), as `cpinfer serve` runs them.
#pragma once
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "engine/launch.h"
#include "engine/runner.h"
#include "model/decode_graph.h"

namespace cpinfer::server::test {

inline const std::string kModel = std::string(CPINFER_SOURCE_DIR) + "/tests/fixtures/moe_v4_gqa";
inline constexpr int kBlock = 16;  // KV page size of the engines below

// n token ids below 200 (the fixture's vocabulary), the same for the same seed.
inline std::vector<int32_t> ids(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = static_cast<int32_t>(rng() % 200);
  return v;
}

// Runs body(scheduler, runner) on rank 0 of `cp` thread ranks serving kModel (KV cache of kv_tokens
// positions, chunked prefill of `chunk` tokens, one decode token reserved per request, the prefix
// cache on or off), then shuts the other ranks' loops down. metrics: the scheduler's, or null.
// graphs: how decode steps run (model/decode_graph.h); graph_stats: rank 0's counters afterwards;
// kv_shard: each CP rank stores only its positions (--kv-shard; kv_tokens is then per rank).
// after: run on every rank with its engine once rank 0's loop has ended.
inline void with_scheduler(int cp, int kv_tokens, int chunk, bool radix, Metrics* metrics,
                           const std::function<void(Scheduler&, EngineRunner&)>& body,
                           DecodeGraphMode graphs = DecodeGraphMode::On, DecodeGraphs::Stats* graph_stats = nullptr,
                           bool kv_shard = false, const std::function<void(Engine&)>& after = {}) {
  LaunchOptions lo;
  lo.cp_size = cp;
  lo.timeout_s = 60;
  launch(lo, [&](ParallelCtx& par) {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = kv_tokens;
    eo.block_size = kBlock;
    eo.cp = CpOptions{cp, true, 8};
    eo.model.decode_graphs = graphs;
    eo.cp.kv_shard = kv_shard;
    Engine engine(kModel, eo, par);
    if (par.world_rank() != 0) {
      follow_steps(engine, *par.control);
      if (after) after(engine);
      return;
    }
    EngineRunner runner(engine, par.control);
    SchedulerOptions so;
    so.chunked_prefill_size = chunk;
    so.decode_reserve_tokens = 1;
    so.log_interval_s = 0;
    so.radix_cache = radix;
    Scheduler sched(runner, so, metrics);
    body(sched, runner);
    if (graph_stats) *graph_stats = engine.model().decode_graphs()->stats();
    runner.shutdown();
    if (after) after(engine);
  });
}

}  // namespace cpinfer::server::test
