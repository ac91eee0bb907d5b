// Streaming text post-processing of one request's output: stop strings (the output ends before
// the first occurrence, which is not returned) and the Qwen3 reasoning split (text between <think>
// and </think> is reasoning_content, the rest content). Both hold back only the few bytes that
// could still grow into a stop string or a tag, so streaming equals non-streaming.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "engine/stop.h"

namespace cpinfer::server {

// Stop strings: one matcher for generate and serve (engine/stop.h).
using cpinfer::StopMatcher;

struct SplitText {
  std::string reasoning;
  std::string content;
};

// Qwen3 reasoning parser: "<think>" opens reasoning, "</think>" closes it; the newlines around the
// tags that the chat template puts there are dropped. Text before any <think> is content.
class ReasoningSplitter {
 public:
  // starts_in_reasoning: the prompt already opened <think> (e.g. a template that forces it).
  explicit ReasoningSplitter(bool starts_in_reasoning = false) : in_reasoning_(starts_in_reasoning) {}
  SplitText push(const std::string& piece);
  SplitText flush();

 private:
  void emit(SplitText& out, const std::string& s);
  std::string pending_;
  bool in_reasoning_ = false;
  bool strip_leading_newlines_ = false;  // just after a tag
};

}  // namespace cpinfer::server
