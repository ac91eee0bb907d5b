// The server's engine loop over real engines: rank 0's Scheduler + EngineRunner with the other
// ranks replaying its steps (follow_steps) gives the same greedy outputs at CP size 1, 2 and 3 as
// at one rank, with batching, chunked prefill, cancellation and preemption (cache ops replayed in
// order, so block ids agree on every rank), also with decode steps padded as graphs replay them.
#include <gtest/gtest.h>

#include "engine_harness.h"

namespace cpinfer::server::test {
namespace {

// Serves `lens` prompts (greedy, 40 tokens each) on `cp` ranks; returns rank 0's outputs.
std::vector<std::vector<int32_t>> serve(int cp, const std::vector<int>& lens, int kv_tokens, int chunk,
                                        DecodeGraphMode graphs = DecodeGraphMode::On,
                                        DecodeGraphs::Stats* graph_stats = nullptr, bool kv_shard = false) {
  std::vector<std::vector<int32_t>> outputs(lens.size());
  uint64_t preempted = 0;
  with_scheduler(
      cp, kv_tokens, chunk, SchedulerOptions{}.radix_cache && !kv_shard, nullptr,
      [&](Scheduler& sched, EngineRunner& runner) {
        int done = 0;
        std::vector<std::shared_ptr<SchedRequest>> reqs;
        for (size_t i = 0; i < lens.size(); ++i) {
          auto r = std::make_shared<SchedRequest>();
          r->prompt = ids(lens[i], static_cast<uint32_t>(i));
          r->max_tokens = 40;
          r->sampling.temperature = 0;
          r->on_token = [&outputs, i](int32_t t) {
            outputs[i].push_back(t);
            return true;
          };
          r->on_finish = [&done](const FinishInfo&) { ++done; };
          sched.submit(r);
          reqs.push_back(r);
        }
        auto extra = std::make_shared<SchedRequest>();  // cancelled midway: its blocks come back
        extra->prompt = ids(40, 99);
        extra->max_tokens = 50;
        extra->on_finish = [&done](const FinishInfo& f) {
          EXPECT_EQ(f.reason, "abort");
          ++done;
        };
        sched.submit(extra);
        for (int step = 0; done < static_cast<int>(lens.size()) + 1 && step < 10000; ++step) {
          if (step == 3) extra->cancelled = true;
          if (!sched.step()) runner.idle();
        }
        EXPECT_EQ(done, static_cast<int>(lens.size()) + 1);
        // Every block is free or held by the prefix cache (finished requests' pages).
        EXPECT_EQ(runner.n_free_blocks() + sched.gauges().prefix_cached_blocks, runner.n_blocks());
        preempted = sched.n_preempted();
      },
      graphs, graph_stats, kv_shard);
  if (kv_tokens < 400) EXPECT_GT(preempted, 0u) << "the test meant to exercise preemption";
  return outputs;
}

TEST(EngineLoop, SameGreedyOutputsAtAnyCpSizeWithChunkingAndPreemption) {
  const std::vector<int> lens = {5, 37, 64, 17, 90, 3};
  auto ref = serve(1, lens, 2048, 2048);
  for (const auto& o : ref) EXPECT_EQ(o.size(), 40u);
  EXPECT_EQ(serve(1, lens, 160, 32), ref);  // chunked, preempting
  EXPECT_EQ(serve(2, lens, 2048, 2048), ref);
  EXPECT_EQ(serve(2, lens, 160, 32), ref);
  EXPECT_EQ(serve(3, lens, 160, 48), ref);
}

// Decode steps padded as a decode graph replays them (DecodeGraphMode::Eager: the padding and the
// fixed-width tables of model/decode_graph.h, on the CPU) serve the same greedy outputs, through
// batching, chunked prefill, cancellation and preemption.
TEST(EngineLoop, PaddedDecodeStepsServeTheSameOutputs) {
  const std::vector<int> lens = {5, 37, 64, 17, 90, 3};
  const auto ref = serve(1, lens, 2048, 2048, DecodeGraphMode::Off);
  for (int kv_tokens : {2048, 160}) {
    DecodeGraphs::Stats st;
    EXPECT_EQ(serve(1, lens, kv_tokens, 32, DecodeGraphMode::Eager, &st), ref) << kv_tokens << " KV positions";
    EXPECT_GT(st.padded_eager, 20) << "most steps of the run are pure decode steps";
  }
}

// Sharded KV (--kv-shard): each CP rank stores about 1 / CP-size of a sequence, so the server admits
// requests longer than one rank's cache — the 90-token prompt plus 40 tokens here, where each rank
// holds 112 (CP 2) or 80 (CP 3) positions — and serves the same greedy outputs as one rank with a
// large cache, through batching, cancellation and preemption (the scheduler counts blocks per rank).
TEST(EngineLoop, ShardedKvServesRequestsLongerThanOneRanksCache) {
  const std::vector<int> lens = {5, 37, 64, 17, 90, 3};
  const auto ref = serve(1, lens, 2048, 2048);
  with_scheduler(
      2, 112, 2048, false, nullptr,
      [](Scheduler& sched, EngineRunner&) {
        EXPECT_EQ(sched.never_fits(90, 40), "") << "sharded: 130 tokens over two ranks of 112 positions";
        EXPECT_NE(sched.never_fits(200, 40), "") << "240 tokens do not fit two ranks of 112";
      },
      DecodeGraphMode::On, nullptr, true);
  with_scheduler(2, 112, 2048, false, nullptr, [](Scheduler& sched, EngineRunner&) {
    EXPECT_NE(sched.never_fits(90, 40), "") << "replicated: every rank would hold all 130 positions";
  });
  EXPECT_EQ(serve(2, lens, 112, 2048, DecodeGraphMode::On, nullptr, true), ref);
  EXPECT_EQ(serve(3, lens, 80, 2048, DecodeGraphMode::On, nullptr, true), ref);
  EXPECT_EQ(serve(2, lens, 112, 32, DecodeGraphMode::On, nullptr, true), ref) << "chunked prefill";
}

// Prompt logits through the loop (SchedRequest::on_prompt_logits, what `cpinfer logits` and
// Engine::prompt_logits use): every prompt position's row exactly once and in order, equal to one
// forward of the whole prompt on one rank, at CP 1, 2 and 3, with chunked prefill, with preemption
// (a re-prefill does not deliver rows again) and with the prefix cache (a request that wants the
// rows is prefilled whole even when its prompt is cached).
TEST(EngineLoop, PromptLogitsEqualOneForwardOfThePrompt) {
  const std::vector<int> lens = {37, 90, 5, 64};
  std::vector<std::vector<float>> ref(lens.size());
  int64_t vocab = 0;
  {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 2048;
    eo.block_size = kBlock;
    Engine engine(kModel, eo);
    vocab = engine.config().vocab_size;
    for (size_t i = 0; i < lens.size(); ++i) {
      const std::vector<int32_t> p = ids(lens[i], static_cast<uint32_t>(i));
      std::vector<int> seqs;
      ref[i] = engine.prefill({std::span<const int32_t>(p)}, seqs, LogitsWanted::All)[0];
      engine.release(seqs[0]);
    }
  }
  for (auto [cp, kv_tokens, chunk] : {std::tuple{1, 2048, 2048}, {1, 160, 16}, {2, 160, 32}, {3, 2048, 24}}) {
    const std::string what = "CP " + std::to_string(cp) + ", " + std::to_string(kv_tokens) + " positions, chunks of " +
                             std::to_string(chunk);
    std::vector<std::vector<float>> got(lens.size());
    std::vector<int> next(lens.size(), 0);
    uint64_t preempted = 0;
    with_scheduler(cp, kv_tokens, chunk, true, nullptr, [&](Scheduler& sched, EngineRunner& runner) {
      int done = 0;
      auto submit = [&](size_t i, bool rows) {
        auto r = std::make_shared<SchedRequest>();
        r->prompt = ids(lens[i], static_cast<uint32_t>(i));
        r->max_tokens = 30;
        r->sampling.temperature = 0;
        if (rows)
          r->on_prompt_logits = [&, i](int pos, std::span<const float> row) {
            EXPECT_EQ(pos, next[i]) << what << ": prompt " << i << " rows out of order or repeated";
            next[i] = pos + 1;
            got[i].insert(got[i].end(), row.begin(), row.end());
          };
        r->on_finish = [&done](const FinishInfo&) { ++done; };
        sched.submit(r);
      };
      submit(1, false);  // its pages go to the prefix cache first
      for (int step = 0; done < 1 && step < 10000; ++step)
        if (!sched.step()) runner.idle();
      const uint64_t hit_before = sched.gauges().prefix_hit_tokens;
      for (size_t i = 0; i < lens.size(); ++i) submit(i, true);
      for (int step = 0; done < 1 + static_cast<int>(lens.size()) && step < 10000; ++step)
        if (!sched.step()) runner.idle();
      EXPECT_EQ(done, 1 + static_cast<int>(lens.size())) << what;
      EXPECT_EQ(sched.gauges().prefix_hit_tokens, hit_before) << what << ": the prompt-logits requests used the cache";
      preempted = sched.n_preempted();
    });
    if (kv_tokens < 400) EXPECT_GT(preempted, 0u) << what << ": meant to exercise preemption";
    for (size_t i = 0; i < lens.size(); ++i) {
      ASSERT_EQ(got[i].size(), ref[i].size()) << what << ", prompt " << i;
      double worst = 0, scale = 0;
      for (size_t j = 0; j < ref[i].size(); ++j) {
        worst = std::max(worst, std::abs(double(got[i][j]) - ref[i][j]));
        scale = std::max(scale, std::abs(double(ref[i][j])));
      }
      EXPECT_LE(worst, 1e-5 * scale) << what << ", prompt " << i << " (vocab " << vocab << ")";
    }
  }
}

}  // namespace
}  // namespace cpinfer::server::test
