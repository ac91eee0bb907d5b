// cpinfer serve: the OpenAI-compatible HTTP server. Flag names follow SGLang's launch_server where
// the concept is the same (--model-path, --host, --port, --attn-cp-size, --enable-prefill-cp,
// --context-length, --max-running-requests, --chunked-prefill-size, --api-key, ...).
#include <unistd.h>
#include <cstdlib>
#include <filesystem>

#include "common.h"
#include "core/log.h"
#include "server/server.h"

namespace cpinfer {

namespace {

namespace fs = std::filesystem;

struct ServeFlags {
  EngineFlags ef;
  server::ServerOptions so;
  int log_interval_s = 10;
  double http_read_timeout_s = 30, http_idle_timeout_s = 60;
  const CLI::Option* chunked_prefill = nullptr;  // --chunked-prefill-size, to tell whether it was given
};

// Tokens per engine step when --chunked-prefill-size is not given: 8192 on a GPU (SGLang's default
// on GPUs of 35 to 160 GB, the H100 and H200 among them; one H100, FP8 Qwen3-30B-A3B, 1024-token prompts at concurrency
// 256: 4,767 against 3,196 output tokens/s with 2048, TTFT p50 1.07 against 2.29 s, TPOT p50 43 against 57 ms;
// docs/benchmarks.md), 2048 on the CPU, where a step's prompt chunk is what stalls the running requests' next tokens.
int default_chunked_prefill_size(const std::string& device) { return device == "cuda" ? 8192 : 2048; }

// Without --model-path: the demo checkpoint, written once into the user's cache directory.
std::string demo_model_dir() {
  fs::path base;
  if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x)
    base = x;
  else if (const char* h = std::getenv("HOME"); h && *h)
    base = fs::path(h) / ".cache";
  else
    base = fs::temp_directory_path();
  const fs::path dir = base / "cpinfer" / "demo-model";
  if (fs::exists(dir / "model.safetensors")) return dir.string();
  // Written beside, then renamed: a concurrent server never sees half a checkpoint.
  const fs::path tmp = base / "cpinfer" / ("demo-model.tmp" + std::to_string(getpid()));
  DemoModelSpec spec;
  spec.out = tmp.string();
  write_demo_model(spec);
  std::error_code ec;
  fs::rename(tmp, dir, ec);
  if (ec) fs::remove_all(tmp);  // another process won the race: use its copy
  CPI_CHECK(fs::exists(dir / "model.safetensors"), "could not write the demo model to ", dir.string());
  return dir.string();
}

int run_serve(ServeFlags& f) {
  if (!f.ef.random_weights.empty()) {
    CPI_CHECK(f.ef.model_path.empty(), "give exactly one of --model-path and --random-weights");
    if (f.so.served_model_name.empty()) f.so.served_model_name = "random:" + f.ef.random_weights;
  } else if (f.ef.model_path.empty()) {
    f.ef.model_path = demo_model_dir();
    if (f.so.served_model_name.empty()) f.so.served_model_name = "cpinfer-demo";
    log_info("no --model-path: serving the demo model in ", f.ef.model_path, " (random weights: random text)");
  }
  f.so.model_path = f.ef.model_path;
  f.so.tokenizer_path = f.ef.tokenizer_dir();
  f.so.sched.log_interval_s = f.log_interval_s;
  if (f.chunked_prefill->count() == 0) f.so.sched.chunked_prefill_size = default_chunked_prefill_size(f.ef.device);
  f.so.http.read_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.http_read_timeout_s * 1000));
  f.so.http.idle_timeout = std::chrono::milliseconds(static_cast<int64_t>(f.http_idle_timeout_s * 1000));
  // The KV cache holds the context by default; SGLang sizes it from free memory, which a CPU
  // back-end cannot tell us.
  const int needed = f.so.context_length > 0 ? f.so.context_length : 32768;
  // With --kv-shard a rank holds its share of that, with the slack of the scheduler's admission.
  EngineOptions eo = f.ef.engine(needed, f.so.sched.max_prefill_forwards(needed));
  return server::run_server(f.so, f.ef.launch(), eo);
}

}  // namespace

Command add_serve_command(CLI::App& app) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* c = app.add_subcommand("serve",
                                   "OpenAI-compatible HTTP server (chat/completions, completions, models, "
                                   "health, metrics)");
  f->ef.add_to(c, false);
  f->ef.add_random_weights_to(c);
  c->add_option("--host", f->so.host, "Address to listen on")->capture_default_str();
  c->add_option("--port", f->so.port, "Port to listen on (0: any free port; the ready line names it)")
      ->check(CLI::Range(0, 65535))
      ->capture_default_str();
  c->add_option("--served-model-name", f->so.served_model_name,
                "Model name in the API (default: the model path; 'cpinfer-demo' for the demo model)");
  c->add_option("--api-key", f->so.api_key, "Require 'Authorization: Bearer <key>' on /v1/*");
  c->add_option("--context-length", f->so.context_length,
                "Longest prompt + completion in tokens (default: min(max_position_embeddings, KV cache))")
      ->check(CLI::NonNegativeNumber);
  c->add_option("--max-running-requests", f->so.sched.max_running_requests, "Requests decoded at once")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  f->chunked_prefill = c->add_option("--chunked-prefill-size", f->so.sched.chunked_prefill_size,
                                     "Tokens per engine step (decode tokens + prompt chunks); -1: whole prompts "
                                     "(default: 8192 with --device cuda, 2048 on the cpu)");
  c->add_option("--decode-reserve-tokens", f->so.sched.decode_reserve_tokens,
                "Output tokens a request is counted for at admission; when decoding outgrows the KV cache the "
                "newest request is preempted and recomputed later (larger: fewer preemptions, less batching)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_flag(
      "--disable-radix-cache", [f](int64_t) { f->so.sched.radix_cache = false; },
      "Turn off the prefix cache (a radix tree over KV pages that lets a prompt starting with a cached "
      "prefix prefill only the rest; unused pages are evicted LRU when the KV cache is full)");
  c->add_option("--log-interval", f->log_interval_s, "Seconds between stats lines (0: none)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->add_option("--http-threads", f->so.http_threads, "HTTP connections open at once (more are answered 503)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--max-queued-requests", f->so.max_queued_requests,
                "Requests waiting for admission; more are answered 429 with Retry-After")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--shutdown-timeout", f->so.shutdown_timeout_s,
                "Seconds SIGTERM/SIGINT lets requests in flight finish; then they end with an error event and the "
                "server exits 0 (a second signal exits at once)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  c->add_option("--http-read-timeout", f->http_read_timeout_s,
                "Seconds a request (line, headers, body) may take to arrive; slower ones are answered 408")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  c->add_option("--http-idle-timeout", f->http_idle_timeout_s, "Seconds a kept-alive connection may sit idle")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  // Test hooks, hidden from --help (an empty group): a fixed answer for every request, a slower load.
  c->add_option("--test-fixed-output", f->so.test_fixed_output, "")->group("");
  c->add_option("--test-load-delay-ms", f->so.test_load_delay_ms, "")->check(CLI::Range(0, 600000))->group("");
  return {c, [f] { return run_serve(*f); }};
}

}  // namespace cpinfer
