#include "engine/runner.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "backends/cpu/cpu_backend.h"
#include "core/log.h"

namespace cpinfer {

EngineRunner::EngineRunner(Engine& engine, Communicator* control)
    : engine_(engine), control_(control && control->size() > 1 ? control : nullptr) {}

void EngineRunner::record(int32_t op, int32_t seq, int32_t a, int32_t b) {
  if (control_) ops_.insert(ops_.end(), {op, seq, a, b});
}

int EngineRunner::add_sequence() {
  int seq = engine_.cache().add_sequence();
  record(kOpAdd, seq);
  return seq;
}

void EngineRunner::reserve(int seq, int n_tokens) {
  engine_.cache().reserve(seq, n_tokens);
  record(kOpReserve, seq, n_tokens);
}

void EngineRunner::free_sequence(int seq) {
  engine_.cache().free_sequence(seq);
  record(kOpFree, seq);
}

void EngineRunner::reserve_synthetic(int seq, int n_tokens) {
  KvCache& cache = engine_.cache();
  CPI_CHECK(!cache.sharded(), "reserve_synthetic: only on a replicated KV cache");
  CPI_CHECK(cache.length(seq) == 0 && cache.blocks(seq).empty(), "reserve_synthetic: KV sequence ", seq,
            " is not empty");
  cache.reserve(seq, n_tokens);
  cache.set_length(seq, n_tokens);
  record(kOpSynthetic, seq, n_tokens);
}

void EngineRunner::adopt_prefix(int seq, std::span<const CachedPage* const> path) {
  KvCache& cache = engine_.cache();
  const KvCache::Adoption a = cache.adoption(path);
  for (const auto& [rank, block] : a.shares) {
    cache.share(seq, block, rank);
    record(kOpShare, seq, block, rank);
  }
  for (const auto& [rank, src, rows] : a.tails) {
    cache.copy_tail(seq, rank, src, rows);
    record(kOpCopyTail, seq, cache.page_ref(rank, src), rows);
  }
  for (const auto& [rank, n] : a.runs) {
    cache.adopt(seq, rank, n);
    record(kOpAdopt, seq, rank, n);
  }
}

int EngineRunner::adopted_positions(std::span<const CachedPage* const> path) const {
  const KvCache::Adoption a = engine_.cache().adoption(path);
  if (a.owned.empty()) return a.n_tokens;
  return *std::max_element(a.owned.begin(), a.owned.end());
}

void EngineRunner::retain_block(int32_t ref) {
  KvCache& cache = engine_.cache();
  cache.retain(cache.ref_block(ref), cache.ref_rank(ref));
  record(kOpRetain, 0, cache.ref_block(ref), cache.ref_rank(ref));
}

void EngineRunner::release_block(int32_t ref) {
  KvCache& cache = engine_.cache();
  cache.release(cache.ref_block(ref), cache.ref_rank(ref));
  record(kOpRelease, 0, cache.ref_block(ref), cache.ref_rank(ref));
}

void EngineRunner::broadcast_step(int32_t kind, const std::vector<SeqWork>& work) {
  std::vector<int32_t> msg = {kind, static_cast<int32_t>(ops_.size() / 4)};
  msg.insert(msg.end(), ops_.begin(), ops_.end());
  ops_.clear();
  msg.push_back(static_cast<int32_t>(work.size()));
  for (const SeqWork& w : work) {
    msg.insert(msg.end(),
               {w.kv_seq, w.n_cached, static_cast<int32_t>(w.logits), static_cast<int32_t>(w.tokens.size())});
    msg.insert(msg.end(), w.tokens.begin(), w.tokens.end());
  }
  int64_t n = static_cast<int64_t>(msg.size());
  control_->broadcast(&n, sizeof(n), 0);
  control_->broadcast(msg.data(), msg.size() * sizeof(int32_t), 0);
}

std::vector<int32_t> EngineRunner::run(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows) {
  if (control_) broadcast_step(kStepRun, work);
  return engine_.run_sample(work, rows);
}

std::vector<int32_t> EngineRunner::run_logprobs(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows,
                                                const std::vector<int>& top_n, std::vector<TokenLogprob>& logprobs,
                                                std::vector<std::vector<float>>& all_rows) {
  if (control_) broadcast_step(kStepRunLogits, work);
  std::vector<std::vector<float>> logits = engine_.run(work);
  std::vector<int32_t> out(work.size(), -1);
  logprobs.assign(work.size(), {});
  all_rows.assign(work.size(), {});
  const size_t vocab = static_cast<size_t>(engine_.config().vocab_size);
  for (size_t i = 0; i < work.size(); ++i) {
    if (work[i].logits == LogitsWanted::None) continue;
    if (work[i].logits == LogitsWanted::All) all_rows[i] = std::move(logits[i]);
    const std::span<const float> l = work[i].logits == LogitsWanted::All
                                         ? std::span<const float>(all_rows[i]).last(vocab)
                                         : std::span<const float>(logits[i]);
    out[i] = sample_reference(l, rows[i]);
    if (top_n[i] < 0 || out[i] < 0) continue;
    double mx = -std::numeric_limits<double>::infinity();
    for (float x : l)
      if (!std::isnan(x)) mx = std::max(mx, double(x));
    double sum = 0;
    for (float x : l)
      if (!std::isnan(x)) sum += std::exp(double(x) - mx);
    const double log_z = mx + std::log(sum);
    auto lp = [&](int32_t id) { return static_cast<float>(double(l[static_cast<size_t>(id)]) - log_z); };
    TokenLogprob& t = logprobs[i];
    t.token = out[i];
    t.logprob = lp(out[i]);
    std::vector<int32_t> ids(l.size());
    std::iota(ids.begin(), ids.end(), 0);
    const size_t k = std::min(ids.size(), static_cast<size_t>(top_n[i]));
    auto key = [&](int32_t id) {
      return std::isnan(l[size_t(id)]) ? -std::numeric_limits<float>::infinity() : l[size_t(id)];
    };
    std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(k), ids.end(),
                      [&](int32_t a, int32_t b) { return key(a) != key(b) ? key(a) > key(b) : a < b; });
    for (size_t j = 0; j < k; ++j) t.top.push_back({ids[j], lp(ids[j])});
  }
  return out;
}

void EngineRunner::idle() {
  if (control_) broadcast_step(kStepRun, {});
}

void EngineRunner::shutdown() {
  if (control_) broadcast_step(kStepShutdown, {});
}

void follow_steps(Engine& engine, Communicator& control) {
  KvCache& cache = engine.cache();
  std::vector<int32_t> msg;
  for (;;) {
    int64_t n = 0;
    control.broadcast(&n, sizeof(n), 0);
    CPI_CHECK(n >= 3, "step message of ", n, " words from rank 0");
    msg.resize(static_cast<size_t>(n));
    control.broadcast(msg.data(), msg.size() * sizeof(int32_t), 0);
    size_t i = 0;
    auto next = [&] {
      CPI_CHECK(i < msg.size(), "truncated step message from rank 0");
      return msg[i++];
    };
    const int32_t kind = next();
    const int32_t n_ops = next();
    for (int32_t k = 0; k < n_ops; ++k) {
      const int32_t op = next(), seq = next(), a = next(), b = next();
      if (op == kOpAdd) {
        int got = cache.add_sequence();
        CPI_CHECK(got == seq, "rank ", engine.rank(), " got KV sequence ", got, " but rank 0 got ", seq);
      } else if (op == kOpReserve) {
        cache.reserve(seq, a);
      } else if (op == kOpFree) {
        cache.free_sequence(seq);
      } else if (op == kOpShare) {
        cache.share(seq, a, b);
      } else if (op == kOpRetain) {
        cache.retain(a, b);
      } else if (op == kOpRelease) {
        cache.release(a, b);
      } else if (op == kOpCopyTail) {
        cache.copy_tail(seq, cache.ref_rank(a), cache.ref_block(a), b);
      } else if (op == kOpAdopt) {
        cache.adopt(seq, a, b);
      } else if (op == kOpSynthetic) {
        cache.reserve(seq, a);
        cache.set_length(seq, a);
      } else {
        CPI_FAIL("unknown cache op ", op, " from rank 0");
      }
    }
    const int32_t n_work = next();
    std::vector<SeqWork> work;
    for (int32_t k = 0; k < n_work; ++k) {
      SeqWork w;
      w.kv_seq = next();
      w.n_cached = next();
      w.logits = static_cast<LogitsWanted>(next());
      const int32_t len = next();
      CPI_CHECK(len >= 0 && i + len <= msg.size(), "truncated step message from rank 0");
      w.tokens = std::span<const int32_t>(msg.data() + i, static_cast<size_t>(len));
      i += static_cast<size_t>(len);
      work.push_back(w);
    }
    // The same forward as rank 0 (the same collectives); the draw is rank 0's alone.
    if (!work.empty() && kind == kStepRunLogits)
      engine.run(work);
    else if (!work.empty())
      engine.run_sample(work, std::vector<SampleRow>(work.size()));
    if (kind == kStepShutdown) return;
  }
}

}  // namespace cpinfer
