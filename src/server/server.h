// cpinfer serve: the OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions,
// GET /v1/models, /health, /metrics) in front of the engine. Rank 0 runs the HTTP threads and the
// scheduler; other ranks follow its steps (see runner.h).
#pragma once
#include <string>

#include "engine/engine.h"
#include "engine/launch.h"
#include "server/scheduler.h"

namespace cpinfer::server {

struct ServerOptions {
  std::string model_path;
  std::string served_model_name;  // empty: model_path
  std::string host = "127.0.0.1";
  int port = 30000;               // 0: any free port (the ready line names it)
  std::string api_key;            // non-empty: /v1/* need "Authorization: Bearer <key>"
  int context_length = 0;         // 0: min(max_position_embeddings, KV cache capacity)
  SchedulerOptions sched;
  int http_threads = 512;         // connections served at once (each waits on its request)
};

// Loads the model on every rank, serves until SIGTERM/SIGINT, then drains: refuses new requests,
// finishes those in flight, and returns 0 (1 after a fatal engine error). Throws cpinfer::Error
// when the model cannot be loaded or the address cannot be bound.
int run_server(const ServerOptions& so, const LaunchOptions& lo, const EngineOptions& eo);

// Asks a running run_server to drain and return (what SIGTERM does).
void request_server_stop();

}  // namespace cpinfer::server
