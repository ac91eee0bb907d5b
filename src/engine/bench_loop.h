// The benchmarks' drivers of the step loop (cpinfer bench prefill and bench decode): the same
// Scheduler over an EngineRunner that serve, generate and logits run, with the multi-rank step
// protocol, timed where the benchmarks measure. Every rank calls them; the other ranks replay
// rank 0's steps (follow_steps) and get an empty timing.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"

namespace cpinfer {

struct PrefillTiming {
  double ttft_s = 0;   // from submission to the first token (rank 0)
  int32_t token = -1;  // the first token, drawn greedily (rank 0)
};
// One request of the prompt through the loop (Engine::run_one: the whole prompt in one forward,
// then the first token drawn). Throws what run_one throws (never_fits' reason when the prompt
// cannot fit).
PrefillTiming time_prefill(Engine& engine, std::span<const int32_t> prompt);

// The reason time_decode gives when the batch as a whole does not fit the free KV cache.
inline constexpr const char* kDecodeBatchDoesNotFit =
    "the KV of batch x (context + steps) does not fit the cache (--kv-cache-tokens)";

struct DecodeTiming {
  std::string skipped;                       // why nothing ran (empty: it ran)
  std::vector<double> step_s;                // each timed step, in order (rank 0)
  std::vector<std::vector<int32_t>> tokens;  // per sequence, every token drawn, warm-up included (rank 0)
};
// KV positions one sequence of time_decode counts at admission (the synthetic context, its first
// token, warmup + steps + 1 tokens to draw, one more), rounded up to whole pages.
int64_t decode_bench_positions(int context, int warmup, int steps, int page_size);
// B = first.size() sequences admitted at a synthetic context of `context` positions
// (SchedRequest::synthetic_context: reserved and counted as present, never prefilled), sequence i
// fed first[i]; then each Scheduler::step is one decode token of all B (drawn with `sampling`,
// greedy by default, sequence i seeded with i; the drawn tokens fed back, on the GPU path replayed
// from CUDA graphs as serving does). `warmup` untimed steps,
// then `steps` timed ones; afterwards the requests are cancelled and their KV freed. Skipped
// (nothing runs, on every rank) when never_fits() refuses one sequence or the B together exceed
// the free KV cache (kDecodeBatchDoesNotFit).
DecodeTiming time_decode(Engine& engine, std::span<const int32_t> first, int context, int warmup, int steps,
                         const SamplingParams& sampling = SamplingParams{.temperature = 0.0f, .seed = std::nullopt});

}  // namespace cpinfer
