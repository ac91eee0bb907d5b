// The Qwen3 chat template (tokenizer_config.json "chat_template") written out in C++: system
// prompt, tool definitions, turns with reasoning and tool calls, tool results. Tested against
// @huggingface/jinja rendering the template itself (tests/server/chat_template_jinja_test.cpp).
#include <string_view>

#include "core/check.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer {

namespace {

std::string_view lstrip_newlines(std::string_view s) {
  while (!s.empty() && s.front() == '\n') s.remove_prefix(1);
  return s;
}

std::string_view rstrip_newlines(std::string_view s) {
  while (!s.empty() && s.back() == '\n') s.remove_suffix(1);
  return s;
}

// Python's s.split(sep)[0] and s.split(sep)[-1].
std::string_view before_first(std::string_view s, std::string_view sep) {
  const size_t p = s.find(sep);
  return p == std::string_view::npos ? s : s.substr(0, p);
}

std::string_view after_last(std::string_view s, std::string_view sep) {
  const size_t p = s.rfind(sep);
  return p == std::string_view::npos ? s : s.substr(p + sep.size());
}

bool is_tool_response(std::string_view s) {
  return s.starts_with("<tool_response>") && s.ends_with("</tool_response>");
}

}  // namespace

std::string Tokenizer::render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                   bool enable_thinking, const std::vector<std::string>& tools) const {
  const size_t n = messages.size();
  for (size_t i = 0; i < n; ++i) {
    const std::string& role = messages[i].role;
    CPI_CHECK(role == "system" || role == "user" || role == "assistant" || role == "tool", "chat message ", i,
              " has role '", role, "'; the Qwen3 template knows system, user, assistant and tool");
  }
  std::string out;
  if (!tools.empty()) {
    out += "<|im_start|>system\n";
    if (n > 0 && messages[0].role == "system") out += messages[0].content + "\n\n";
    out +=
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
        "function signatures within <tools></tools> XML tags:\n<tools>";
    for (const std::string& t : tools) out += "\n" + t;
    out +=
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n";
  } else if (n > 0 && messages[0].role == "system") {
    out += "<|im_start|>system\n" + messages[0].content + "<|im_end|>\n";
  }

  // The last user turn that is a real query (not a wrapped tool result): assistant turns after it
  // keep their reasoning, earlier ones drop it.
  size_t last_query = n == 0 ? 0 : n - 1;
  for (size_t k = n; k-- > 0;) {
    if (messages[k].role == "user" && !is_tool_response(messages[k].content)) {
      last_query = k;
      break;
    }
  }

  for (size_t i = 0; i < n; ++i) {  // a system message at index 0 was rendered above
    const ChatMessage& m = messages[i];
    if (m.role == "user" || (m.role == "system" && i != 0)) {
      out += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
    } else if (m.role == "assistant") {
      std::string_view content = m.content;
      std::string_view reasoning = m.reasoning_content;
      if (reasoning.empty() && content.find("</think>") != std::string_view::npos) {
        reasoning = lstrip_newlines(after_last(rstrip_newlines(before_first(content, "</think>")), "<think>"));
        content = lstrip_newlines(after_last(content, "</think>"));
      }
      out += "<|im_start|>assistant\n";
      if (i > last_query && (i + 1 == n || !reasoning.empty())) {
        out += "<think>\n";
        out += lstrip_newlines(rstrip_newlines(reasoning));
        out += "\n</think>\n\n";
        out += lstrip_newlines(content);
      } else {
        out += content;
      }
      for (size_t c = 0; c < m.tool_calls.size(); ++c) {
        if (c > 0 || !content.empty()) out += "\n";
        out += "<tool_call>\n{\"name\": \"" + m.tool_calls[c].name + "\", \"arguments\": " + m.tool_calls[c].arguments +
               "}\n</tool_call>";
      }
      out += "<|im_end|>\n";
    } else if (m.role == "tool") {  // consecutive results share one user turn
      if (i == 0 || messages[i - 1].role != "tool") out += "<|im_start|>user";
      out += "\n<tool_response>\n" + m.content + "\n</tool_response>";
      if (i + 1 == n || messages[i + 1].role != "tool") out += "<|im_end|>\n";
    }
  }
  if (add_generation_prompt) {
    out += "<|im_start|>assistant\n";
    if (!enable_thinking) out += "<think>\n\n</think>\n\n";
  }
  return out;
}

}  // namespace cpinfer
