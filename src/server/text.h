// Streaming text post-processing of one request's output: stop strings (the output ends before
// the first occurrence, which is not returned) and the Qwen3 reasoning split (text between <think>
// and </think> is reasoning_content, the rest content). Both hold back only the few bytes that
// could still grow into a stop string or a tag, so streaming equals non-streaming.
#pragma once
#include <string>
#include <utility>
#include <vector>

namespace cpinfer::server {

class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {}
  // Appends piece; returns the text now safe to emit. After a stop string was found, stopped()
  // is true and later pushes return nothing.
  std::string push(const std::string& piece);
  // End of output: whatever was held back (nothing after a stop).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // text not yet emitted (a possible prefix of a stop string)
  bool stopped_ = false;
};

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
