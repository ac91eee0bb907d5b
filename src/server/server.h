// cpinfer serve: the OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions,
// GET /v1/models, /health, /metrics) in front of the engine. Rank 0 runs the HTTP threads and the
// scheduler; other ranks follow its steps (see runner.h).
#pragma once
#include <string>

#include "engine/engine.h"
#include "engine/launch.h"
#include "engine/scheduler.h"
#include "server/http.h"

namespace cpinfer::server {

struct ServerOptions {
  std::string model_path;         // empty with EngineOptions::random_weights
  std::string tokenizer_path;     // empty: model_path
  std::string served_model_name;  // empty: model_path
  std::string host = "127.0.0.1";
  int port = 30000;        // 0: any free port (the ready line names it)
  std::string api_key;     // non-empty: /v1/* need "Authorization: Bearer <key>"
  int context_length = 0;  // 0: min(max_position_embeddings, KV cache capacity)
  SchedulerOptions sched;
  int http_threads = 512;          // connections served at once (each waits on its request)
  HttpLimits http;                 // header/body limits and timeouts (max_connections: http_threads)
  int max_queued_requests = 1024;  // requests waiting for admission; more are answered 429
  double shutdown_timeout_s = 30;  // SIGTERM: drain this long, then end what is left with an error
  // Test hooks (hidden flags of `cpinfer serve`): every request answers this fixed text (non-empty),
  // and the model load waits this long first, so that tests see /health's 503.
  std::string test_fixed_output;
  int test_load_delay_ms = 0;
};

// Loads the model on every rank, serves until SIGTERM/SIGINT, then drains: refuses new requests,
// finishes those in flight for at most shutdown_timeout_s (then ends the rest with an error event),
// and returns 0 (1 after a fatal engine error). A second signal exits the process at once. Throws cpinfer::Error
// when the model cannot be loaded or the address cannot be bound.
int run_server(const ServerOptions& so, const LaunchOptions& lo, const EngineOptions& eo);

// Asks a running run_server to drain and return (what SIGTERM does).
void request_server_stop();

}  // namespace cpinfer::server
