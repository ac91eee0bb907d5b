// The OpenAI request/response schema: parsing and validation of /v1/chat/completions and
// /v1/completions bodies into a GenRequest, and the JSON of responses, stream chunks and errors.
// Pure functions (no engine, no sockets) so that they are unit-tested and fuzzed directly.
#pragma once
#include <cstdint>
#include <exception>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "engine/sampler.h"
#include "server/tools.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer::server {

// A client's mistake (or a refusal) in OpenAI's error shape:
// {"error": {"message", "type", "param", "code"}} with an HTTP status.
struct ApiError : std::exception {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;      // empty: null
  std::string code;       // empty: null
  int retry_after_s = 0;  // > 0: sent as Retry-After (429)
  ApiError(int status_, std::string message_, std::string param_ = {}, std::string code_ = {},
           std::string type_ = "invalid_request_error")
      : status(status_),
        message(std::move(message_)),
        type(std::move(type_)),
        param(std::move(param_)),
        code(std::move(code_)) {}
  const char* what() const noexcept override { return message.c_str(); }
};

nlohmann::json error_json(const ApiError& e);

enum class Endpoint { Chat, Completion };

struct GenRequest {
  Endpoint endpoint = Endpoint::Chat;
  std::string model;                  // as sent (empty: the served model)
  std::vector<ChatMessage> messages;  // chat
  std::string prompt;                 // completion, text form
  std::vector<int32_t> prompt_ids;    // completion, token form (prompt: [ids])
  std::optional<int> max_tokens;      // max_tokens / max_completion_tokens
  SamplingParams sampling;
  int n = 1;          // choices; with a seed, choice i samples with seed + i
  int logprobs = -1;  // >= 0: return logprobs with this many alternatives per token
  std::vector<std::string> stop;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  bool stream = false;
  bool include_usage = false;      // stream_options.include_usage
  bool enable_thinking = true;     // chat_template_kwargs.enable_thinking
  bool separate_reasoning = true;  // chat: <think>..</think> goes to reasoning_content
  std::string user_id;             // the "user" field, echoed nowhere (logged)
  std::vector<std::string> tools;  // chat: each tool as the template's tojson writes it (order kept)
  std::vector<std::string> tool_names;
  ToolChoice tool_choice{ToolChoice::Kind::None, {}};  // with tools: Auto unless the request says otherwise
};

// Parses and validates a request body. Throws ApiError(400) naming the offending field for
// malformed JSON, wrong types, out-of-range values and unsupported options.
GenRequest parse_request(Endpoint endpoint, std::string_view body);

struct Usage {
  int prompt_tokens = 0;
  int completion_tokens = 0;
};
nlohmann::json usage_json(const Usage& u);

// Non-streaming responses. reasoning empty -> reasoning_content: null.
// tool_calls: an array of OpenAI tool calls, or null.
nlohmann::json chat_response(const std::string& id, int64_t created, const std::string& model,
                             const std::string& content, const std::string& reasoning, const std::string& finish_reason,
                             const Usage& usage, const nlohmann::json& tool_calls = nullptr);
nlohmann::json completion_response(const std::string& id, int64_t created, const std::string& model,
                                   const std::string& text, const std::string& finish_reason, const Usage& usage);

// One streaming chunk. For chat, `delta` is the delta object ({"role": ...}, {"content": ...},
// {"reasoning_content": ...} or {}); for completions, text is the piece. finish_reason empty: null.
nlohmann::json chat_chunk(const std::string& id, int64_t created, const std::string& model, const nlohmann::json& delta,
                          const std::string& finish_reason);
nlohmann::json completion_chunk(const std::string& id, int64_t created, const std::string& model,
                                const std::string& text, const std::string& finish_reason);
// The final usage-only chunk (stream_options.include_usage): choices is empty.
nlohmann::json usage_chunk(Endpoint endpoint, const std::string& id, int64_t created, const std::string& model,
                           const Usage& usage);

// One generated token's log-probability and its alternatives, as text (raw token bytes).
struct LogprobEntry {
  std::string token;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};
// Chat: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}...]}.
nlohmann::json chat_logprobs_json(const std::vector<LogprobEntry>& entries);
// Completions: {"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"};
// offsets count from text_offset0 (the output bytes before these tokens).
nlohmann::json completion_logprobs_json(const std::vector<LogprobEntry>& entries, size_t text_offset0);

// Server-sent events framing: "data: <json>\n\n"; the stream ends with "data: [DONE]\n\n".
std::string sse_event(const nlohmann::json& j);
inline constexpr std::string_view kSseDone = "data: [DONE]\n\n";

}  // namespace cpinfer::server
