// Sharded KV (--kv-shard) equals the replicated-KV CP and one rank: logits of every prompt
// position, a chunked prefill on top of a cached prefix, 64 greedy decode steps (logits and
// tokens), and each rank's cache holds exactly the positions it owns (together: the one-rank
// cache) in at most 1/C of the replicated bytes plus a page.
#include <gtest/gtest.h>

#include <map>
#include <mutex>
#include <random>

#include "../model/fixtures.h"
#include "comm/communicator.h"
#include "engine/engine.h"
#include "engine/launch.h"

using namespace cpinfer;
using namespace cpinfer::test;

namespace {

constexpr int kPage = 16;

struct Case {
  std::vector<std::vector<int32_t>> prompts;
  int chunk = 0;       // > 0: the prompts are prefilled in chunks of this many tokens (the first chunk: All logits)
  int decode = 0;      // greedy decode steps after the prefill, all prompts in one batch
  int interleave = 1;  // --kv-interleave
};

struct Result {
  std::vector<std::vector<float>> logits;  // per prompt: prompt positions, then every decode step
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<float>> kv;  // per prompt: layer-major K then V, [length, Hkv*D] each, position order
  std::vector<int> blocks_used;        // per rank: KV blocks in use at the end
  std::vector<int> owned;              // per rank: positions stored (sum over prompts)
  size_t row_bytes = 0;                // K+V bytes of one position over all layers
  size_t kv_row = 0;                   // Hkv * D
};

// Runs `c` on cp local ranks (sharded or replicated KV) and returns rank 0's logits with the
// cache of every rank put back in position order.
Result run(const std::string& dir, int cp, bool shard, const Case& c) {
  Result out;
  std::mutex mu;
  std::map<int, std::vector<std::pair<std::vector<std::array<int32_t, 2>>, std::vector<std::vector<float>>>>> shards;
  out.blocks_used.assign(size_t(cp), 0);
  out.owned.assign(size_t(cp), 0);
  launch(LaunchOptions{.comm = "local", .cp_size = cp, .timeout_s = 120}, [&](ParallelCtx& par) {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 0;
    for (auto& p : c.prompts) eo.kv_cache_tokens += int(p.size()) + c.decode + 4 * kPage;
    eo.block_size = kPage;
    eo.cp = CpOptions{cp, true, 0, shard, c.interleave};
    Engine engine(dir, eo, par);
    const int V = int(engine.config().vocab_size), L = int(engine.config().num_hidden_layers);
    std::vector<int> seqs;
    std::vector<std::vector<float>> logits(c.prompts.size());
    std::vector<int32_t> next(c.prompts.size());
    for (size_t i = 0; i < c.prompts.size(); ++i) {
      const auto& p = c.prompts[i];
      const int first = c.chunk > 0 ? std::min<int>(c.chunk, int(p.size())) : int(p.size());
      std::vector<int> s1;
      logits[i] = engine.prefill({std::span<const int32_t>(p.data(), size_t(first))}, s1, LogitsWanted::All)[0];
      seqs.push_back(s1[0]);
      for (int done = first; done < int(p.size());) {  // later chunks over the cached prefix
        const int n = std::min<int>(c.chunk, int(p.size()) - done);
        engine.cache().reserve(s1[0], done + n);
        SeqWork w{s1[0], done, std::span<const int32_t>(p.data() + done, size_t(n)), LogitsWanted::All};
        auto l = engine.run({w})[0];
        logits[i].insert(logits[i].end(), l.begin(), l.end());
        done += n;
      }
      next[i] = argmax_in(logits[i], logits[i].size() - size_t(V), size_t(V));
    }
    std::vector<std::vector<int32_t>> tokens(c.prompts.size());
    for (int step = 0; step < c.decode; ++step) {
      for (size_t i = 0; i < seqs.size(); ++i) tokens[i].push_back(next[i]);
      auto l = engine.decode(seqs, next);
      for (size_t i = 0; i < seqs.size(); ++i) {
        logits[i].insert(logits[i].end(), l[i].begin(), l[i].end());
        next[i] = argmax_in(l[i], 0, size_t(V));
      }
    }
    // This rank's cache, with the positions it holds.
    std::vector<std::pair<std::vector<std::array<int32_t, 2>>, std::vector<std::vector<float>>>> mine;
    int owned = 0;
    for (int s : seqs) {
      std::vector<std::array<int32_t, 2>> ranges = {{0, engine.cache().length(s)}};
      if (engine.cache().sharded()) ranges = engine.cache().own_ranges(s);
      std::vector<std::vector<float>> layers;
      for (int l = 0; l < L; ++l) {
        layers.push_back(engine.cache().read(s, l, false));
        auto v = engine.cache().read(s, l, true);
        layers.back().insert(layers.back().end(), v.begin(), v.end());
      }
      for (auto r : ranges) owned += r[1];
      mine.emplace_back(std::move(ranges), std::move(layers));
    }
    std::lock_guard<std::mutex> lock(mu);
    const int r = par.cp_rank();
    out.blocks_used[size_t(r)] = engine.cache().n_blocks() - engine.cache().n_free_blocks();
    out.owned[size_t(r)] = owned;
    shards[r] = std::move(mine);
    if (r == 0) {
      out.logits = std::move(logits);
      out.tokens = std::move(tokens);
      const auto& sh = engine.cache().shape();
      out.row_bytes = size_t(2) * sh.n_layers * sh.n_kv_heads * sh.head_dim * dtype_size(sh.dtype);
      out.kv_row = size_t(sh.n_kv_heads) * sh.head_dim;
    }
  });
  // Put the shards back together (replicated: every rank holds all, rank 0's copy is taken).
  for (size_t i = 0; i < c.prompts.size(); ++i) {
    int len = 0;
    for (auto r : shards[0][i].first) len = std::max(len, r[0] + r[1]);
    if (shard)
      for (auto& [rank, seqs] : shards)
        for (auto r : seqs[i].first) len = std::max(len, r[0] + r[1]);
    const size_t row = out.kv_row, n_layers = shards[0][i].second.size();
    std::vector<float> all(n_layers * 2 * size_t(len) * row, std::nanf(""));
    for (auto& [rank, seqs] : shards) {
      if (!shard && rank != 0) break;
      const auto& [ranges, layers] = seqs[i];
      size_t n_local = 0;
      for (auto r : ranges) n_local += size_t(r[1]);
      for (size_t l = 0; l < n_layers; ++l) {
        size_t j = 0;
        for (auto r : ranges)
          for (int p = r[0]; p < r[0] + r[1]; ++p, ++j)
            for (size_t kv = 0; kv < 2; ++kv)
              std::copy_n(layers[l].begin() + long((kv * n_local + j) * row), row,
                          all.begin() + long(((l * 2 + kv) * size_t(len) + size_t(p)) * row));
      }
    }
    out.kv.push_back(std::move(all));
  }
  return out;
}

void expect_same(const Result& a, const Result& b, const std::string& what) {
  ASSERT_EQ(a.logits.size(), b.logits.size()) << what;
  EXPECT_EQ(a.tokens, b.tokens) << what << ": greedy tokens";
  for (size_t s = 0; s < a.logits.size(); ++s) {
    ASSERT_EQ(a.logits[s].size(), b.logits[s].size()) << what;
    EXPECT_LE(rel_max_err(a.logits[s].data(), b.logits[s].data(), a.logits[s].size()), 1e-5)
        << what << ": logits of prompt " << s;
    ASSERT_EQ(a.kv[s].size(), b.kv[s].size()) << what << ": KV of prompt " << s;
    // NaN (a position no rank holds) fails the comparison.
  }
}

// Each rank stores at most 1/C of the replicated bytes plus a page, and its blocks hold no more
// than its positions need (plus the one page of slack the reservation bound may take).
void expect_sharded_bytes(const Result& shard, const Result& one, int cp, const std::string& what) {
  const int one_positions = one.owned[0];
  int sum = 0;
  for (int r = 0; r < cp; ++r) {
    sum += shard.owned[size_t(r)];
    const double bytes = double(shard.owned[size_t(r)]) * double(shard.row_bytes);
    const double replicated = double(one_positions) * double(one.row_bytes);
    EXPECT_LE(bytes, replicated / cp + double(kPage) * double(one.row_bytes)) << what << " rank " << r;
    const int pages = (shard.owned[size_t(r)] + kPage - 1) / kPage;
    EXPECT_LE(shard.blocks_used[size_t(r)], pages + 2 * int(shard.kv.size())) << what << " rank " << r;
  }
  EXPECT_EQ(sum, one_positions) << what << ": every position is stored exactly once";
}

void check(const std::string& dir, int cp, const Case& c, const std::string& what) {
  const Result one = run(dir, 1, false, c);
  const Result rep = run(dir, cp, false, c);
  const Result shard = run(dir, cp, true, c);
  const std::string w = what + " cp=" + std::to_string(cp);
  expect_same(rep, one, w + " replicated");
  expect_same(shard, one, w + " sharded");
  expect_sharded_bytes(shard, one, cp, w);
}

}  // namespace

// One prompt of odd length (zigzag prefill over the ring), then 64 decode steps (pass-Q over the
// shards, tokens round-robin), on every fixture.
TEST(KvShard, PrefillAndDecodeMatchReplicatedAndOneRank) {
  for (const std::string& name : fixture_names()) {
    const std::string dir = fixture_dir(name);
    const int vocab = static_cast<int>(load_config(dir).vocab_size);
    for (int cp : {2, 3, 4, 8}) {
      Case c;
      const int len = name == "moe_v4_gqa" ? (cp == 3 ? 301 : 4 * cp + 1) : 2 * cp + 1;
      c.prompts = {random_ids(len, vocab, 10 + cp)};
      c.decode = name == "moe_v4_gqa" ? 64 : 8;
      check(dir, cp, c, name + " len=" + std::to_string(len));
    }
  }
}

// A batch of mixed lengths (some below the split threshold: spread round-robin), decoded together.
TEST(KvShard, MixedBatch) {
  const std::string dir = fixture_dir("moe_v4_gqa");
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  Case c;
  int seed = 40;
  for (int len : {1, 37, 5, 130, 2}) c.prompts.push_back(random_ids(len, vocab, seed++));
  c.decode = 20;
  for (int cp : {3, 4}) check(dir, cp, c, "mixed batch");
}

// Chunked prefill: later chunks attend to the cached prefix spread over the shards (pass-Q) and to
// their own rows (ring), merged by LSE; with interleave 1 and 5 for the round-robin positions.
TEST(KvShard, ChunkedPrefillOverShardedPrefix) {
  const std::string dir = fixture_dir("moe_v4_gqa");
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  for (auto [cp, len, chunk, interleave] :
       std::vector<std::tuple<int, int, int, int>>{{2, 97, 40, 1}, {3, 61, 17, 5}, {8, 130, 33, 1}, {4, 23, 3, 5}}) {
    Case c;
    c.prompts = {random_ids(len, vocab, 100 + len)};
    c.chunk = chunk;
    c.decode = 10;
    c.interleave = interleave;
    check(
        dir, cp, c,
        "len=" + std::to_string(len) + " chunk=" + std::to_string(chunk) + " interleave=" + std::to_string(interleave));
  }
}

// generate() with sharded KV takes a prompt plus output longer than one rank's cache (each rank
// stores about 1 / CP-size of it) and draws the tokens one rank with a large cache draws.
TEST(KvShard, GenerateBeyondOneRanksCache) {
  const std::string dir = fixture_dir("moe_v4_gqa");
  const int vocab = static_cast<int>(load_config(dir).vocab_size);
  const std::vector<int32_t> prompt = random_ids(150, vocab, 7);
  GenerateOptions g;
  g.max_new_tokens = 30;
  g.ignore_eos = true;
  g.sampling.temperature = 0;
  std::vector<int32_t> ref;
  {
    EngineOptions eo;
    eo.quiet = true;
    eo.kv_cache_tokens = 512;
    Engine e(dir, eo);
    ref = e.generate(prompt, g).output_ids;
  }
  ASSERT_EQ(ref.size(), 30u);
  for (int cp : {2, 3}) {
    std::vector<int32_t> got;
    std::mutex mu;
    launch(LaunchOptions{.comm = "local", .cp_size = cp, .timeout_s = 120}, [&](ParallelCtx& par) {
      EngineOptions eo;
      eo.quiet = true;
      eo.cp = CpOptions{cp, true, 8};
      eo.cp.kv_shard = true;
      eo.kv_cache_tokens = 144;  // per rank: less than the 180 positions of prompt + output
      Engine e(dir, eo, par);
      auto out = e.generate(prompt, g).output_ids;
      if (par.world_rank() == 0) {
        std::lock_guard lk(mu);
        got = out;
      }
    });
    EXPECT_EQ(got, ref) << "CP " << cp;
  }
}
