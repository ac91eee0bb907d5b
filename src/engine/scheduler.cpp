#include "engine/scheduler.h"

#include <algorithm>
#include <climits>
#include <cstdio>

#include "core/log.h"

namespace cpinfer {

using Clock = std::chrono::steady_clock;

namespace {
double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }
}  // namespace

Scheduler::Scheduler(ModelRunner& runner, const SchedulerOptions& opt, Metrics* metrics)
    : runner_(runner), opt_(opt), metrics_(metrics) {
  CPI_CHECK(opt.max_running_requests >= 1, "--max-running-requests must be >= 1, got ", opt.max_running_requests);
  CPI_CHECK(opt.context_length >= 2, "--context-length must be >= 2, got ", opt.context_length);
  n_free_blocks_ = runner_.n_free_blocks();
  sharded_ = runner_.kv_sharded();
  last_log_ = Clock::now();
  // Sharded KV: refs of every rank's blocks (rank * n_blocks + block), counted per rank.
  if (opt.radix_cache && runner_.shares_blocks())
    radix_ = std::make_unique<RadixCache>(runner_.block_size(), runner_.kv_ranks(), runner_.n_blocks());
}

// Per rank: free blocks plus those evicting the unpinned pages would free; the fewest of any rank.
int Scheduler::available_blocks() const {
  if (!radix_) return runner_.n_free_blocks();
  int fewest = INT_MAX;
  for (int r = 0; r < runner_.kv_ranks(); ++r)
    fewest = std::min(fewest, runner_.n_free_blocks_on(r) + radix_->n_evictable_blocks(r));
  return fewest;
}

void Scheduler::make_room(int n_blocks) {
  if (!radix_) return;
  std::vector<int32_t> freed;
  while (runner_.n_free_blocks() < n_blocks) {
    freed.clear();
    if (!radix_->evict_leaf(freed)) break;
    for (int32_t ref : freed) runner_.release_block(ref);
    prefix_evicted_.fetch_add(freed.size());
  }
}

void Scheduler::clear_prefix_cache() {
  if (!radix_) return;
  const std::vector<int32_t> freed = radix_->clear();
  for (int32_t ref : freed) runner_.release_block(ref);
  prefix_evicted_.fetch_add(freed.size());
  publish_gauges();
}

void Scheduler::release_sequence(SchedRequest& r, bool keep) {
  if (radix_ && keep && r.synthetic_context == 0) {
    // The cache holds the K/V of the fill's first positions: the prompt and the output but the
    // last token (not fed yet), or the part of the fill prefilled so far.
    const int n_fill = static_cast<int>(r.fill.size());
    const int kv_len = r.n_prefilled < n_fill || r.output.empty()
                           ? r.n_prefilled
                           : static_cast<int>(r.prompt.size() + r.output.size()) - 1;
    std::vector<int32_t> tokens(r.prompt);
    tokens.insert(tokens.end(), r.output.begin(), r.output.end());
    const int n_pages = kv_len / runner_.block_size();
    tokens.resize(static_cast<size_t>(n_pages * runner_.block_size()));
    for (int32_t ref : radix_->insert(tokens, runner_.cached_pages(r.seq, n_pages))) runner_.retain_block(ref);
  }
  if (radix_ && r.prefix) radix_->unpin(r.prefix);
  r.prefix = nullptr;
  runner_.free_sequence(r.seq);
  r.seq = -1;
  r.reserved = 0;
}

int Scheduler::blocks_for(int n_tokens) const {
  const int bs = runner_.block_size();
  return (n_tokens + bs - 1) / bs;
}

int Scheduler::grow_blocks(const SchedRequest& r, int n_tokens) const {
  if (sharded_) return runner_.blocks_to_grow(r.seq, n_tokens);
  return std::max(0, blocks_for(n_tokens) - held_blocks(r));
}

std::string Scheduler::never_fits(int prompt_tokens, int max_tokens) const {
  const int64_t total = int64_t(prompt_tokens) + max_tokens;
  if (total > opt_.context_length)
    return "the prompt (" + std::to_string(prompt_tokens) + " tokens) plus max_tokens (" + std::to_string(max_tokens) +
           ") = " + std::to_string(total) + " tokens exceed the context length of " +
           std::to_string(opt_.context_length) + " tokens";
  const int64_t capacity = int64_t(runner_.n_blocks()) * runner_.block_size();
  if (sharded_) {
    // Each rank stores about total / CP-size positions, plus what the splits of its prefill
    // forwards may add on one rank.
    const int64_t per_rank = runner_.positions_bound(total, opt_.max_prefill_forwards(total));
    if (per_rank > capacity)
      return "the prompt (" + std::to_string(prompt_tokens) + " tokens) plus max_tokens (" +
             std::to_string(max_tokens) + ") = " + std::to_string(total) + " tokens may need " +
             std::to_string(per_rank) + " positions on one CP rank, more than its KV cache of " +
             std::to_string(capacity) + " (--kv-cache-tokens)";
    return {};
  }
  if (total > capacity)
    return "the prompt (" + std::to_string(prompt_tokens) + " tokens) plus max_tokens (" + std::to_string(max_tokens) +
           ") = " + std::to_string(total) + " tokens exceed the KV cache capacity of " + std::to_string(capacity) +
           " tokens (--kv-cache-tokens)";
  return {};
}

void Scheduler::submit(std::shared_ptr<SchedRequest> r) {
  if (r->synthetic_context != 0) {
    CPI_CHECK(r->synthetic_context > 0, "synthetic_context must be >= 0, got ", r->synthetic_context);
    CPI_CHECK(!sharded_, "a request with a synthetic context needs a replicated KV cache (not --kv-shard)");
    CPI_CHECK(!r->on_prompt_logits, "a request with a synthetic context has no prompt logits");
    CPI_CHECK(!r->prompt.empty(), "a request with a synthetic context needs a prompt token to start decoding");
  }
  {
    std::lock_guard lk(mu_);
    incoming_.push_back(std::move(r));
    n_waiting_.fetch_add(1);
  }
  cv_.notify_one();
}

void Scheduler::notify() {
  {
    std::lock_guard lk(mu_);
    wake_ = true;
  }
  cv_.notify_one();
}

void Scheduler::take_incoming() {
  std::lock_guard lk(mu_);
  while (!incoming_.empty()) {
    waiting_.push_back(std::move(incoming_.front()));
    incoming_.pop_front();
  }
}

void Scheduler::finish(std::shared_ptr<SchedRequest> r, const std::string& reason, const std::string& error) {
  // A request ended by an engine error may have half-written K/V: its pages are not cached.
  if (r->seq >= 0) release_sequence(*r, reason != "error");
  auto it = std::find(running_.begin(), running_.end(), r);
  if (it != running_.end()) running_.erase(it);
  FinishInfo info{reason, error, static_cast<int>(r->prompt.size()), static_cast<int>(r->output.size())};
  if (metrics_)
    metrics_->finish_request(seconds(Clock::now() - r->arrival), info.prompt_tokens, info.completion_tokens, reason);
  if (r->on_finish) r->on_finish(info);
}

void Scheduler::drop_cancelled() {
  for (size_t i = 0; i < waiting_.size();) {
    if (waiting_[i]->cancelled.load()) {
      auto r = waiting_[i];
      waiting_.erase(waiting_.begin() + i);
      finish(r, "abort");
    } else {
      ++i;
    }
  }
  std::vector<std::shared_ptr<SchedRequest>> gone;
  for (auto& r : running_)
    if (r->cancelled.load()) gone.push_back(r);
  for (auto& r : gone) finish(r, "abort");
}

int ModelRunner::blocks_to_grow(int, int) const { CPI_FAIL("this engine runner has no sharded KV"); }
int ModelRunner::room_tokens(int, int) const { CPI_FAIL("this engine runner has no sharded KV"); }
std::vector<CachedPage> ModelRunner::cached_pages(int, int) const {
  CPI_FAIL("this engine runner cannot share KV blocks");
}
void ModelRunner::adopt_prefix(int, std::span<const CachedPage* const>) {
  CPI_FAIL("this engine runner cannot share KV blocks");
}
int ModelRunner::blocks_to_adopt(std::span<const CachedPage* const>, int) const {
  CPI_FAIL("this engine runner cannot share KV blocks");
}
int ModelRunner::adopted_positions(std::span<const CachedPage* const>) const {
  CPI_FAIL("this engine runner cannot share KV blocks");
}
void ModelRunner::retain_block(int32_t) { CPI_FAIL("this engine runner cannot share KV blocks"); }
void ModelRunner::release_block(int32_t) { CPI_FAIL("this engine runner cannot share KV blocks"); }
void ModelRunner::reserve_synthetic(int, int) { CPI_FAIL("this engine runner has no synthetic contexts"); }

std::vector<int32_t> ModelRunner::run_logprobs(const std::vector<SeqWork>&, const std::vector<SampleRow>&,
                                               const std::vector<int>&, std::vector<TokenLogprob>&,
                                               std::vector<std::vector<float>>&) {
  CPI_FAIL("this engine runner cannot return logprobs");
}

// The rows of positions [pos0, pos0 + n) of a forward with LogitsWanted::All, for the prompt
// positions not delivered yet (after a preemption the fill is prefilled again, and holds output too).
void Scheduler::deliver_prompt_logits(SchedRequest& r, int pos0, int n, const std::vector<float>& rows) {
  const size_t vocab = rows.size() / static_cast<size_t>(n);
  const int end = std::min(pos0 + n, static_cast<int>(r.prompt.size()));
  for (int pos = std::max(pos0, r.prompt_logits_sent); pos < end; ++pos)
    r.on_prompt_logits(pos, std::span<const float>(rows).subspan(static_cast<size_t>(pos - pos0) * vocab, vocab));
  r.prompt_logits_sent = std::max(r.prompt_logits_sent, end);
}

void Scheduler::on_sampled(const std::shared_ptr<SchedRequest>& r, int32_t token, const TokenLogprob* lp) {
  const auto now = Clock::now();
  r->output.push_back(token);
  if (metrics_) {
    metrics_->add_generation_tokens(1);
    if (r->output.size() == 1)
      metrics_->observe_ttft(seconds(now - r->arrival));
    else
      metrics_->observe_itl(seconds(now - r->last_token_time));
  }
  r->last_token_time = now;
  const bool is_stop = std::find(r->stop_ids.begin(), r->stop_ids.end(), token) != r->stop_ids.end();
  bool keep = !is_stop;
  if (keep && lp && r->on_logprob) r->on_logprob(*lp);
  if (keep && r->on_token) {
    // A failing callback ends its own request, not the server.
    try {
      keep = r->on_token(token);
    } catch (const std::exception& e) {
      log_warn("request output failed: ", e.what());
      finish(r, "error", e.what());
      return;
    }
  }
  if (!keep)
    finish(r, "stop");
  else if (static_cast<int>(r->output.size()) >= r->max_tokens)
    finish(r, "length");
}

void Scheduler::preempt(std::shared_ptr<SchedRequest> r) {
  release_sequence(*r, true);  // its pages stay cached: re-admission can share them
  r->n_prefilled = 0;
  // Recompute later: the prompt and every output token but the last (the next decode input).
  r->fill = r->prompt;
  if (!r->output.empty()) r->fill.insert(r->fill.end(), r->output.begin(), r->output.end() - 1);
  running_.erase(std::find(running_.begin(), running_.end(), r));
  waiting_.push_front(r);
  n_preempted_.fetch_add(1);
  log_debug("preempted a request of ", r->fill.size(), " tokens: KV cache full");
}

// FIFO admission. A request is admitted when its fill plus a bounded output reserve fits the blocks
// that running requests will not claim soon (the rest of their fill and their next token).
// With the prefix cache, the longest cached whole-page prefix of the fill is shared (pinned) and
// only the rest is prefilled; at least the last token is always prefilled (its logits start the
// output).
void Scheduler::admit() {
  int claimed = 0;  // blocks running requests will claim soon
  for (const auto& r : running_) {
    const int len = base(*r) + static_cast<int>(std::max(r->fill.size(), r->prompt.size() + r->output.size())) + 1;
    claimed += grow_blocks(*r, len);
  }
  while (!waiting_.empty() && static_cast<int>(running_.size()) < opt_.max_running_requests) {
    auto r = waiting_.front();
    if (r->fill.empty()) r->fill = r->prompt;
    RadixCache::Match hit;
    if (radix_ && r->fill.size() > 1 && !r->on_prompt_logits && r->synthetic_context == 0) {
      hit = radix_->match(std::span<const int32_t>(r->fill.data(), r->fill.size() - 1));
      radix_->pin(hit.last);  // before counting: pinned pages are not evictable
    }
    const int left = r->max_tokens - static_cast<int>(r->output.size());
    const int64_t want = int64_t(base(*r)) + int64_t(r->fill.size()) + std::min(left, opt_.decode_reserve_tokens) + 1;
    const int64_t capacity = int64_t(runner_.n_blocks()) * runner_.block_size();
    const int capped = static_cast<int>(std::min<int64_t>(want, capacity));
    const int hit_tokens = hit.n_pages() * runner_.block_size();
    if (sharded_ && hit.n_pages() > 0) {
      // The shards of a cached prefix follow the forwards that wrote them, which may have left one
      // rank more than its share (a cut inside a zigzag split). never_fits() bounds a request
      // written from scratch; one that adopts the prefix must keep within a rank's cache too.
      const int64_t rest = int64_t(r->fill.size()) + left - hit_tokens;
      if (runner_.adopted_positions(hit.pages) + runner_.positions_bound(rest, opt_.max_prefill_forwards(rest)) >
          capacity) {
        radix_->unpin(hit.last);
        hit = {};
      }
    }
    int need = blocks_for(capped) - hit.n_pages();
    if (sharded_)
      need = std::min(hit.n_pages() > 0 ? runner_.blocks_to_adopt(hit.pages, static_cast<int>(want))
                                        : runner_.blocks_to_grow(-1, static_cast<int>(want)),
                      runner_.n_blocks());
    if (need > available_blocks() - claimed) {
      if (radix_) radix_->unpin(hit.last);
      break;
    }
    claimed += need;
    r->seq = runner_.add_sequence();
    if (hit.n_pages() > 0) {
      if (sharded_) make_room(1);  // each rank copies at most one partly filled page
      runner_.adopt_prefix(r->seq, hit.pages);
    }
    if (r->synthetic_context > 0) {
      // The context's blocks are taken now: they leave the free blocks rather than stay claimed.
      const int taken = blocks_for(r->synthetic_context);
      make_room(taken);
      runner_.reserve_synthetic(r->seq, r->synthetic_context);
      claimed -= taken;
    }
    r->prefix = hit.last;
    r->n_prefilled = hit.n_pages() * runner_.block_size();
    r->reserved = base(*r) + r->n_prefilled;
    if (radix_) {
      prefix_query_.fetch_add(r->fill.size());
      prefix_hit_.fetch_add(static_cast<uint64_t>(r->n_prefilled));
    }
    if (!r->sampler) r->sampler.emplace(r->sampling);
    running_.push_back(r);
    waiting_.pop_front();
  }
}

bool Scheduler::step() {
  take_incoming();
  drop_cancelled();
  admit();

  // Decoding requests each need room for one more token; when the cache cannot give it, the
  // newest request gives its blocks back (never the last one: one request alone always fits).
  auto decoding = [](const SchedRequest& r) {
    return r.n_prefilled == static_cast<int>(r.fill.size()) && !r.output.empty();
  };
  auto decode_len = [](const SchedRequest& r) { return base(r) + static_cast<int>(r.prompt.size() + r.output.size()); };
  for (;;) {
    int need = 0;
    for (const auto& r : running_)
      if (decoding(*r)) need += grow_blocks(*r, decode_len(*r));
    if (need <= available_blocks() || running_.size() <= 1) break;
    preempt(running_.back());
  }

  // Batch: one token of every decoding request, then chunks of fills, shortest remaining first,
  // within the step's token budget (so a short prompt is not stuck behind a long one).
  int budget = opt_.chunked_prefill_size > 0 ? opt_.chunked_prefill_size : INT_MAX;
  std::vector<SeqWork> work;
  std::vector<std::shared_ptr<SchedRequest>> owners;
  std::vector<int32_t> decode_tokens;
  decode_tokens.reserve(running_.size());  // spans point into it: no reallocation
  std::vector<bool> draws;                 // per work entry: a token is drawn from its last row
  std::vector<std::shared_ptr<SchedRequest>> prefilling;
  for (auto& r : running_) {
    if (!decoding(*r)) {
      if (r->n_prefilled < static_cast<int>(r->fill.size())) prefilling.push_back(r);
      continue;
    }
    decode_tokens.push_back(r->output.back());
    work.push_back(
        SeqWork{r->seq, decode_len(*r) - 1, std::span<const int32_t>(&decode_tokens.back(), 1), LogitsWanted::Last});
    owners.push_back(r);
    draws.push_back(true);
    budget -= 1;
  }
  const int n_decode = static_cast<int>(work.size());
  int free_blocks = available_blocks();
  for (size_t i = 0; i < work.size(); ++i) free_blocks -= grow_blocks(*owners[i], decode_len(*owners[i]));
  // Prompts always progress, even when many requests decode.
  if (opt_.chunked_prefill_size > 0) budget = std::max(budget, std::max(1, opt_.chunked_prefill_size / 8));
  std::stable_sort(prefilling.begin(), prefilling.end(), [](const auto& a, const auto& b) {
    return a->fill.size() - a->n_prefilled < b->fill.size() - b->n_prefilled;
  });
  for (auto& r : prefilling) {
    if (budget <= 0) break;
    const int flen = static_cast<int>(r->fill.size());
    // As much as the budget and the free blocks allow.
    const int room =
        sharded_ ? runner_.room_tokens(r->seq, std::max(0, free_blocks))
                 : (held_blocks(*r) + std::max(0, free_blocks)) * runner_.block_size() - base(*r) - r->n_prefilled;
    const int n = std::min({flen - r->n_prefilled, budget, room});
    if (n <= 0) continue;
    budget -= n;
    free_blocks -= grow_blocks(*r, base(*r) + r->n_prefilled + n);
    const bool sample = r->n_prefilled + n == flen && r->output.empty();
    const bool rows_wanted = r->on_prompt_logits && r->n_prefilled < static_cast<int>(r->prompt.size());
    work.push_back(SeqWork{r->seq, base(*r) + r->n_prefilled,
                           std::span<const int32_t>(r->fill.data() + r->n_prefilled, n),
                           rows_wanted ? LogitsWanted::All
                           : sample    ? LogitsWanted::Last
                                       : LogitsWanted::None});
    owners.push_back(r);
    draws.resize(work.size(), false);
    draws.back() = sample;
  }
  if (work.empty()) {
    // Partly filled requests hold every free block: make room by preempting the newest.
    if (running_.size() > 1) {
      preempt(running_.back());
      publish_gauges();
      return true;
    }
    publish_gauges();
    return false;
  }
  int new_blocks = 0;
  for (size_t i = 0; i < work.size(); ++i)
    new_blocks += grow_blocks(*owners[i], work[i].n_cached + static_cast<int>(work[i].tokens.size()));
  make_room(new_blocks);
  for (size_t i = 0; i < work.size(); ++i) {
    const SeqWork& w = work[i];
    const int n = w.n_cached + static_cast<int>(w.tokens.size());
    runner_.reserve(w.kv_seq, n);
    owners[i]->reserved = std::max(owners[i]->reserved, n);
  }

  // Tokens are drawn by the runner (on the device), each with its request's sampler parameters.
  std::vector<SampleRow> rows(work.size());
  std::vector<int> top_n(work.size(), -1);
  bool on_host = false;  // logprobs or prompt logits: the logits come to the host
  for (size_t i = 0; i < work.size(); ++i) {
    on_host |= work[i].logits == LogitsWanted::All;
    if (!draws[i]) continue;
    rows[i] = owners[i]->sampler->next_row();
    top_n[i] = owners[i]->logprobs;
    on_host |= top_n[i] >= 0;
  }
  std::vector<TokenLogprob> logprobs;
  std::vector<std::vector<float>> all_rows;
  const std::vector<int32_t> drawn =
      on_host ? runner_.run_logprobs(work, rows, top_n, logprobs, all_rows) : runner_.run(work, rows);
  CPI_CHECK(drawn.size() == work.size(), "engine returned ", drawn.size(), " tokens for ", work.size(), " sequences");

  for (size_t i = 0; i < work.size(); ++i) {
    auto& r = owners[i];
    if (static_cast<int>(i) >= n_decode) {
      const int n = static_cast<int>(work[i].tokens.size());
      if (i < all_rows.size() && !all_rows[i].empty())
        deliver_prompt_logits(*r, work[i].n_cached - base(*r), n, all_rows[i]);
      r->n_prefilled += n;
      if (metrics_) metrics_->add_prompt_tokens(n);
      if (!draws[i]) continue;
    }
    CPI_CHECK(drawn[i] >= 0, "no token can be drawn: every logit is -inf or NaN");
    r->sampler->advance();
    on_sampled(r, drawn[i], top_n[i] >= 0 && i < logprobs.size() ? &logprobs[i] : nullptr);
  }
  publish_gauges();
  return true;
}

void Scheduler::publish_gauges() {
  n_running_ = static_cast<int>(running_.size());
  {
    std::lock_guard lk(mu_);
    n_waiting_ = static_cast<int>(waiting_.size() + incoming_.size());
  }
  n_free_blocks_ = available_blocks();  // pages only the prefix cache keeps count as free
  prefix_blocks_ = radix_ ? radix_->n_cached_blocks() : 0;
}

Gauges Scheduler::gauges() const {
  Gauges g;
  g.running = n_running_.load();
  g.waiting = n_waiting_.load();
  const int n_blocks = runner_.n_blocks();
  const int used = n_blocks - n_free_blocks_.load();
  g.kv_usage = n_blocks > 0 ? double(used) / n_blocks : 0.0;
  g.kv_used_tokens = used * runner_.block_size();
  g.kv_total_tokens = n_blocks * runner_.block_size();
  g.preempted = n_preempted_.load();
  g.prefix_query_tokens = prefix_query_.load();
  g.prefix_hit_tokens = prefix_hit_.load();
  g.prefix_cached_blocks = prefix_blocks_.load();
  g.prefix_evicted_blocks = prefix_evicted_.load();
  return g;
}

void Scheduler::maybe_log_stats() {
  if (opt_.log_interval_s <= 0 || !metrics_) return;
  const auto now = Clock::now();
  const double dt = seconds(now - last_log_);
  if (dt < opt_.log_interval_s) return;
  const uint64_t p = metrics_->prompt_tokens(), g = metrics_->generation_tokens();
  const Gauges gg = gauges();
  char buf[256];
  std::snprintf(buf, sizeof(buf),
                "stats: running %d, waiting %d, KV usage %.1f%% (%d / %d positions), prompt %.1f tok/s, "
                "generation %.1f tok/s",
                gg.running, gg.waiting, 100.0 * gg.kv_usage, gg.kv_used_tokens, gg.kv_total_tokens,
                double(p - logged_prompt_) / dt, double(g - logged_gen_) / dt);
  std::string line = buf;
  if (radix_) {
    std::snprintf(buf, sizeof(buf), ", prefix cache %d blocks, hit rate %.1f%%", gg.prefix_cached_blocks,
                  gg.prefix_query_tokens ? 100.0 * double(gg.prefix_hit_tokens) / double(gg.prefix_query_tokens) : 0.0);
    line += buf;
  }
  log_info(line);
  logged_prompt_ = p;
  logged_gen_ = g;
  last_log_ = now;
}

bool Scheduler::has_work() {
  std::lock_guard lk(mu_);
  return !incoming_.empty() || !waiting_.empty() || !running_.empty();
}

void Scheduler::run(const std::atomic<bool>& stop, std::chrono::milliseconds drain_timeout) {
  auto last_run = Clock::now();
  std::optional<Clock::time_point> drain_end;
  for (;;) {
    if (stop.load() && !drain_end)
      drain_end = drain_timeout >= std::chrono::duration_cast<std::chrono::milliseconds>(Clock::duration::max() / 2)
                      ? Clock::time_point::max()
                      : Clock::now() + drain_timeout;
    if (drain_end && Clock::now() >= *drain_end) {
      if (has_work()) {
        log_warn("shutdown: ending the requests still running after the drain timeout");
        fail_all(std::string(kShutdownMessage) + " (the drain timeout passed before this request finished)");
      }
      return;
    }
    bool did = false;
    try {
      did = step();
    } catch (const std::exception& e) {
      fail_all(e.what());
      throw;
    }
    maybe_log_stats();
    if (did) {
      last_run = Clock::now();
      continue;
    }
    if (stop.load() && !has_work()) return;
    if (Clock::now() - last_run >= opt_.idle_ping) {
      runner_.idle();
      last_run = Clock::now();
    }
    // Nothing to run: sleep until a request arrives or is cancelled; wake now and then to see
    // the stop flag (set from a signal handler, which cannot notify).
    std::unique_lock lk(mu_);
    cv_.wait_for(lk, std::chrono::milliseconds(100), [&] { return !incoming_.empty() || wake_; });
    wake_ = false;
  }
}

void Scheduler::fail_all(const std::string& message) {
  take_incoming();
  std::vector<std::shared_ptr<SchedRequest>> all(running_.begin(), running_.end());
  all.insert(all.end(), waiting_.begin(), waiting_.end());
  waiting_.clear();
  for (auto& r : all) {
    try {
      finish(r, "error", message);
    } catch (const std::exception& e) {
      log_warn("while failing a request: ", e.what());
    }
  }
  running_.clear();
  publish_gauges();
}

}  // namespace cpinfer
