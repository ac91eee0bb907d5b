#include "server/server.h"

#include <httplib.h>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <random>
#include <thread>

#include "core/log.h"
#include "loader/config.h"
#include "server/api.h"
#include "server/metrics.h"
#include "server/peer.h"
#include "server/runner.h"
#include "server/text.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer::server {

using nlohmann::json;

namespace {

std::atomic<bool> g_stop{false};
extern "C" void on_stop_signal(int) { g_stop.store(true); }

constexpr auto kPoll = std::chrono::milliseconds(50);
constexpr size_t kMaxBodyBytes = size_t(64) << 20;

// Scheduler thread -> HTTP thread: the output of one request, consumed as it grows.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::string reasoning, content;  // not yet taken by the HTTP thread
  bool finished = false;
  FinishInfo info;
};

// Scheduler thread only: token ids -> text -> stop strings -> reasoning split -> channel.
struct OutputState {
  StreamDecoder decoder;
  StopMatcher stops;
  std::optional<ReasoningSplitter> splitter;
  OutputState(const Tokenizer& tok, std::vector<std::string> stop_strings, bool split)
      : decoder(tok, /*skip_special=*/true), stops(std::move(stop_strings)) {
    if (split) splitter.emplace();
  }
  void deliver(Channel& ch, const std::string& text) {
    SplitText s;
    if (splitter) s = splitter->push(text);
    else s.content = text;
    if (s.reasoning.empty() && s.content.empty()) return;
    std::lock_guard lk(ch.mu);
    ch.reasoning += s.reasoning;
    ch.content += s.content;
    ch.cv.notify_all();
  }
  void finish(Channel& ch, const FinishInfo& info) {
    if (info.reason != "abort" && info.reason != "error") {
      std::string rest = stops.push(decoder.flush());
      rest += stops.flush();
      deliver(ch, rest);
      if (splitter) {
        SplitText s = splitter->flush();
        std::lock_guard lk(ch.mu);
        ch.reasoning += s.reasoning;
        ch.content += s.content;
      }
    }
    std::lock_guard lk(ch.mu);
    ch.finished = true;
    ch.info = info;
    ch.cv.notify_all();
  }
};

void send_json(httplib::Response& res, int status, const json& j) {
  res.status = status;
  res.set_content(j.dump(-1, ' ', false, json::error_handler_t::replace), "application/json");
}

void send_error(httplib::Response& res, const ApiError& e) { send_json(res, e.status, error_json(e)); }

// Counts requests whose HTTP side is still writing, so that a drain waits for their last bytes.
struct ActiveGuard {
  std::atomic<int>& n;
  explicit ActiveGuard(std::atomic<int>& c) : n(c) { n.fetch_add(1); }
  ~ActiveGuard() { n.fetch_sub(1); }
};

class App {
 public:
  App(const ServerOptions& so, Tokenizer tok, ModelConfig cfg, int context_length, int kv_tokens)
      : so_(so), tok_(std::move(tok)), cfg_(std::move(cfg)), context_length_(context_length),
        default_total_(std::min(context_length, kv_tokens)),
        name_(so.served_model_name.empty() ? so.model_path : so.served_model_name),
        created_(static_cast<int64_t>(std::time(nullptr))), rng_(std::random_device{}()) {}

  void install(httplib::Server& svr);
  void attach(Scheduler* s) {
    std::lock_guard lk(mu_);
    sched_ = s;
    ready_ = true;
  }
  void detach() {
    std::lock_guard lk(mu_);
    sched_ = nullptr;
  }
  void set_fatal(const std::string& msg) {
    std::lock_guard lk(mu_);
    fatal_ = msg;
    sched_ = nullptr;
  }
  bool ever_ready() const {
    std::lock_guard lk(mu_);
    return ready_;
  }
  int active() const { return active_.load(); }
  Metrics& metrics() { return metrics_; }

 private:
  void handle_generate(Endpoint ep, const httplib::Request& req, httplib::Response& res);
  void handle_metrics(httplib::Response& res);
  void handle_health(httplib::Response& res);
  std::vector<int32_t> tokenize(const GenRequest& g);
  std::string new_id(const char* prefix);
  void reject(httplib::Response& res, const ApiError& e) {
    if (e.status >= 400 && e.status < 500) metrics_.count_rejected();
    send_error(res, e);
  }

  ServerOptions so_;
  Tokenizer tok_;
  ModelConfig cfg_;
  int context_length_;
  int default_total_;  // prompt + default chat max_tokens: the context or the KV cache, the smaller
  std::string name_;
  int64_t created_;
  Metrics metrics_;
  std::atomic<int> active_{0};

  mutable std::mutex mu_;  // guards the fields below
  Scheduler* sched_ = nullptr;
  bool ready_ = false;
  std::string fatal_;
  std::mt19937_64 rng_;
};

std::string App::new_id(const char* prefix) {
  std::lock_guard lk(mu_);
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%s-%016llx", prefix, static_cast<unsigned long long>(rng_()));
  return buf;
}

std::vector<int32_t> App::tokenize(const GenRequest& g) {
  if (g.endpoint == Endpoint::Chat) {
    std::string text = tok_.render_chat(g.messages, /*add_generation_prompt=*/true, g.enable_thinking);
    return tok_.encode(text);
  }
  if (!g.prompt_ids.empty()) {
    for (int32_t id : g.prompt_ids)
      if (id >= cfg_.vocab_size)
        throw ApiError(400, "token id " + std::to_string(id) + " in 'prompt' is outside the vocabulary [0, " +
                                std::to_string(cfg_.vocab_size) + ")",
                       "prompt");
    return g.prompt_ids;
  }
  return tok_.encode(g.prompt);
}

void App::handle_generate(Endpoint ep, const httplib::Request& req, httplib::Response& res) {
  GenRequest g = parse_request(ep, req.body);
  if (!g.model.empty() && g.model != name_ && g.model != so_.model_path)
    throw ApiError(404, "The model '" + g.model + "' does not exist; this server serves '" + name_ + "'", "model",
                   "model_not_found");
  std::vector<int32_t> prompt = tokenize(g);
  if (prompt.empty()) throw ApiError(400, "the prompt is empty after tokenization", ep == Endpoint::Chat ? "messages" : "prompt");
  const int n_prompt = static_cast<int>(prompt.size());
  // OpenAI's defaults: 16 for completions; for chat, whatever room the context leaves.
  int max_tokens = g.max_tokens ? *g.max_tokens
                                : (ep == Endpoint::Completion ? 16 : std::max(1, default_total_ - n_prompt));
  if (int64_t(n_prompt) + std::max(max_tokens, 1) > context_length_ || max_tokens < 1)
    throw ApiError(400,
                   "This model's maximum context length is " + std::to_string(context_length_) +
                       " tokens. However, you requested " + std::to_string(int64_t(n_prompt) + std::max(max_tokens, 1)) +
                       " tokens (" + std::to_string(n_prompt) + " in the prompt, " + std::to_string(std::max(max_tokens, 1)) +
                       " for the completion). Please reduce the prompt or max_tokens.",
                   g.max_tokens ? "max_tokens" : (ep == Endpoint::Chat ? "messages" : "prompt"),
                   "context_length_exceeded");

  auto ch = std::make_shared<Channel>();
  auto out = std::make_shared<OutputState>(tok_, g.stop,
                                           ep == Endpoint::Chat && g.enable_thinking && g.separate_reasoning);
  auto r = std::make_shared<SchedRequest>();
  r->prompt = std::move(prompt);
  r->max_tokens = max_tokens;
  r->sampling = g.sampling;
  r->stop_ids = g.stop_token_ids;
  if (!g.ignore_eos) r->stop_ids.insert(r->stop_ids.end(), cfg_.eos_token_ids.begin(), cfg_.eos_token_ids.end());
  const int32_t n_text_ids = tok_.vocab_size();
  r->on_token = [ch, out, n_text_ids](int32_t id) {
    // The model's vocabulary is padded beyond the tokenizer's: such ids have no text.
    if (id >= n_text_ids) return true;
    std::string safe = out->stops.push(out->decoder.push(id));
    out->deliver(*ch, safe);
    return !out->stops.stopped();
  };
  r->on_finish = [ch, out](const FinishInfo& info) { out->finish(*ch, info); };
  {
    std::lock_guard lk(mu_);
    if (!sched_ || g_stop.load())
      throw ApiError(503, fatal_.empty() ? (g_stop.load() ? "the server is shutting down" : "the model is still loading")
                                         : "the engine failed: " + fatal_,
                     "", "", "server_error");
    if (std::string why = sched_->never_fits(n_prompt, max_tokens); !why.empty())
      throw ApiError(400, why, "max_tokens", "context_length_exceeded");
    sched_->submit(r);
  }

  const int fd = find_connection_socket(req.remote_addr, req.remote_port, req.local_port);
  const std::string id = new_id(ep == Endpoint::Chat ? "chatcmpl" : "cmpl");
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  auto cancel = [this, r] {
    r->cancelled.store(true);
    std::lock_guard lk(mu_);
    if (sched_) sched_->notify();
  };
  auto usage_of = [](const FinishInfo& f) { return Usage{f.prompt_tokens, f.completion_tokens}; };

  if (!g.stream) {
    ActiveGuard guard(active_);
    std::unique_lock lk(ch->mu);
    while (!ch->cv.wait_for(lk, kPoll, [&] { return ch->finished; })) {
      if (peer_closed(fd)) {
        lk.unlock();
        cancel();
        res.status = 499;  // nobody reads it
        return;
      }
    }
    if (ch->info.reason == "error")
      throw ApiError(500, "the engine failed: " + ch->info.error, "", "", "server_error");
    if (ep == Endpoint::Chat)
      send_json(res, 200, chat_response(id, created, name_, ch->content, ch->reasoning, ch->info.reason, usage_of(ch->info)));
    else
      send_json(res, 200, completion_response(id, created, name_, ch->content, ch->info.reason, usage_of(ch->info)));
    return;
  }

  // Streaming: the provider runs on this connection's thread after the handler returns.
  auto guard = std::make_shared<ActiveGuard>(active_);
  auto started = std::make_shared<bool>(false);
  const bool include_usage = g.include_usage;
  const std::string model = name_;
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [=](size_t, httplib::DataSink& sink) {
        (void)guard;
        std::string buf;
        if (!*started) {
          *started = true;
          if (ep == Endpoint::Chat)
            buf += sse_event(chat_chunk(id, created, model, {{"role", "assistant"}, {"content", ""}}, ""));
        }
        std::string reasoning, content;
        bool finished = false;
        FinishInfo info;
        {
          std::unique_lock lk(ch->mu);
          while (!ch->cv.wait_for(lk, kPoll, [&] { return ch->finished || !ch->content.empty() || !ch->reasoning.empty(); })) {
            if (!buf.empty()) break;
            if (peer_closed(fd)) {
              lk.unlock();
              cancel();
              return false;
            }
          }
          reasoning.swap(ch->reasoning);
          content.swap(ch->content);
          finished = ch->finished;
          info = ch->info;
        }
        if (ep == Endpoint::Chat) {
          if (!reasoning.empty()) buf += sse_event(chat_chunk(id, created, model, {{"reasoning_content", reasoning}}, ""));
          if (!content.empty()) buf += sse_event(chat_chunk(id, created, model, {{"content", content}}, ""));
        } else if (!content.empty()) {
          buf += sse_event(completion_chunk(id, created, model, content, ""));
        }
        if (finished) {
          if (info.reason == "error") {
            buf += sse_event(error_json(ApiError(500, "the engine failed: " + info.error, "", "", "server_error")));
          } else if (info.reason != "abort") {
            if (ep == Endpoint::Chat) buf += sse_event(chat_chunk(id, created, model, json::object(), info.reason));
            else buf += sse_event(completion_chunk(id, created, model, "", info.reason));
            if (include_usage) buf += sse_event(usage_chunk(ep, id, created, model, usage_of(info)));
          }
          buf += kSseDone;
        }
        if (!buf.empty() && !sink.write(buf.data(), buf.size())) {
          cancel();
          return false;
        }
        if (finished) sink.done();
        return true;
      },
      [r, this](bool success) {
        if (!success && !r->cancelled.load()) {
          r->cancelled.store(true);
          std::lock_guard lk(mu_);
          if (sched_) sched_->notify();
        }
      });
}

void App::handle_health(httplib::Response& res) {
  std::lock_guard lk(mu_);
  if (!fatal_.empty()) return send_json(res, 503, {{"status", "error"}, {"message", fatal_}});
  if (!ready_) return send_json(res, 503, {{"status", "loading"}});
  if (g_stop.load()) return send_json(res, 503, {{"status", "draining"}});
  send_json(res, 200, {{"status", "ok"}});
}

void App::handle_metrics(httplib::Response& res) {
  Gauges g;
  {
    std::lock_guard lk(mu_);
    if (sched_) g = sched_->gauges();
  }
  res.status = 200;
  res.set_content(metrics_.render(g), "text/plain; version=0.0.4");
}

void App::install(httplib::Server& svr) {
  svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (so_.api_key.empty() || req.path.rfind("/v1/", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
    if (req.get_header_value("Authorization") == "Bearer " + so_.api_key)
      return httplib::Server::HandlerResponse::Unhandled;
    metrics_.count_rejected();
    send_error(res, ApiError(401, "Incorrect API key provided: pass 'Authorization: Bearer <key>' with the key given "
                                  "to --api-key", "", "invalid_api_key"));
    return httplib::Server::HandlerResponse::Handled;
  });
  // A content reader, not a plain handler: httplib would parse (and cap at 8 KiB) a body that
  // arrives as application/x-www-form-urlencoded, which is what `curl -d` sends.
  auto generate = [this](Endpoint ep) {
    return [this, ep](const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& read) {
      try {
        httplib::Request full = req;
        bool too_large = false;
        read([&](const char* data, size_t n) {
          if (full.body.size() + n > kMaxBodyBytes) {
            too_large = true;
            return false;
          }
          full.body.append(data, n);
          return true;
        });
        if (too_large)
          throw ApiError(413, "request body exceeds " + std::to_string(kMaxBodyBytes >> 20) + " MiB");
        handle_generate(ep, full, res);
      } catch (const ApiError& e) {
        reject(res, e);
      } catch (const std::exception& e) {
        log_warn("request failed: ", e.what());
        send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "", "", "server_error"));
      }
    };
  };
  svr.Post("/v1/chat/completions", generate(Endpoint::Chat));
  svr.Post("/v1/completions", generate(Endpoint::Completion));
  auto model_json = [this] {
    return json{{"id", name_}, {"object", "model"}, {"created", created_}, {"owned_by", "cpinfer"},
                {"root", name_}, {"max_model_len", context_length_}};
  };
  svr.Get("/v1/models", [model_json](const httplib::Request&, httplib::Response& res) {
    send_json(res, 200, {{"object", "list"}, {"data", json::array({model_json()})}});
  });
  svr.Get("/v1/models/(.+)", [this, model_json](const httplib::Request& req, httplib::Response& res) {
    if (req.matches[1] == name_) return send_json(res, 200, model_json());
    reject(res, ApiError(404, "The model '" + std::string(req.matches[1]) + "' does not exist", "model", "model_not_found"));
  });
  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) { handle_health(res); });
  svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) { handle_metrics(res); });
  for (const char* path : {"/v1/chat/completions", "/v1/completions"})
    svr.Get(path, [this](const httplib::Request& req, httplib::Response& res) {
      reject(res, ApiError(405, "use POST for " + req.path, "", "method_not_allowed"));
    });
  // Unknown routes and httplib's own refusals (bad request line, payload too large) in OpenAI's shape.
  svr.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    const int status = res.status;
    std::string msg = status == 404 ? "Unknown route: " + req.method + " " + req.path
                                    : "HTTP " + std::to_string(status) +
                                          (status == 413 ? ": request body too large" : ": the request could not be read");
    metrics_.count_rejected();
    send_error(res, ApiError(status, msg, "", status == 404 ? "not_found" : ""));
  });
  svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string what = "unknown error";
    try {
      std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      what = e.what();
    } catch (...) {
    }
    send_error(res, ApiError(500, "internal error: " + what, "", "", "server_error"));
  });
}

}  // namespace

void request_server_stop() { g_stop.store(true); }

int run_server(const ServerOptions& so, const LaunchOptions& lo, const EngineOptions& eo) {
  g_stop.store(false);
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGPIPE, SIG_IGN);

  Tokenizer tok = Tokenizer::from_dir(so.model_path);
  ModelConfig cfg = load_config(so.model_path);
  const int kv_tokens = ((eo.kv_cache_tokens + eo.block_size - 1) / eo.block_size) * eo.block_size;
  int context_length = so.context_length;
  if (context_length <= 0) {
    context_length = kv_tokens;
    if (cfg.max_position_embeddings > 0) context_length = std::min<int64_t>(context_length, cfg.max_position_embeddings);
  }
  CPI_CHECK(context_length >= 2, "--context-length must be >= 2, got ", context_length);
  if (context_length > kv_tokens)
    log_warn("--context-length ", context_length, " exceeds the KV cache (", kv_tokens,
             " positions): requests longer than the cache are refused");
  SchedulerOptions sopt = so.sched;
  sopt.context_length = context_length;

  App app(so, tok, cfg, context_length, kv_tokens);
  httplib::Server svr;
  const size_t n_threads = static_cast<size_t>(std::max(8, so.http_threads));
  svr.new_task_queue = [n_threads] { return new httplib::ThreadPool(n_threads); };
  svr.set_keep_alive_max_count(1000);
  app.install(svr);
  int port = so.port;
  if (port == 0) {
    port = svr.bind_to_any_port(so.host);
    CPI_CHECK(port > 0, "cannot listen on ", so.host, ": no free port");
  } else {
    CPI_CHECK(svr.bind_to_port(so.host, port), "cannot listen on ", so.host, ":", port,
              " (in use? pick another --port)");
  }
  std::thread http([&] { svr.listen_after_bind(); });
  const std::string url = "http://" + so.host + ":" + std::to_string(port);
  log_info("listening on ", url, " (loading the model; /health answers 503 until ready)");

  int rc = 0;
  try {
    launch(lo, [&](ParallelCtx& par) {
      // Tests stretch the load (a checkpoint on local disk maps in milliseconds) to see /health's 503.
      if (const char* ms = std::getenv("CPINFER_TEST_LOAD_DELAY_MS"))
        std::this_thread::sleep_for(std::chrono::milliseconds(std::atoi(ms)));
      Engine engine(so.model_path, eo, par);
      if (par.world_rank() != 0) {
        follow_steps(engine, *par.control);
        return;
      }
      EngineRunner runner(engine, par.control);
      Scheduler sched(runner, sopt, &app.metrics());
      app.attach(&sched);
      log_info("ready: serving '", so.served_model_name.empty() ? so.model_path : so.served_model_name, "' at ", url,
               " (context ", context_length, " tokens, KV cache ", runner.n_blocks() * runner.block_size(),
               " positions, chunked prefill ", sopt.chunked_prefill_size, ", CP size ", eo.cp.cp_size,
               eo.cp.enable_prefill_cp ? " prefill CP on" : "", ")");
      try {
        sched.run(g_stop);
      } catch (...) {
        app.detach();
        throw;
      }
      app.detach();
      // A request submitted between the loop's last look and detach() still gets served.
      sched.run(g_stop);
      runner.shutdown();
    });
    log_info("drained: no request in flight");
  } catch (const std::exception& e) {
    if (!app.ever_ready()) {
      svr.stop();
      http.join();
      throw;
    }
    log_warn("fatal engine error: ", e.what(), "; /health answers 503, stop the server with SIGTERM");
    app.set_fatal(e.what());
    while (!g_stop.load()) std::this_thread::sleep_for(std::chrono::milliseconds(100));
    rc = 1;
  }
  // Let streams write their last chunks before the listener goes.
  for (int i = 0; i < 200 && app.active() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  svr.stop();
  http.join();
  log_info("server stopped");
  return rc;
}

}  // namespace cpinfer::server
