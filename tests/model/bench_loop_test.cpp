// The benchmarks' step-loop drivers (engine/bench_loop.h) on the CPU back-end: bench prefill's
// first token is the argmax of Engine::prefill's logits, bench decode's tokens at a synthetic
// context are those of Engine::run steps at that context (the cache zeroed, so the context's
// unspecified K/V is the same in both), at one rank and through the step protocol at two; sizes
// that cannot fit are skipped or refused and leave the cache as it was.
#include <gtest/gtest.h>

#include <mutex>

#include "engine/bench_loop.h"
#include "engine/launch.h"
#include "fixtures.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

const std::string kFixture = "moe_v4_gqa";

EngineOptions opts(int cp = 1) {
  EngineOptions eo;
  eo.quiet = true;
  eo.kv_cache_tokens = 512;
  eo.block_size = 16;
  eo.cp = CpOptions{cp, true, 8};
  return eo;
}

std::vector<int32_t> ids(int n, uint32_t seed) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[size_t(i)] = int32_t((seed * 131u + uint32_t(i) * 17u) % 200u);
  return v;
}

// Every position of the cache 0, so that a synthetic context's K/V is the same in every run.
void zero_cache(Engine& e) {
  for (int l = 0; l < e.config().num_hidden_layers; ++l) {
    const KvLayer kv = e.cache().layer(l);
    e.model().backend().fill_zero(kv.k);
    e.model().backend().fill_zero(kv.v);
  }
}

// What bench decode did before the loop: sequences at `context` (reserved, length set, never
// computed), then Engine::run steps of one token each, the argmax fed back.
std::vector<std::vector<int32_t>> reference_decode(Engine& e, const std::vector<int32_t>& first, int context,
                                                   int n_steps) {
  std::vector<int> seqs;
  for (size_t i = 0; i < first.size(); ++i) {
    seqs.push_back(e.cache().add_sequence());
    e.cache().reserve(seqs.back(), context);
    e.cache().set_length(seqs.back(), context);
  }
  std::vector<int32_t> tok = first;
  std::vector<std::vector<int32_t>> out(first.size());
  for (int k = 0; k < n_steps; ++k) {
    std::vector<SeqWork> work;
    for (size_t i = 0; i < first.size(); ++i) {
      e.cache().reserve(seqs[i], context + k + 1);
      work.push_back(SeqWork{seqs[i], context + k, std::span<const int32_t>(&tok[i], 1), LogitsWanted::Last});
    }
    const auto logits = e.run(work);
    for (size_t i = 0; i < first.size(); ++i) {
      tok[i] = argmax(logits[i]);
      out[i].push_back(tok[i]);
    }
  }
  for (int s : seqs) e.release(s);
  return out;
}

int32_t reference_first_token(Engine& e, const std::vector<int32_t>& prompt) {
  std::vector<int> seqs;
  const auto logits = e.prefill({std::span<const int32_t>(prompt)}, seqs);
  e.release(seqs[0]);
  return argmax(logits[0]);
}

}  // namespace

TEST(BenchLoop, PrefillDrawsTheArgmaxOfTheForward) {
  Engine e(fixture_dir(kFixture), opts());
  for (int n : {1, 37, 200}) {
    const auto prompt = ids(n, uint32_t(n));
    const PrefillTiming t = time_prefill(e, prompt);
    EXPECT_GT(t.ttft_s, 0.0);
    EXPECT_EQ(t.token, reference_first_token(e, prompt)) << n << " tokens";
    EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks()) << "the request's KV is freed";
  }
  // A prompt that cannot fit is refused by the loop's check, naming the limit; nothing is lost.
  EXPECT_THROW(
      {
        try {
          time_prefill(e, ids(600, 1));
        } catch (const Error& err) {
          EXPECT_NE(std::string(err.what()).find("exceed the KV cache capacity"), std::string::npos) << err.what();
          throw;
        }
      },
      Error);
  EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks());
}

TEST(BenchLoop, DecodeAtASyntheticContextDrawsWhatEngineRunDraws) {
  Engine e(fixture_dir(kFixture), opts());
  const int warmup = 1, steps = 3;
  for (int context : {0, 37, 64}) {
    const std::vector<int32_t> first = {5, 77, 150};
    zero_cache(e);
    const DecodeTiming t = time_decode(e, first, context, warmup, steps);
    ASSERT_EQ(t.skipped, "");
    EXPECT_EQ(t.step_s.size(), size_t(steps));
    for (double s : t.step_s) EXPECT_GT(s, 0.0);
    EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks()) << "the requests' KV is freed";
    zero_cache(e);
    const auto want = reference_decode(e, first, context, warmup + steps);
    EXPECT_EQ(t.tokens, want) << "context " << context;
  }
}

TEST(BenchLoop, DecodeSkipsWhatDoesNotFitAndKeepsTheCache) {
  Engine e(fixture_dir(kFixture), opts());  // 512 positions
  // One sequence counts 100 + 1 + (1 + 2 + 1) + 1 = 106 -> 112 positions: four fit, five do not.
  EXPECT_EQ(decode_bench_positions(100, 1, 2, 16), 112);
  EXPECT_EQ(time_decode(e, std::vector<int32_t>(4, 1), 100, 1, 2).skipped, "");
  const DecodeTiming five = time_decode(e, std::vector<int32_t>(5, 1), 100, 1, 2);
  EXPECT_EQ(five.skipped, kDecodeBatchDoesNotFit);
  EXPECT_TRUE(five.step_s.empty());
  // One sequence longer than the whole cache: never_fits' reason.
  const DecodeTiming big = time_decode(e, std::vector<int32_t>(1, 1), 600, 1, 2);
  EXPECT_NE(big.skipped.find("exceed the KV cache capacity of 512"), std::string::npos) << big.skipped;
  EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks());
}

// Two thread ranks: rank 0 runs the loop, rank 1 replays its steps (the synthetic context's
// reservation included); the tokens are those of one rank.
TEST(BenchLoop, TwoRanksFollowTheLoop) {
  const std::vector<int32_t> first = {9, 42};
  const auto prompt = ids(45, 3);
  const int context = 40;
  std::vector<std::vector<int32_t>> want_decode;
  int32_t want_first = -1;
  {
    Engine e(fixture_dir(kFixture), opts());
    zero_cache(e);
    want_decode = time_decode(e, first, context, 0, 3).tokens;
    want_first = time_prefill(e, prompt).token;
  }
  LaunchOptions lo;
  lo.cp_size = 2;
  lo.timeout_s = 60;
  std::mutex mu;
  std::vector<std::vector<int32_t>> got_decode;
  int32_t got_first = -1;
  launch(lo, [&](ParallelCtx& par) {
    Engine e(fixture_dir(kFixture), opts(2), par);
    zero_cache(e);
    const DecodeTiming d = time_decode(e, first, context, 0, 3);
    const PrefillTiming p = time_prefill(e, prompt);
    EXPECT_EQ(e.cache().n_free_blocks(), e.cache().n_blocks()) << "rank " << par.world_rank();
    if (par.world_rank() != 0) {
      EXPECT_TRUE(d.tokens.empty());
      EXPECT_EQ(p.token, -1);
      return;
    }
    std::lock_guard lk(mu);
    got_decode = d.tokens;
    got_first = p.token;
  });
  EXPECT_EQ(got_decode, want_decode);
  EXPECT_EQ(got_first, want_first);
}
