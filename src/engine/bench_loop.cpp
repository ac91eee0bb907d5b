#include "engine/bench_loop.h"

#include <chrono>
#include <climits>
#include <memory>

#include "engine/runner.h"
#include "engine/scheduler.h"

namespace cpinfer {

namespace {
using Clock = std::chrono::steady_clock;
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

PrefillTiming time_prefill(Engine& engine, std::span<const int32_t> prompt) {
  auto r = std::make_shared<SchedRequest>();
  r->prompt.assign(prompt.begin(), prompt.end());
  r->max_tokens = 1;
  r->sampling.temperature = 0;
  r->sampling.seed = 0;
  PrefillTiming t;
  r->on_token = [&t, req = r.get()](int32_t token) {
    t.ttft_s = seconds(Clock::now() - req->arrival);  // run_one sets the arrival at submission
    t.token = token;
    return true;
  };
  engine.run_one(r);
  return t;
}

int64_t decode_bench_positions(int context, int warmup, int steps, int page_size) {
  const int64_t n = int64_t(context) + 1 + (int64_t(warmup) + steps + 1) + 1;
  return (n + page_size - 1) / page_size * page_size;
}

DecodeTiming time_decode(Engine& engine, std::span<const int32_t> first, int context, int warmup, int steps,
                         const SamplingParams& sampling) {
  const int batch = static_cast<int>(first.size());
  CPI_CHECK(batch >= 1 && context >= 0 && warmup >= 0 && steps >= 1, "time_decode: batch ", batch, ", context ",
            context, ", warmup ", warmup, ", steps ", steps);
  for (int32_t id : first)
    CPI_CHECK(id >= 0 && id < engine.config().vocab_size, "token id ", id, " outside the vocabulary [0, ",
              engine.config().vocab_size, ")");
  Communicator* control = engine.parallel().control;
  if (control && control->size() <= 1) control = nullptr;
  EngineRunner runner(engine, control);
  SchedulerOptions so;
  so.chunked_prefill_size = 0;  // no token budget: the first step takes every one-token prompt
  so.max_running_requests = batch;
  so.context_length = INT32_MAX;
  so.decode_reserve_tokens = INT32_MAX;  // every output counted at admission: all admitted, never preempted
  so.radix_cache = false;
  so.log_interval_s = 0;
  Scheduler sched(runner, so);
  // One more token than the steps: no request finishes (and frees its KV) inside a timed step.
  const int max_tokens = warmup + steps + 1;

  // Every rank decides from the same cache state (the others replayed rank 0's calls).
  DecodeTiming out;
  if (std::string why = sched.never_fits(context + 1, max_tokens); !why.empty())
    out.skipped = "one sequence (context " + std::to_string(context) + " + 1 token): " + why;
  else if (int64_t(batch) * decode_bench_positions(context, warmup, steps, runner.block_size()) >
           int64_t(runner.n_free_blocks()) * runner.block_size())
    out.skipped = kDecodeBatchDoesNotFit;
  if (!out.skipped.empty()) return out;
  engine.cache().clear();  // the synthetic contexts read pages nobody wrote: zeros, on every rank
  if (engine.rank() != 0) {
    follow_steps(engine, *control);
    return out;
  }

  std::vector<std::shared_ptr<SchedRequest>> reqs;
  out.tokens.resize(size_t(batch));
  for (int i = 0; i < batch; ++i) {
    auto r = std::make_shared<SchedRequest>();
    r->prompt = {first[size_t(i)]};
    r->synthetic_context = context;
    r->max_tokens = max_tokens;
    r->sampling = sampling;
    r->sampling.seed = uint64_t(i);
    r->on_token = [&out, i](int32_t token) {
      out.tokens[size_t(i)].push_back(token);
      return true;
    };
    reqs.push_back(std::move(r));
  }
  try {
    for (const auto& r : reqs) sched.submit(r);
    for (int k = 0; k < warmup + steps; ++k) {
      const auto t0 = Clock::now();
      const bool ran = sched.step();
      const double dt = seconds(Clock::now() - t0);
      CPI_CHECK(ran && sched.n_running() == batch && out.tokens.back().size() == size_t(k) + 1, "bench decode: step ",
                k, " ran ", sched.n_running(), " of ", batch, " sequences");
      if (k >= warmup) out.step_s.push_back(dt);
    }
    for (const auto& r : reqs) r->cancelled = true;
    sched.step();  // ends them ("abort") and frees their KV
  } catch (const std::exception& e) {
    sched.fail_all(e.what());
    runner.shutdown();
    throw;
  }
  runner.shutdown();
  return out;
}

}  // namespace cpinfer
