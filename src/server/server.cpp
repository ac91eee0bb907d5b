#include "server/server.h"

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <ctime>
#include <random>
#include <thread>

#include <unistd.h>

#include "core/log.h"
#include "engine/metrics.h"
#include "engine/runner.h"
#include "loader/config.h"
#include "model/random_weights.h"
#include "server/api.h"
#include "server/http.h"
#include "server/output.h"
#include "server/text.h"
#include "server/tools.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer::server {

using nlohmann::json;

namespace {

std::atomic<bool> g_stop{false};
// The first SIGTERM/SIGINT starts the drain; a second one ends the process at once.
extern "C" void on_stop_signal(int sig) {
  if (g_stop.exchange(true)) ::_exit(128 + sig);
}

constexpr auto kPoll = std::chrono::milliseconds(50);

std::string trimmed(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return {};
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// A request that ended with "error": the engine failed (500), or the drain timeout ended it (503).
ApiError error_of(const FinishInfo& info) {
  if (info.error.rfind(kShutdownMessage, 0) == 0) return ApiError(503, info.error, "", "", "server_error");
  return ApiError(500, "the engine failed: " + info.error, "", "", "server_error");
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

void send_json(HttpResponder& res, int status, const json& j, const HttpHeaders& extra = {}) {
  res.send(status, "application/json", dump(j), extra);
}

void send_error(HttpResponder& res, const ApiError& e) {
  HttpHeaders extra;
  if (e.retry_after_s > 0) extra.emplace_back("Retry-After", std::to_string(e.retry_after_s));
  send_json(res, e.status, error_json(e), extra);
}

// Counts requests whose HTTP side is still writing, so that a drain waits for their last bytes.
struct ActiveGuard {
  std::atomic<int>& n;
  explicit ActiveGuard(std::atomic<int>& c) : n(c) { n.fetch_add(1); }
  ~ActiveGuard() { n.fetch_sub(1); }
};

class App {
 public:
  App(const ServerOptions& so, Tokenizer tok, ModelConfig cfg, int context_length, int kv_tokens)
      : so_(so),
        tok_(std::move(tok)),
        cfg_(std::move(cfg)),
        context_length_(context_length),
        default_total_(std::min(context_length, kv_tokens)),
        name_(so.served_model_name.empty() ? so.model_path : so.served_model_name),
        created_(static_cast<int64_t>(std::time(nullptr))),
        rng_(std::random_device{}()) {}

  // Routes one request (any HTTP thread).
  void handle(const HttpRequest& req, HttpResponder& res);
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
  void route(const HttpRequest& req, HttpResponder& res);
  void handle_generate(Endpoint ep, const HttpRequest& req, HttpResponder& res);
  void handle_metrics(HttpResponder& res);
  void handle_health(HttpResponder& res);
  std::vector<int32_t> tokenize(const GenRequest& g);
  std::string new_id(const char* prefix);
  std::vector<std::string> call_ids(size_t n);
  std::string tok_text(int32_t id) const;  // a token's raw bytes ("" beyond the tokenizer)
  void reject(HttpResponder& res, const ApiError& e) {
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

 public:
  // Test hook (--test-fixed-output): every request's output is these tokens, whatever the
  // model samples, so that a random-weight model can drive the output parsers.
  std::vector<int32_t> fixed_output_;
};

std::string App::new_id(const char* prefix) {
  std::lock_guard lk(mu_);
  char buf[40];
  std::snprintf(buf, sizeof(buf), "%s-%016llx", prefix, static_cast<unsigned long long>(rng_()));
  return buf;
}

std::string App::tok_text(int32_t id) const {
  return id >= 0 && id < tok_.vocab_size() ? tok_.token_bytes(id) : std::string();
}

std::vector<std::string> App::call_ids(size_t n) {
  std::vector<std::string> ids;
  for (size_t i = 0; i < n; ++i) ids.push_back(new_id("call"));
  return ids;
}

std::vector<int32_t> App::tokenize(const GenRequest& g) {
  if (g.endpoint == Endpoint::Chat) {
    std::string text = tok_.render_chat(g.messages, /*add_generation_prompt=*/true, g.enable_thinking, g.tools);
    if (const std::string forced = forced_tool_prefix(g.tool_choice); !forced.empty()) {
      if (g.enable_thinking) text += "<think>\n\n</think>\n\n";  // the template adds it only when off
      text += forced;
    }
    return tok_.encode(text);
  }
  if (!g.prompt_ids.empty()) {
    for (int32_t id : g.prompt_ids)
      if (id >= cfg_.vocab_size)
        throw ApiError(400,
                       "token id " + std::to_string(id) + " in 'prompt' is outside the vocabulary [0, " +
                           std::to_string(cfg_.vocab_size) + ")",
                       "prompt");
    return g.prompt_ids;
  }
  return tok_.encode(g.prompt);
}

void App::handle_generate(Endpoint ep, const HttpRequest& req, HttpResponder& res) {
  GenRequest g = parse_request(ep, req.body);
  if (!g.model.empty() && g.model != name_ && g.model != so_.model_path)
    throw ApiError(404, "The model '" + g.model + "' does not exist; this server serves '" + name_ + "'", "model",
                   "model_not_found");
  std::vector<int32_t> prompt = tokenize(g);
  if (prompt.empty())
    throw ApiError(400, "the prompt is empty after tokenization", ep == Endpoint::Chat ? "messages" : "prompt");
  const int n_prompt = static_cast<int>(prompt.size());
  // OpenAI's defaults: 16 for completions; for chat, whatever room the context leaves.
  int max_tokens =
      g.max_tokens ? *g.max_tokens : (ep == Endpoint::Completion ? 16 : std::max(1, default_total_ - n_prompt));
  if (int64_t(n_prompt) + std::max(max_tokens, 1) > context_length_ || max_tokens < 1)
    throw ApiError(
        400,
        "This model's maximum context length is " + std::to_string(context_length_) +
            " tokens. However, you requested " + std::to_string(int64_t(n_prompt) + std::max(max_tokens, 1)) +
            " tokens (" + std::to_string(n_prompt) + " in the prompt, " + std::to_string(std::max(max_tokens, 1)) +
            " for the completion). Please reduce the prompt or max_tokens.",
        g.max_tokens ? "max_tokens" : (ep == Endpoint::Chat ? "messages" : "prompt"), "context_length_exceeded");

  // n choices: n scheduler requests of the same prompt, each with its own output state.
  const size_t n = static_cast<size_t>(g.n);
  auto ch = std::make_shared<Channel>();
  ch->slots.resize(n);
  std::vector<std::shared_ptr<SchedRequest>> reqs;
  const int32_t n_text_ids = tok_.vocab_size();
  for (size_t i = 0; i < n; ++i) {
    auto out = std::make_shared<OutputState>(tok_, g.stop,
                                             ep == Endpoint::Chat && g.enable_thinking && g.separate_reasoning, i);
    if (ep == Endpoint::Chat && g.tool_choice.kind != ToolChoice::Kind::None) {
      out->tools.emplace();
      out->tools->push(forced_tool_prefix(g.tool_choice));  // the call the prompt already opened
    }
    auto r = std::make_shared<SchedRequest>();
    r->prompt = prompt;
    r->max_tokens = max_tokens;
    r->sampling = g.sampling;
    if (g.sampling.seed) r->sampling.seed = *g.sampling.seed + i;  // distinct, reproducible choices
    r->stop_ids = g.stop_token_ids;
    if (!g.ignore_eos) r->stop_ids.insert(r->stop_ids.end(), cfg_.eos_token_ids.begin(), cfg_.eos_token_ids.end());
    auto fixed = fixed_output_.empty() ? nullptr : std::make_shared<size_t>(0);
    r->on_token = [ch, out, n_text_ids, fixed, this](int32_t id) {
      if (fixed) id = fixed_output_[(*fixed)++];  // test hook: the model "says" the fixed text
      // The model's vocabulary is padded beyond the tokenizer's: such ids have no text.
      if (id >= n_text_ids) return true;
      std::string safe = out->stops.push(out->decoder.push(id));
      out->deliver(*ch, safe);
      return !out->stops.stopped() && !(fixed && *fixed == fixed_output_.size());
    };
    r->on_finish = [ch, out](const FinishInfo& info) { out->finish(*ch, info); };
    r->logprobs = g.logprobs;
    if (g.logprobs >= 0)
      r->on_logprob = [ch, i, this](const TokenLogprob& t) {
        LogprobEntry e{tok_text(t.token), t.logprob, {}};
        for (const auto& [id, lp] : t.top) e.top.push_back({tok_text(id), lp});
        std::lock_guard lk(ch->mu);
        ch->slots[i].lps.push_back(std::move(e));
      };
    reqs.push_back(std::move(r));
  }
  {
    std::lock_guard lk(mu_);
    if (!sched_ || g_stop.load())
      throw ApiError(503,
                     fatal_.empty() ? (g_stop.load() ? "the server is shutting down" : "the model is still loading")
                                    : "the engine failed: " + fatal_,
                     "", "", "server_error");
    if (std::string why = sched_->never_fits(n_prompt, max_tokens); !why.empty())
      throw ApiError(400, why, "max_tokens", "context_length_exceeded");
    if (sched_->n_waiting() + static_cast<int>(n) > so_.max_queued_requests) {
      ApiError busy(429,
                    "the server is busy: " + std::to_string(sched_->n_waiting()) +
                        " requests are already waiting (--max-queued-requests " +
                        std::to_string(so_.max_queued_requests) + "); retry later",
                    "", "rate_limit_exceeded", "rate_limit_error");
      busy.retry_after_s = 1;
      throw busy;
    }
    for (auto& r : reqs) sched_->submit(r);
  }

  const std::string id = new_id(ep == Endpoint::Chat ? "chatcmpl" : "cmpl");
  const int64_t created = static_cast<int64_t>(std::time(nullptr));
  auto cancel = [this, reqs] {
    for (auto& r : reqs) r->cancelled.store(true);
    std::lock_guard lk(mu_);
    if (sched_) sched_->notify();
  };
  // Usage over all choices: the prompt once (as OpenAI counts it), every choice's output.
  auto usage_of = [&](const std::vector<Slot>& slots) {
    Usage u{slots[0].info.prompt_tokens, 0};
    for (const Slot& s : slots) u.completion_tokens += s.info.completion_tokens;
    return u;
  };
  auto finish_reason = [](const FinishInfo& info, bool called) {
    return called && info.reason == "stop" ? std::string("tool_calls") : info.reason;
  };
  auto with_index = [](json j, size_t i) {
    j["choices"][0]["index"] = i;
    return j;
  };

  if (!g.stream) {
    ActiveGuard guard(active_);
    std::unique_lock lk(ch->mu);
    auto all_done = [&] {
      return std::all_of(ch->slots.begin(), ch->slots.end(), [](const Slot& s) { return s.finished; });
    };
    while (!ch->cv.wait_for(lk, kPoll, all_done)) {
      if (res.peer_closed()) {
        lk.unlock();
        cancel();
        return;  // nobody reads an answer: the connection closes
      }
    }
    for (const Slot& s : ch->slots)
      if (s.info.reason == "error") throw error_of(s.info);
    json resp;
    for (size_t i = 0; i < n; ++i) {
      const Slot& s = ch->slots[i];
      json one;
      if (ep == Endpoint::Chat) {
        const json calls = s.calls.empty()
                               ? json(nullptr)
                               : tool_calls_json(s.calls, call_ids(s.calls.size()), 0, /*with_index=*/false);
        one = chat_response(id, created, name_, s.calls.empty() ? s.content : trimmed(s.content), s.reasoning,
                            finish_reason(s.info, !s.calls.empty()), Usage{}, calls);
        if (g.logprobs >= 0) one["choices"][0]["logprobs"] = chat_logprobs_json(s.lps);
      } else {
        one = completion_response(id, created, name_, s.content, s.info.reason, Usage{});
        if (g.logprobs >= 0) one["choices"][0]["logprobs"] = completion_logprobs_json(s.lps, 0);
      }
      if (i == 0)
        resp = std::move(one);
      else
        resp["choices"].push_back(with_index(std::move(one), i)["choices"][0]);
    }
    resp["usage"] = usage_json(usage_of(ch->slots));
    return send_json(res, 200, resp);
  }

  // Streaming, on this connection's thread: each choice's pieces as they come, tagged with its index.
  ActiveGuard guard(active_);
  if (!res.begin_stream(200, "text/event-stream", {{"Cache-Control", "no-cache"}})) return cancel();
  std::string buf;
  if (ep == Endpoint::Chat)
    for (size_t i = 0; i < n; ++i)
      buf += sse_event(with_index(chat_chunk(id, created, name_, {{"role", "assistant"}, {"content", ""}}, ""), i));
  std::vector<int> n_calls(n, 0);
  std::vector<bool> done(n, false);
  std::vector<std::vector<LogprobEntry>> carry(n);  // logprobs waiting for the choice's next chunk
  std::vector<size_t> text_offset(n, 0);
  auto with_lp = [&](json chunk, size_t i) {
    if (g.logprobs < 0 || carry[i].empty()) return chunk;
    json lp = ep == Endpoint::Chat ? chat_logprobs_json(carry[i]) : completion_logprobs_json(carry[i], text_offset[i]);
    for (const LogprobEntry& e : carry[i]) text_offset[i] += e.token.size();
    carry[i].clear();
    chunk["choices"][0]["logprobs"] = std::move(lp);
    return chunk;
  };
  size_t n_done = 0;
  std::vector<Slot> all(n);  // for the usage at the end
  while (n_done < n) {
    std::vector<Slot> news(n);
    {
      std::unique_lock lk(ch->mu);
      auto any_news = [&] {
        for (const Slot& s : ch->slots)
          if (s.has_news()) return true;
        return false;
      };
      while (!ch->cv.wait_for(lk, kPoll, any_news)) {
        if (!buf.empty()) break;
        if (res.peer_closed()) {
          lk.unlock();
          return cancel();
        }
      }
      for (size_t i = 0; i < n; ++i) {
        Slot& s = ch->slots[i];
        if (done[i]) continue;
        news[i].reasoning.swap(s.reasoning);
        news[i].content.swap(s.content);
        news[i].calls.swap(s.calls);
        news[i].lps.swap(s.lps);
        news[i].finished = s.finished;
        news[i].info = s.info;
      }
    }
    for (size_t i = 0; i < n; ++i) {
      const Slot& s = news[i];
      carry[i].insert(carry[i].end(), s.lps.begin(), s.lps.end());
      if (ep == Endpoint::Chat) {
        if (!s.reasoning.empty())
          buf += sse_event(
              with_lp(with_index(chat_chunk(id, created, name_, {{"reasoning_content", s.reasoning}}, ""), i), i));
        if (!s.content.empty())
          buf += sse_event(with_lp(with_index(chat_chunk(id, created, name_, {{"content", s.content}}, ""), i), i));
        if (!s.calls.empty()) {
          json delta = {
              {"tool_calls", tool_calls_json(s.calls, call_ids(s.calls.size()), n_calls[i], /*with_index=*/true)}};
          buf += sse_event(with_index(chat_chunk(id, created, name_, delta, ""), i));
          n_calls[i] += static_cast<int>(s.calls.size());
        }
      } else if (!s.content.empty()) {
        buf += sse_event(with_lp(with_index(completion_chunk(id, created, name_, s.content, ""), i), i));
      }
      if (!s.finished || done[i]) continue;
      done[i] = true;
      ++n_done;
      all[i].info = s.info;
      if (s.info.reason == "error") {
        buf += sse_event(error_json(error_of(s.info)));
        n_done = n;  // the stream ends here
        break;
      }
      if (s.info.reason == "abort") continue;
      const std::string reason = finish_reason(s.info, n_calls[i] > 0);
      buf += sse_event(with_lp(with_index(ep == Endpoint::Chat ? chat_chunk(id, created, name_, json::object(), reason)
                                                               : completion_chunk(id, created, name_, "", reason),
                                          i),
                               i));
    }
    if (n_done == n) {
      if (g.include_usage && all[0].info.reason != "error")
        buf += sse_event(usage_chunk(ep, id, created, name_, usage_of(all)));
      buf += kSseDone;
    }
    if (!buf.empty() && !res.write(buf)) return cancel();
    buf.clear();
  }
  if (std::any_of(all.begin(), all.end(), [](const Slot& s) { return s.info.reason == "error"; })) cancel();
  res.end_stream();
}

void App::handle_health(HttpResponder& res) {
  std::lock_guard lk(mu_);
  if (!fatal_.empty()) return send_json(res, 503, {{"status", "error"}, {"message", fatal_}});
  if (!ready_) return send_json(res, 503, {{"status", "loading"}});
  if (g_stop.load()) return send_json(res, 503, {{"status", "draining"}});
  send_json(res, 200, {{"status", "ok"}});
}

void App::handle_metrics(HttpResponder& res) {
  Gauges g;
  {
    std::lock_guard lk(mu_);
    if (sched_) g = sched_->gauges();
  }
  res.send(200, "text/plain; version=0.0.4", metrics_.render(g));
}

void App::handle(const HttpRequest& req, HttpResponder& res) {
  try {
    route(req, res);
  } catch (const ApiError& e) {
    reject(res, e);
  } catch (const std::exception& e) {
    log_warn("request failed: ", e.what());
    send_error(res, ApiError(500, std::string("internal error: ") + e.what(), "", "", "server_error"));
  }
}

void App::route(const HttpRequest& req, HttpResponder& res) {
  const std::string& path = req.path;
  if (!so_.api_key.empty() && path.rfind("/v1/", 0) == 0 && req.header("Authorization") != "Bearer " + so_.api_key)
    throw ApiError(401,
                   "Incorrect API key provided: pass 'Authorization: Bearer <key>' with the key given to --api-key", "",
                   "invalid_api_key");
  const bool post = req.method == "POST";
  if (path == "/v1/chat/completions" || path == "/v1/completions") {
    if (!post) throw ApiError(405, "use POST for " + path, "", "method_not_allowed");
    return handle_generate(path == "/v1/chat/completions" ? Endpoint::Chat : Endpoint::Completion, req, res);
  }
  auto model_json = [this] {
    return json{{"id", name_},           {"object", "model"}, {"created", created_},
                {"owned_by", "cpinfer"}, {"root", name_},     {"max_model_len", context_length_}};
  };
  const bool get = req.method == "GET";
  if (get && path == "/v1/models")
    return send_json(res, 200, {{"object", "list"}, {"data", json::array({model_json()})}});
  if (get && path.rfind("/v1/models/", 0) == 0 && path.size() > 11) {
    const std::string model = path.substr(11);
    if (model == name_) return send_json(res, 200, model_json());
    throw ApiError(404, "The model '" + model + "' does not exist", "model", "model_not_found");
  }
  if (get && path == "/health") return handle_health(res);
  if (get && path == "/metrics") return handle_metrics(res);
  throw ApiError(404, "Unknown route: " + req.method + " " + path, "", "not_found");
}

}  // namespace

void request_server_stop() { g_stop.store(true); }

int run_server(const ServerOptions& so, const LaunchOptions& lo, const EngineOptions& eo) {
  g_stop.store(false);
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGPIPE, SIG_IGN);

  Tokenizer tok = Tokenizer::from_dir(so.tokenizer_path.empty() ? so.model_path : so.tokenizer_path);
  ModelConfig cfg = eo.random_weights.empty() ? load_config(so.model_path) : random_model_config(eo.random_weights);
  int kv_tokens = ((eo.kv_cache_tokens + eo.block_size - 1) / eo.block_size) * eo.block_size;
  if (eo.cp.kv_shard && eo.cp.cp_size > 1) {
    // Sharded KV: the CP group stores a sequence once between its ranks, each about 1 / CP-size of
    // it plus the slack the scheduler's admission allows for (Scheduler::never_fits).
    const int64_t rough = KvCache::shard_capacity_tokens(kv_tokens, 2, eo.cp.cp_size, eo.cp.kv_interleave);
    kv_tokens = static_cast<int>(
        std::min<int64_t>(INT32_MAX, KvCache::shard_capacity_tokens(kv_tokens, so.sched.max_prefill_forwards(rough),
                                                                    eo.cp.cp_size, eo.cp.kv_interleave)));
  }
  int context_length = so.context_length;
  if (context_length <= 0) {
    context_length = kv_tokens;
    if (cfg.max_position_embeddings > 0)
      context_length = std::min<int64_t>(context_length, cfg.max_position_embeddings);
  }
  CPI_CHECK(context_length >= 2, "--context-length must be >= 2, got ", context_length);
  if (context_length > kv_tokens)
    log_warn("--context-length ", context_length, " exceeds the KV cache (", kv_tokens,
             " positions): requests longer than the cache are refused");
  SchedulerOptions sopt = so.sched;
  sopt.context_length = context_length;

  App app(so, tok, cfg, context_length, kv_tokens);
  if (!so.test_fixed_output.empty()) {
    app.fixed_output_ = tok.encode(so.test_fixed_output);
    log_warn("--test-fixed-output: every request answers the same fixed text (a test hook)");
  }
  HttpLimits limits = so.http;
  limits.max_connections = std::max(8, so.http_threads);
  HttpServer svr(
      limits, [&app](const HttpRequest& req, HttpResponder& res) { app.handle(req, res); },
      [&app](int status, const std::string& message) {
        if (status >= 400 && status < 500) app.metrics().count_rejected();
        return dump(
            error_json(ApiError(status, message, "", "", status >= 500 ? "server_error" : "invalid_request_error")));
      });
  const int port = svr.bind(so.host, so.port);
  std::thread http([&] { svr.serve(); });
  const std::string url = "http://" + so.host + ":" + std::to_string(port);
  log_info("listening on ", url, " (loading the model; /health answers 503 until ready)");

  int rc = 0;
  try {
    launch(lo, [&](ParallelCtx& par) {
      // Tests stretch the load (a checkpoint on local disk maps in milliseconds) to see /health's 503.
      if (so.test_load_delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(so.test_load_delay_ms));
      Engine engine(so.model_path, eo, par);
      if (par.world_rank() != 0) {
        follow_steps(engine, *par.control);
        return;
      }
      EngineRunner runner(engine, par.control);
      Scheduler sched(runner, sopt, &app.metrics());
      app.attach(&sched);
      // Decode steps replay CUDA graphs at one rank (model/decode_graph.h).
      std::string graphs;
      if (eo.device == "cuda")
        graphs = eo.model.decode_graphs == DecodeGraphMode::Off ? ", decode CUDA graphs off"
                 : par.world_size() > 1                         ? ", decode CUDA graphs off (several ranks)"
                                                                : ", decode CUDA graphs on";
      log_info("ready: serving '", so.served_model_name.empty() ? so.model_path : so.served_model_name, "' at ", url,
               " (context ", context_length, " tokens, KV cache ", runner.n_blocks() * runner.block_size(),
               runner.kv_sharded() ? " positions per rank (sharded)" : " positions", ", chunked prefill ",
               sopt.chunked_prefill_size, ", CP size ", eo.cp.cp_size, eo.cp.enable_prefill_cp ? " prefill CP on" : "",
               sopt.radix_cache ? ", prefix cache on" : ", prefix cache off", graphs, ")");
      const auto drain = std::chrono::milliseconds(static_cast<int64_t>(so.shutdown_timeout_s * 1000));
      try {
        sched.run(g_stop, drain);
      } catch (...) {
        app.detach();
        throw;
      }
      app.detach();
      // A request submitted between the loop's last look and detach() still gets served.
      sched.run(g_stop, drain);
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
