// The engine loop of the server: one scheduler thread (rank 0) that admits requests under a paged
// KV budget, batches decode steps of every running request together with chunks of prompts
// (continuous batching + chunked prefill under a per-step token budget), preempts the newest
// request when decoding outgrows the cache (recomputed later, same output), samples, and reports
// tokens and completion through per-request callbacks. It talks to the engine only through
// ModelRunner, so tests drive it with a fake engine.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "engine/metrics.h"
#include "engine/sampler.h"
#include "kv/radix_cache.h"
#include "parallel/plan.h"

namespace cpinfer {

// The log-probability of a drawn token under the model's raw distribution (log-softmax of the
// logits, before temperature and truncation), and the most likely tokens with theirs.
struct TokenLogprob {
  int32_t token = -1;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // most likely first
};

// What the scheduler needs from the engine. The real one (runner.h) also replays every call on
// the other ranks; tests use a fake.
class ModelRunner {
 public:
  virtual ~ModelRunner() = default;
  virtual int add_sequence() = 0;
  virtual void reserve(int seq, int n_tokens) = 0;
  virtual void free_sequence(int seq) = 0;
  // One forward; returns per SeqWork the token drawn with rows[i] from its last position (entries
  // with LogitsWanted::Last; -1 for None, or when no logit is above -inf).
  virtual std::vector<int32_t> run(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows) = 0;
  // run() with the logits on the host: for entries with top_n[i] >= 0 also logprobs[i], the drawn
  // token's log-probability and the top_n[i] most likely tokens' (logprobs is resized to
  // work.size()); entries with LogitsWanted::All draw from their last row and leave every row in
  // all_rows[i] ([n, V], row-major; all_rows is resized to work.size()).
  virtual std::vector<int32_t> run_logprobs(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows,
                                            const std::vector<int>& top_n, std::vector<TokenLogprob>& logprobs,
                                            std::vector<std::vector<float>>& all_rows);
  // Shared KV blocks for the prefix cache (KvCache's share/retain/release/copy_tail/adopt, replayed
  // on every rank). A runner that returns false from shares_blocks() runs without a prefix cache.
  // Blocks are named by refs (KvCache::page_ref: rank * n_blocks + block; replicated: the block).
  virtual bool shares_blocks() const { return false; }
  // The first n_pages whole pages of `seq` as the prefix cache keeps them (KvCache::cached_pages).
  virtual std::vector<CachedPage> cached_pages(int seq, int n_pages) const;
  // A new sequence (nothing in it yet) takes the cached prefix `path` (KvCache::adoption).
  virtual void adopt_prefix(int seq, std::span<const CachedPage* const> path);
  // Blocks the most loaded rank needs for a new sequence that adopts `path` and grows to n_tokens
  // in one forward, and the most positions the adoption leaves on one rank.
  virtual int blocks_to_adopt(std::span<const CachedPage* const> path, int n_tokens) const;
  virtual int adopted_positions(std::span<const CachedPage* const> path) const;
  virtual void retain_block(int32_t ref);
  virtual void release_block(int32_t ref);
  // Benchmarks (SchedRequest::synthetic_context): reserves the first n_tokens positions of a new,
  // empty sequence and counts them as written without computing them (KvCache::reserve and
  // set_length; their K/V is whatever the pages hold).
  virtual void reserve_synthetic(int seq, int n_tokens);
  // Called when there is nothing to run for a while: lets other ranks know rank 0 is alive.
  virtual void idle() {}
  virtual int block_size() const = 0;
  virtual int n_blocks() const = 0;
  virtual int n_free_blocks() const = 0;
  // Ranks with their own blocks (sharded KV: the CP size; else 1) and the free blocks of one.
  virtual int kv_ranks() const { return 1; }
  virtual int n_free_blocks_on(int rank) const { return n_free_blocks(); }
  // Sharded KV (--kv-shard): each rank stores only its own positions, so a sequence of n tokens
  // takes about n / CP-size positions per rank, not n. The scheduler then asks the runner (KvCache's
  // per-rank accounting: the most any rank needs, the fewest blocks any rank has free) instead of
  // counting ceil(tokens / block size).
  virtual bool kv_sharded() const { return false; }
  // Blocks the most loaded rank needs to grow `seq` (< 0: a new sequence) to n_tokens in one forward.
  virtual int blocks_to_grow(int seq, int n_tokens) const;
  // Tokens by which `seq` can grow in one forward when each rank may take free_blocks more blocks.
  virtual int room_tokens(int seq, int free_blocks) const;
  // Upper bound of any rank's positions for a sequence of n_tokens written by prefill_forwards
  // prefill forwards plus decode steps.
  virtual int64_t positions_bound(int64_t n_tokens, int64_t prefill_forwards) const { return n_tokens; }
};

struct SchedulerOptions {
  int chunked_prefill_size = 2048;  // tokens per step (decode tokens + prompt chunks); <= 0: no limit
  int max_running_requests = 256;
  int context_length = 32768;
  // Admission counts a request's prompt plus at most this many output tokens; when decoding then
  // runs out of KV blocks, the newest request is preempted (its blocks freed, its tokens
  // recomputed later). INT_MAX: reserve max_tokens up front, never preempt.
  int decode_reserve_tokens = 256;
  // Prefix cache (radix tree over KV pages): a prompt that starts with cached pages prefills only
  // the rest. Off with --disable-radix-cache, or when the runner cannot share blocks.
  bool radix_cache = true;
  double log_interval_s = 10;  // periodic stats line; <= 0: none
  std::chrono::milliseconds idle_ping{1000};

  // At most how many prefill forwards a request of n_tokens takes: chunks of at least an eighth
  // of chunked_prefill_size (a step's decode tokens leave prompts at least that), plus 2. The
  // sharded-KV admission counts each forward's rounding on one rank (KvCache::shard_positions_bound).
  int64_t max_prefill_forwards(int64_t n_tokens) const {
    // One request at a time with its prompt in one forward (generate, prompt logits): the only
    // running request is never preempted, so its prompt takes exactly one forward.
    if (max_running_requests == 1 && chunked_prefill_size <= 0) return 1;
    const int64_t chunk = chunked_prefill_size > 0 ? chunked_prefill_size : std::max<int64_t>(n_tokens, 1);
    return 8 * ((n_tokens + chunk - 1) / chunk) + 2;
  }
};

// The error of requests ended by the drain timeout (Scheduler::run).
inline constexpr const char* kShutdownMessage = "the server is shutting down";

struct FinishInfo {
  std::string reason;  // "stop", "length", "abort" (client went away) or "error"
  std::string error;   // for "error"
  int prompt_tokens = 0;
  int completion_tokens = 0;
};

struct SchedRequest {
  // Set by the submitter before submit().
  std::vector<int32_t> prompt;
  int max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_ids;  // tokens that end the output (counted, not passed to on_token)
  int logprobs = -1;              // >= 0: on_logprob gets each token's logprob and this many alternatives
  std::function<void(const TokenLogprob&)> on_logprob;  // scheduler thread, just before on_token
  // Scheduler thread: the logits after each prompt position (the distribution of the token that
  // follows it; vocab floats), once per position in order, as the prompt is prefilled. A request
  // that sets it is prefilled without the prefix cache (a cached position has no logits) and its
  // prompt's forwards return every row.
  std::function<void(int pos, std::span<const float> row)> on_prompt_logits;
  // Scheduler thread, once per generated token that is not a stop id; false: stop now (a stop
  // string was found), finish_reason "stop".
  std::function<bool(int32_t)> on_token;
  // Scheduler thread, exactly once, after the request left the engine (its KV blocks are free).
  std::function<void(const FinishInfo&)> on_finish;
  std::atomic<bool> cancelled{false};  // any thread: the client went away
  // Benchmarks only (cpinfer bench decode; never set from the server API): the first
  // synthetic_context positions of the sequence are reserved and counted as present in the KV
  // cache without being computed, like a prefix-cache hit whose pages hold unspecified values
  // (ModelRunner::reserve_synthetic). The prompt follows at position synthetic_context, so a
  // one-token prompt starts decoding at that context straight away. Such a request skips the
  // prefix cache (neither matched nor inserted), cannot ask for prompt logits, and needs a
  // replicated KV cache; never_fits() is asked about synthetic_context + prompt tokens. A
  // preempted one is admitted again the same way (its prompt and output recomputed after the
  // synthetic positions).
  int synthetic_context = 0;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();

  // Scheduler state.
  int seq = -1;
  std::vector<int32_t> fill;           // tokens to put in the cache before decoding: the prompt, or after a
                                       // preemption the prompt and all output tokens but the last
  int n_prefilled = 0;                 // tokens of fill in the cache
  int prompt_logits_sent = 0;          // prompt positions given to on_prompt_logits (a re-prefill skips them)
  int reserved = 0;                    // positions reserved in the cache
  RadixCache::Node* prefix = nullptr;  // pinned prefix cache node of the shared pages (if any)
  std::vector<int32_t> output;
  std::optional<Sampler> sampler;
  std::chrono::steady_clock::time_point last_token_time;
};

class Scheduler {
 public:
  Scheduler(ModelRunner& runner, const SchedulerOptions& opt, Metrics* metrics = nullptr);

  // Why a request of this size can never run (empty: it can). Any thread.
  std::string never_fits(int prompt_tokens, int max_tokens) const;
  // Any thread. The request waits until it fits; its callbacks run on the scheduler thread.
  void submit(std::shared_ptr<SchedRequest> r);
  // Any thread: wakes the loop (e.g. a request was cancelled).
  void notify();

  // Scheduler thread: admits, runs one forward, delivers tokens. Returns false when there was
  // nothing to run. Throws what the engine throws.
  bool step();
  // Scheduler thread: steps until `stop` is set and every request has finished (drain). Requests
  // still unfinished `drain_timeout` after `stop` was first seen end with "error". On an engine
  // error every request finishes with "error" and the error is rethrown.
  void run(const std::atomic<bool>& stop, std::chrono::milliseconds drain_timeout = std::chrono::milliseconds::max());
  // Ends every request with reason "error" (after a fatal engine error).
  void fail_all(const std::string& message);

  // Scheduler thread: evicts every page of the prefix cache that no running request uses.
  void clear_prefix_cache();

  Gauges gauges() const;
  int n_running() const { return n_running_.load(); }
  uint64_t n_preempted() const { return n_preempted_.load(); }
  int n_waiting() const { return n_waiting_.load(); }

 private:
  bool has_work();
  void take_incoming();
  void drop_cancelled();
  void finish(std::shared_ptr<SchedRequest> r, const std::string& reason, const std::string& error = {});
  void preempt(std::shared_ptr<SchedRequest> r);  // by value: r may live in running_
  void admit();
  // Prefix cache: blocks free now or freeable by eviction; evicts until n blocks are free; puts the
  // KV of r's whole pages in the cache (unless `keep` is false) and frees r's sequence.
  int available_blocks() const;
  void make_room(int n_blocks);
  void release_sequence(SchedRequest& r, bool keep);
  int held_blocks(const SchedRequest& r) const { return blocks_for(r.reserved); }
  // Blocks the most loaded rank needs to grow r's sequence to n_tokens (replicated KV: blocks_for
  // less what r holds; sharded: the runner's per-rank count).
  int grow_blocks(const SchedRequest& r, int n_tokens) const;
  void deliver_prompt_logits(SchedRequest& r, int pos0, int n, const std::vector<float>& rows);
  void on_sampled(const std::shared_ptr<SchedRequest>& r, int32_t token, const TokenLogprob* lp = nullptr);
  int blocks_for(int n_tokens) const;
  // Positions before r's fill: its synthetic context (0 for every request but a benchmark's).
  static int base(const SchedRequest& r) { return r.synthetic_context; }
  void publish_gauges();
  void maybe_log_stats();

  ModelRunner& runner_;
  SchedulerOptions opt_;
  bool sharded_ = false;  // runner_.kv_sharded()
  Metrics* metrics_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<SchedRequest>> incoming_;  // guarded by mu_
  bool wake_ = false;                                   // guarded by mu_

  // Scheduler thread only.
  std::deque<std::shared_ptr<SchedRequest>> waiting_;
  std::vector<std::shared_ptr<SchedRequest>> running_;

  std::atomic<int> n_running_{0}, n_waiting_{0}, n_free_blocks_{0};
  std::atomic<uint64_t> n_preempted_{0};
  std::unique_ptr<RadixCache> radix_;  // null: prefix cache off
  std::atomic<uint64_t> prefix_query_{0}, prefix_hit_{0}, prefix_evicted_{0};
  std::atomic<int> prefix_blocks_{0};
  std::chrono::steady_clock::time_point last_log_;
  uint64_t logged_prompt_ = 0, logged_gen_ = 0;
};

}  // namespace cpinfer
