#include "engine/metrics.h"

#include <algorithm>
#include <cstdio>

namespace cpinfer {

namespace {
std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.9g", v);
  return buf;
}
const std::vector<double> kLatencyBounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1,  0.25, 0.5,
                                            0.75,  1.0,    2.5,   5.0,  7.5,   10.0, 20.0,  40.0, 80.0, 160.0};
const std::vector<double> kItlBounds = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04,
                                        0.05,   0.075, 0.1,    0.15,  0.2,  0.3,   0.4,  0.5,   1.0,  2.5};
}  // namespace

void Histogram::observe(double v) {
  size_t i = std::lower_bound(bounds_.begin(), bounds_.end(), v) - bounds_.begin();
  ++counts_[i];
  ++count_;
  sum_ += v;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  out += "# HELP " + name + " " + help + "\n# TYPE " + name + " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cum += counts_[i];
    out += name + "_bucket{le=\"" + num(bounds_[i]) + "\"} " + std::to_string(cum) + "\n";
  }
  out += name + "_bucket{le=\"+Inf\"} " + std::to_string(count_) + "\n";
  out += name + "_sum " + num(sum_) + "\n" + name + "_count " + std::to_string(count_) + "\n";
}

Metrics::Metrics() : ttft_(kLatencyBounds), itl_(kItlBounds), e2e_(kLatencyBounds) {}

void Metrics::observe_ttft(double s) {
  std::lock_guard lk(mu_);
  ttft_.observe(s);
}
void Metrics::observe_itl(double s) {
  std::lock_guard lk(mu_);
  itl_.observe(s);
}
void Metrics::finish_request(double e2e_s, int, int, const std::string& finish_reason) {
  std::lock_guard lk(mu_);
  if (finish_reason == "abort") {
    ++aborted_;
    return;
  }
  e2e_.observe(e2e_s);
  ++finished_;
}
void Metrics::add_prompt_tokens(int n) {
  std::lock_guard lk(mu_);
  prompt_tokens_ += n;
}
void Metrics::add_generation_tokens(int n) {
  std::lock_guard lk(mu_);
  generation_tokens_ += n;
}
void Metrics::count_rejected() {
  std::lock_guard lk(mu_);
  ++rejected_;
}
uint64_t Metrics::prompt_tokens() const {
  std::lock_guard lk(mu_);
  return prompt_tokens_;
}
uint64_t Metrics::generation_tokens() const {
  std::lock_guard lk(mu_);
  return generation_tokens_;
}

std::string Metrics::render(const Gauges& g) const {
  std::lock_guard lk(mu_);
  std::string out;
  auto gauge = [&](const char* name, const char* help, double v) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " " + num(v) + "\n";
  };
  auto counter = [&](const char* name, const char* help, uint64_t v) {
    out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " " +
           std::to_string(v) + "\n";
  };
  gauge("cpinfer_num_running_reqs", "Requests being prefilled or decoded.", g.running);
  gauge("cpinfer_num_waiting_reqs", "Requests waiting for KV cache space or a running slot.", g.waiting);
  gauge("cpinfer_kv_cache_usage",
        "Fraction of KV cache blocks in use by requests (0..1); pages kept only by the prefix cache count as free.",
        g.kv_usage);
  gauge("cpinfer_kv_cache_used_tokens", "KV cache positions in use (whole blocks).", g.kv_used_tokens);
  gauge("cpinfer_kv_cache_total_tokens", "KV cache capacity in positions.", g.kv_total_tokens);
  counter("cpinfer_preemptions_total", "Requests preempted (KV cache full; recomputed later).", g.preempted);
  counter("cpinfer_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache at admission.",
          g.prefix_query_tokens);
  counter("cpinfer_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache (not prefilled).",
          g.prefix_hit_tokens);
  gauge("cpinfer_prefix_cache_hit_rate", "Prefix cache hit tokens / queried tokens since start (0 before any).",
        g.prefix_query_tokens ? double(g.prefix_hit_tokens) / double(g.prefix_query_tokens) : 0.0);
  gauge("cpinfer_prefix_cache_cached_blocks", "KV blocks held by the prefix cache.", g.prefix_cached_blocks);
  counter("cpinfer_prefix_cache_evicted_blocks_total", "KV blocks evicted from the prefix cache (LRU).",
          g.prefix_evicted_blocks);
  counter("cpinfer_prompt_tokens_total", "Prompt tokens prefilled (recomputation included).", prompt_tokens_);
  counter("cpinfer_generation_tokens_total", "Tokens generated.", generation_tokens_);
  counter("cpinfer_requests_finished_total", "Requests that finished (stop or length).", finished_);
  counter("cpinfer_requests_aborted_total", "Requests cancelled (client went away).", aborted_);
  counter("cpinfer_requests_rejected_total", "Requests refused with a 4xx status.", rejected_);
  ttft_.render(out, "cpinfer_time_to_first_token_seconds", "Time to first token.");
  itl_.render(out, "cpinfer_inter_token_latency_seconds", "Time between consecutive output tokens.");
  e2e_.render(out, "cpinfer_e2e_request_latency_seconds", "Request latency from arrival to the last token.");
  return out;
}

}  // namespace cpinfer
