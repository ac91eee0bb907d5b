// Server metrics in the Prometheus text format (GET /metrics): request gauges, KV usage, token
// counters and latency histograms (TTFT, inter-token latency, end-to-end). Thread-safe.
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace cpinfer {

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}
  void observe(double v);
  // Appends the _bucket/_sum/_count lines of `name` (cumulative buckets, +Inf last).
  void render(std::string& out, const std::string& name, const std::string& help) const;
  uint64_t count() const { return count_; }
  double sum() const { return sum_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // per bucket, not cumulative; last = above every bound
  uint64_t count_ = 0;
  double sum_ = 0;
};

struct Gauges {
  int running = 0;
  int waiting = 0;
  double kv_usage = 0;  // fraction of KV blocks in use by requests, 0..1 (evictable cached pages are free)
  int kv_used_tokens = 0;
  int kv_total_tokens = 0;
  uint64_t preempted = 0;  // requests preempted so far (KV cache full while decoding)
  // Prefix cache (zero when it is off).
  uint64_t prefix_query_tokens = 0;  // tokens looked up at admission
  uint64_t prefix_hit_tokens = 0;    // of those, found in the cache (not prefilled)
  int prefix_cached_blocks = 0;      // KV blocks the prefix cache holds now
  uint64_t prefix_evicted_blocks = 0;
};

class Metrics {
 public:
  Metrics();
  void observe_ttft(double s);
  void observe_itl(double s);
  void finish_request(double e2e_s, int prompt_tokens, int generation_tokens, const std::string& finish_reason);
  void add_prompt_tokens(int n);      // counted when prefilled
  void add_generation_tokens(int n);  // counted when sampled
  void count_rejected();
  std::string render(const Gauges& g) const;
  uint64_t prompt_tokens() const;
  uint64_t generation_tokens() const;

 private:
  mutable std::mutex mu_;
  Histogram ttft_, itl_, e2e_;
  uint64_t prompt_tokens_ = 0, generation_tokens_ = 0;
  uint64_t finished_ = 0, aborted_ = 0, rejected_ = 0;
};

}  // namespace cpinfer
