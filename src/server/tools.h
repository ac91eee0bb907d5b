// Tool calling (OpenAI `tools`, `tool_choice`, assistant `tool_calls`, `role: "tool"`) for Qwen3's
// Hermes-style format: the chat template lists the tools as JSON inside <tools></tools>, and the
// model answers with <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks, which are
// parsed back into OpenAI tool_calls (whole, or streamed as one delta per call).
//
// tool_choice without constrained decoding: "none" leaves the tools out of the prompt (as SGLang
// does) and parses nothing; "required" and a named function start the assistant turn with an empty
// think block (the server adds it) and "<tool_call>\n" (named: also `{"name": "<name>",
// "arguments": `), so the model continues inside a call; "auto" lets the model choose.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace cpinfer::server {

// JSON text as the `tojson` filter of @huggingface/jinja writes it (the reference renderer of
// chat templates): ", " and ": " separators, keys in the order given, strings as JSON.stringify
// escapes them (non-ASCII kept), numbers as JavaScript prints them.
std::string jinja_tojson(const nlohmann::ordered_json& v);

struct ToolChoice {
  enum class Kind { Auto, None, Required, Named } kind = Kind::Auto;
  std::string name;  // Named
};

struct ToolCall {
  std::string name;
  std::string arguments;  // JSON text of the arguments object
};

// The text the prompt ends with for this tool_choice (after the generation prompt); the output
// parser is fed the same text first, so that the model's continuation completes the call.
std::string forced_tool_prefix(const ToolChoice& choice);

// Splits model output (the content part, after reasoning) into plain content and tool calls.
// push() holds back only what could still be the start of "<tool_call>" or an unfinished call, so
// the concatenated results of push()...flush() do not depend on how the text was cut.
class ToolCallParser {
 public:
  struct Out {
    std::string content;
    std::vector<ToolCall> calls;
  };
  Out push(std::string_view text);
  // End of output: an unclosed call that is complete JSON counts as a call, else as content.
  Out flush();
  bool saw_call() const { return n_calls_ > 0; }

 private:
  void finish_call(Out& out, bool closed);
  std::string pending_;   // held-back text
  bool in_call_ = false;  // after <tool_call>, collecting until </tool_call>
  int n_calls_ = 0;
};

// OpenAI tool_calls entries for a message (index omitted) or a stream delta (index from
// first_index on); ids are "call_" + the given ids.
nlohmann::json tool_calls_json(const std::vector<ToolCall>& calls, const std::vector<std::string>& ids, int first_index,
                               bool with_index);

}  // namespace cpinfer::server
