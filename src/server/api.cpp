#include "server/api.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/check.h"
#include "core/json.h"

namespace cpinfer::server {

using nlohmann::json;

namespace {

// A field that is absent or null counts as not given (clients send null for "default").
const json* field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

[[noreturn]] void bad(const std::string& param, const std::string& msg) { throw ApiError(400, msg, param); }

const char* type_name(const json& v) {
  if (v.is_boolean()) return "a boolean";
  if (v.is_number_integer()) return "an integer";
  if (v.is_number()) return "a number";
  if (v.is_string()) return "a string";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

bool get_bool(const json& obj, const char* name, bool def) {
  const json* v = field(obj, name);
  if (!v) return def;
  if (!v->is_boolean()) bad(name, std::string("'") + name + "' must be a boolean, got " + type_name(*v));
  return v->get<bool>();
}

std::optional<double> get_number(const json& obj, const char* name, double lo, double hi, const char* range) {
  const json* v = field(obj, name);
  if (!v) return std::nullopt;
  if (!v->is_number()) bad(name, std::string("'") + name + "' must be a number, got " + type_name(*v));
  double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    bad(name, std::string("'") + name + "' must be " + range + ", got " + v->dump());
  return x;
}

std::optional<int64_t> get_int(const json& obj, const char* name, int64_t lo, int64_t hi, const char* range) {
  const json* v = field(obj, name);
  if (!v) return std::nullopt;
  // 3.0 is accepted as 3 (JavaScript clients cannot tell them apart); 3.5 is not.
  if (v->is_number_float()) {
    double d = v->get<double>();
    if (!std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15)
      bad(name, std::string("'") + name + "' must be an integer, got " + v->dump());
    if (d < double(lo) || d > double(hi))
      bad(name, std::string("'") + name + "' must be " + range + ", got " + v->dump());
    return static_cast<int64_t>(d);
  }
  if (!v->is_number_integer()) bad(name, std::string("'") + name + "' must be an integer, got " + type_name(*v));
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    bad(name, std::string("'") + name + "' must be " + range + ", got " + v->dump());
  int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) bad(name, std::string("'") + name + "' must be " + range + ", got " + v->dump());
  return x;
}

// Chat content: a string, or an array of {"type": "text", "text": ...} parts (joined).
std::string content_text(const json& c, const std::string& param) {
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) bad(param, "'" + param + "' must be a string or an array of text parts, got " + type_name(c));
  std::string out;
  for (size_t i = 0; i < c.size(); ++i) {
    const json& part = c[i];
    std::string p = param + "[" + std::to_string(i) + "]";
    if (!part.is_object()) bad(p, "'" + p + "' must be an object like {\"type\": \"text\", \"text\": \"...\"}");
    const json* type = field(part, "type");
    if (!type || !type->is_string()) bad(p + ".type", "'" + p + ".type' must be a string");
    if (type->get<std::string>() != "text")
      bad(p + ".type", "content part type '" + type->get<std::string>() + "' is not supported (text only)");
    const json* text = field(part, "text");
    if (!text || !text->is_string()) bad(p + ".text", "'" + p + ".text' must be a string");
    out += text->get<std::string>();
  }
  return out;
}

void parse_messages(const json& body, GenRequest& r) {
  const json* msgs = field(body, "messages");
  if (!msgs) bad("messages", "'messages' is required");
  if (!msgs->is_array()) bad("messages", std::string("'messages' must be an array, got ") + type_name(*msgs));
  if (msgs->empty()) bad("messages", "'messages' must contain at least one message");
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    std::string p = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) bad(p, "'" + p + "' must be an object with 'role' and 'content'");
    const json* role = field(m, "role");
    if (!role || !role->is_string()) bad(p + ".role", "'" + p + ".role' must be a string");
    ChatMessage cm;
    cm.role = role->get<std::string>();
    if (cm.role == "developer") cm.role = "system";
    if (cm.role != "system" && cm.role != "user" && cm.role != "assistant" && cm.role != "tool")
      bad(p + ".role", "'" + p + ".role' must be one of system, developer, user, assistant, tool; got '" +
                           role->get<std::string>() + "'");
    const json* content = field(m, "content");
    if (!content) {
      if (cm.role != "assistant") bad(p + ".content", "'" + p + ".content' is required");
    } else {
      cm.content = content_text(*content, p + ".content");
    }
    if (const json* rc = field(m, "reasoning_content")) {
      if (!rc->is_string()) bad(p + ".reasoning_content", "'" + p + ".reasoning_content' must be a string");
      cm.reasoning_content = rc->get<std::string>();
    }
    r.messages.push_back(std::move(cm));
  }
}

using ojson = nlohmann::ordered_json;

// tools, tool_choice and the assistant messages' tool_calls, read from the body parsed with its key
// order kept (the template writes tools and arguments in the order the client sent them).
void parse_tools(const ojson& body, GenRequest& r) {
  auto it = body.find("tools");
  if (it != body.end() && !it->is_null()) {
    if (!it->is_array()) bad("tools", "'tools' must be an array of {\"type\": \"function\", \"function\": {...}}");
    if (it->size() > 256) bad("tools", "at most 256 tools are accepted");
    for (size_t i = 0; i < it->size(); ++i) {
      const ojson& t = (*it)[i];
      const std::string p = "tools[" + std::to_string(i) + "]";
      if (!t.is_object()) bad(p, "'" + p + "' must be an object");
      auto type = t.find("type");
      if (type == t.end() || *type != "function") bad(p + ".type", "'" + p + ".type' must be \"function\"");
      auto fn = t.find("function");
      if (fn == t.end() || !fn->is_object()) bad(p + ".function", "'" + p + ".function' must be an object");
      auto name = fn->find("name");
      if (name == fn->end() || !name->is_string() || name->get<std::string>().empty())
        bad(p + ".function.name", "'" + p + ".function.name' must be a non-empty string");
      r.tool_names.push_back(name->get<std::string>());
      r.tools.push_back(jinja_tojson(t));
    }
  }
  r.tool_choice.kind = ToolChoice::Kind::Auto;
  auto tc = body.find("tool_choice");
  if (tc != body.end() && !tc->is_null()) {
    if (tc->is_string()) {
      const std::string c = tc->get<std::string>();
      if (c == "auto")
        r.tool_choice.kind = ToolChoice::Kind::Auto;
      else if (c == "none")
        r.tool_choice.kind = ToolChoice::Kind::None;
      else if (c == "required")
        r.tool_choice.kind = ToolChoice::Kind::Required;
      else
        bad("tool_choice",
            "'tool_choice' must be \"auto\", \"none\", \"required\" or a named function, got '" + c + "'");
    } else if (tc->is_object() && tc->contains("function") && (*tc)["function"].is_object() &&
               (*tc)["function"].contains("name") && (*tc)["function"]["name"].is_string()) {
      r.tool_choice.kind = ToolChoice::Kind::Named;
      r.tool_choice.name = (*tc)["function"]["name"].get<std::string>();
      if (std::find(r.tool_names.begin(), r.tool_names.end(), r.tool_choice.name) == r.tool_names.end())
        bad("tool_choice", "'tool_choice' names function '" + r.tool_choice.name + "', which is not in 'tools'");
    } else {
      bad("tool_choice", "'tool_choice' must be a string or {\"type\": \"function\", \"function\": {\"name\": ...}}");
    }
    if (r.tool_choice.kind != ToolChoice::Kind::Auto && r.tool_choice.kind != ToolChoice::Kind::None && r.tools.empty())
      bad("tool_choice", "'tool_choice' requires 'tools'");
  }
  if (r.tools.empty()) r.tool_choice.kind = ToolChoice::Kind::None;
  if (r.tool_choice.kind == ToolChoice::Kind::None) r.tools.clear();  // left out of the prompt

  auto msgs = body.find("messages");
  for (size_t i = 0; msgs != body.end() && msgs->is_array() && i < msgs->size(); ++i) {
    const ojson& m = (*msgs)[i];
    auto calls = m.find("tool_calls");
    if (calls == m.end() || calls->is_null()) continue;
    const std::string p = "messages[" + std::to_string(i) + "].tool_calls";
    if (r.messages[i].role != "assistant") bad(p, "'" + p + "' is only allowed on assistant messages");
    if (!calls->is_array()) bad(p, "'" + p + "' must be an array");
    for (size_t k = 0; k < calls->size(); ++k) {
      const std::string q = p + "[" + std::to_string(k) + "]";
      const ojson& c = (*calls)[k];
      if (!c.is_object()) bad(q, "'" + q + "' must be an object");
      auto fn = c.find("function");
      const ojson& f = fn != c.end() && fn->is_object() ? *fn : c;  // as the template: .function if present
      auto name = f.find("name");
      auto args = f.find("arguments");
      if (name == f.end() || !name->is_string())
        bad(q + ".function.name", "'" + q + ".function.name' must be a string");
      ChatToolCall call;
      call.name = name->get<std::string>();
      if (args == f.end() || args->is_null())
        bad(q + ".function.arguments", "'" + q + ".function.arguments' is required");
      call.arguments = args->is_string() ? args->get<std::string>() : jinja_tojson(*args);
      r.messages[i].tool_calls.push_back(std::move(call));
    }
  }
}

void parse_prompt(const json& body, GenRequest& r) {
  const json* p = field(body, "prompt");
  if (!p) bad("prompt", "'prompt' is required");
  auto ids_from = [&](const json& arr) {
    std::vector<int32_t> ids;
    for (const json& x : arr) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > std::numeric_limits<int32_t>::max())
        bad("prompt", "'prompt' token arrays must hold non-negative integer token ids, got " + x.dump());
      ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
    }
    return ids;
  };
  if (p->is_string()) {
    r.prompt = p->get<std::string>();
  } else if (p->is_array() && !p->empty() && p->size() == 1 && (*p)[0].is_string()) {
    r.prompt = (*p)[0].get<std::string>();
  } else if (p->is_array() && !p->empty() && (*p)[0].is_number()) {
    r.prompt_ids = ids_from(*p);
  } else if (p->is_array() && p->size() == 1 && (*p)[0].is_array()) {
    r.prompt_ids = ids_from((*p)[0]);
  } else if (p->is_array() && p->size() > 1) {
    bad("prompt", "batched prompts (a list of several prompts) are not supported: send one request per prompt");
  } else {
    bad("prompt", std::string("'prompt' must be a string or an array of token ids, got ") + type_name(*p));
  }
  if (r.prompt.empty() && r.prompt_ids.empty()) bad("prompt", "'prompt' must not be empty");
}

void parse_stop(const json& body, GenRequest& r) {
  const json* s = field(body, "stop");
  if (!s) return;
  if (s->is_string()) {
    r.stop.push_back(s->get<std::string>());
  } else if (s->is_array()) {
    if (s->size() > 16) bad("stop", "'stop' may hold at most 16 strings, got " + std::to_string(s->size()));
    for (const json& x : *s) {
      if (!x.is_string()) bad("stop", std::string("'stop' entries must be strings, got ") + type_name(x));
      r.stop.push_back(x.get<std::string>());
    }
  } else {
    bad("stop", std::string("'stop' must be a string or an array of strings, got ") + type_name(*s));
  }
  for (const auto& x : r.stop)
    if (x.empty()) bad("stop", "'stop' strings must not be empty");
}

}  // namespace

constexpr int64_t kMaxChoices = 64;

GenRequest parse_request(Endpoint endpoint, std::string_view text) {
  json body;
  try {
    body = parse_json(text, "request body");
  } catch (const cpinfer::Error& e) {
    throw ApiError(400, e.what());
  }
  if (!body.is_object()) throw ApiError(400, std::string("request body must be a JSON object, got ") + type_name(body));

  GenRequest r;
  r.endpoint = endpoint;
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) bad("model", std::string("'model' must be a string, got ") + type_name(*m));
    r.model = m->get<std::string>();
  }
  if (endpoint == Endpoint::Chat) {
    parse_messages(body, r);
    // Key order matters for tools: parse again keeping it (the text already passed parse_json's
    // checks of depth and NUL bytes).
    if (body.contains("tools") || body.contains("tool_choice") || text.find("tool_calls") != std::string_view::npos)
      parse_tools(ojson::parse(text.begin(), text.end()), r);
  } else {
    parse_prompt(body, r);
  }

  constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();
  auto mt = get_int(body, "max_tokens", 1, kIntMax, "an integer >= 1");
  auto mct = get_int(body, "max_completion_tokens", 1, kIntMax, "an integer >= 1");
  if (mct)
    r.max_tokens = static_cast<int>(*mct);
  else if (mt)
    r.max_tokens = static_cast<int>(*mt);

  if (auto t = get_number(body, "temperature", 0.0, 2.0, "in [0, 2]")) r.sampling.temperature = float(*t);
  if (auto t = get_number(body, "top_p", 0.0, 1.0, "in (0, 1]")) {
    if (*t <= 0.0) bad("top_p", "'top_p' must be in (0, 1], got 0");
    r.sampling.top_p = float(*t);
  }
  if (auto k = get_int(body, "top_k", -1, kIntMax, "-1 (off) or an integer >= 1")) {
    if (*k == 0) bad("top_k", "'top_k' must be -1 (off) or an integer >= 1, got 0");
    r.sampling.top_k = static_cast<int>(*k);
  }
  if (auto m = get_number(body, "min_p", 0.0, 1.0, "in [0, 1]")) r.sampling.min_p = float(*m);
  if (auto s = get_int(body, "seed", 0, std::numeric_limits<int64_t>::max(), "a non-negative integer"))
    r.sampling.seed = static_cast<uint64_t>(*s);
  if (auto n = get_int(body, "n", 1, kMaxChoices, "an integer in [1, 64]")) r.n = static_cast<int>(*n);
  for (const char* pen : {"frequency_penalty", "presence_penalty"}) {
    auto v = get_number(body, pen, -2.0, 2.0, "in [-2, 2]");
    if (v && *v != 0.0) bad(pen, std::string("'") + pen + "' is not supported (only 0)");
  }
  if (auto v = get_number(body, "repetition_penalty", 0.0, 2.0, "in (0, 2]"); v && *v != 1.0)
    bad("repetition_penalty", "'repetition_penalty' is not supported (only 1)");
  if (endpoint == Endpoint::Chat) {
    const bool lp = get_bool(body, "logprobs", false);
    auto top = get_int(body, "top_logprobs", 0, 20, "an integer in [0, 20]");
    if (top && !lp) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    if (lp) r.logprobs = top ? static_cast<int>(*top) : 0;
  } else if (auto lp = get_int(body, "logprobs", 0, 20, "an integer in [0, 20]")) {
    r.logprobs = static_cast<int>(*lp);
  }
  if (endpoint == Endpoint::Completion && get_bool(body, "echo", false)) bad("echo", "'echo' is not supported");
  if (const json* v = field(body, "logit_bias"); v && !(v->is_object() && v->empty()))
    bad("logit_bias", "'logit_bias' is not supported");
  if (endpoint == Endpoint::Completion)
    for (const char* k : {"tools", "tool_choice"})
      if (const json* v = field(body, k); v && !(v->is_array() && v->empty()))
        bad(k, std::string("'") + k + "' is only supported by /v1/chat/completions");
  if (const json* v = field(body, "parallel_tool_calls"); v && !v->is_boolean())
    bad("parallel_tool_calls", "'parallel_tool_calls' must be a boolean");
  if (const json* v = field(body, "response_format")) {
    const json* t = v->is_object() ? field(*v, "type") : nullptr;
    if (!t || *t != "text")
      bad("response_format", "'response_format' other than {\"type\": \"text\"} is not supported");
  }
  if (const json* v = field(body, "suffix"); v && !(v->is_string() && v->get<std::string>().empty()))
    bad("suffix", "'suffix' is not supported");

  parse_stop(body, r);
  if (const json* ids = field(body, "stop_token_ids")) {
    if (!ids->is_array()) bad("stop_token_ids", "'stop_token_ids' must be an array of token ids");
    for (const json& x : *ids) {
      if (!x.is_number_integer() || x.get<int64_t>() < 0 || x.get<int64_t>() > kIntMax)
        bad("stop_token_ids", "'stop_token_ids' entries must be non-negative integers, got " + x.dump());
      r.stop_token_ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
    }
  }
  r.ignore_eos = get_bool(body, "ignore_eos", false);
  r.stream = get_bool(body, "stream", false);
  if (const json* so = field(body, "stream_options")) {
    if (!so->is_object())
      bad("stream_options", std::string("'stream_options' must be an object, got ") + type_name(*so));
    if (!r.stream) bad("stream_options", "'stream_options' is only allowed when 'stream' is true");
    r.include_usage = get_bool(*so, "include_usage", false);
  }
  if (const json* kw = field(body, "chat_template_kwargs")) {
    if (!kw->is_object())
      bad("chat_template_kwargs", std::string("'chat_template_kwargs' must be an object, got ") + type_name(*kw));
    if (const json* et = field(*kw, "enable_thinking")) {
      if (!et->is_boolean()) bad("chat_template_kwargs.enable_thinking", "'enable_thinking' must be a boolean");
      r.enable_thinking = et->get<bool>();
    }
  }
  r.separate_reasoning = get_bool(body, "separate_reasoning", true);
  if (const json* u = field(body, "user")) {
    if (!u->is_string()) bad("user", std::string("'user' must be a string, got ") + type_name(*u));
    r.user_id = u->get<std::string>();
  }
  return r;
}

json error_json(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

static json reason_or_null(const std::string& s) { return s.empty() ? json(nullptr) : json(s); }

json chat_response(const std::string& id, int64_t created, const std::string& model, const std::string& content,
                   const std::string& reasoning, const std::string& finish_reason, const Usage& usage,
                   const json& tool_calls) {
  json msg = {{"role", "assistant"}, {"content", content}, {"reasoning_content", reason_or_null(reasoning)}};
  if (tool_calls.is_array() && !tool_calls.empty()) {
    msg["tool_calls"] = tool_calls;
    if (content.empty()) msg["content"] = nullptr;
  }
  return {{"id", id},
          {"object", "chat.completion"},
          {"created", created},
          {"model", model},
          {"choices",
           json::array({{{"index", 0}, {"message", msg}, {"logprobs", nullptr}, {"finish_reason", finish_reason}}})},
          {"usage", usage_json(usage)}};
}

json completion_response(const std::string& id, int64_t created, const std::string& model, const std::string& text,
                         const std::string& finish_reason, const Usage& usage) {
  return {{"id", id},
          {"object", "text_completion"},
          {"created", created},
          {"model", model},
          {"choices",
           json::array({{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", finish_reason}}})},
          {"usage", usage_json(usage)}};
}

json chat_chunk(const std::string& id, int64_t created, const std::string& model, const json& delta,
                const std::string& finish_reason) {
  return {{"id", id},
          {"object", "chat.completion.chunk"},
          {"created", created},
          {"model", model},
          {"choices", json::array({{{"index", 0},
                                    {"delta", delta},
                                    {"logprobs", nullptr},
                                    {"finish_reason", reason_or_null(finish_reason)}}})}};
}

json completion_chunk(const std::string& id, int64_t created, const std::string& model, const std::string& text,
                      const std::string& finish_reason) {
  return {
      {"id", id},
      {"object", "text_completion"},
      {"created", created},
      {"model", model},
      {"choices",
       json::array(
           {{{"index", 0}, {"text", text}, {"logprobs", nullptr}, {"finish_reason", reason_or_null(finish_reason)}}})}};
}

json usage_chunk(Endpoint endpoint, const std::string& id, int64_t created, const std::string& model,
                 const Usage& usage) {
  return {{"id", id},
          {"object", endpoint == Endpoint::Chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", json::array()},
          {"usage", usage_json(usage)}};
}

namespace {
// A token's text for logprobs: its bytes when they are UTF-8, else "bytes:\xNN..." (vLLM's form).
std::string token_text(const std::string& b) {
  bool valid = true;
  for (size_t i = 0; i < b.size() && valid;) {
    const unsigned char c = static_cast<unsigned char>(b[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > b.size()) valid = false;
    for (size_t k = 1; k < n && valid; ++k) valid = (static_cast<unsigned char>(b[i + k]) >> 6) == 2;
    i += n ? n : 1;
  }
  if (valid) return b;
  std::string out = "bytes:";
  char buf[8];
  for (unsigned char c : b) {
    std::snprintf(buf, sizeof(buf), "\\x%02x", c);
    out += buf;
  }
  return out;
}
json bytes_of(const std::string& b) {
  json a = json::array();
  for (unsigned char c : b) a.push_back(int(c));
  return a;
}
}  // namespace

json chat_logprobs_json(const std::vector<LogprobEntry>& entries) {
  json content = json::array();
  for (const LogprobEntry& e : entries) {
    json top = json::array();
    for (const auto& [t, lp] : e.top)
      top.push_back({{"token", token_text(t)}, {"logprob", lp}, {"bytes", bytes_of(t)}});
    content.push_back(
        {{"token", token_text(e.token)}, {"logprob", e.logprob}, {"bytes", bytes_of(e.token)}, {"top_logprobs", top}});
  }
  return {{"content", content}};
}

json completion_logprobs_json(const std::vector<LogprobEntry>& entries, size_t text_offset0) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  size_t offset = text_offset0;
  for (const LogprobEntry& e : entries) {
    tokens.push_back(token_text(e.token));
    lps.push_back(e.logprob);
    json top = json::object();
    for (const auto& [t, lp] : e.top) top[token_text(t)] = lp;
    tops.push_back(top);
    offsets.push_back(offset);
    offset += e.token.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

std::string sse_event(const json& j) {
  // Text from the model is valid UTF-8 (the decoder replaces broken bytes); replace, never throw.
  return "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
}

}  // namespace cpinfer::server
