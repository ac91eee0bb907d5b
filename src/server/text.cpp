#include "server/text.h"

#include <algorithm>
#include <string_view>

namespace cpinfer::server {

namespace {
// Length of the longest suffix of text that is a proper prefix of word.
size_t partial_suffix(std::string_view text, std::string_view word) {
  for (size_t k = std::min(word.size() - 1, text.size()); k > 0; --k)
    if (text.substr(text.size() - k) == word.substr(0, k)) return k;
  return 0;
}
constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
}  // namespace

void ReasoningSplitter::emit(SplitText& out, const std::string& s) {
  std::string_view v = s;
  if (strip_leading_newlines_) {
    size_t n = v.find_first_not_of('\n');
    v = n == std::string_view::npos ? std::string_view() : v.substr(n);
    if (!v.empty()) strip_leading_newlines_ = false;
  }
  (in_reasoning_ ? out.reasoning : out.content) += v;
}

SplitText ReasoningSplitter::push(const std::string& piece) {
  SplitText out;
  pending_ += piece;
  for (;;) {
    std::string_view tag = in_reasoning_ ? kThinkClose : kThinkOpen;
    size_t at = pending_.find(tag);
    if (at == std::string::npos) break;
    std::string before = pending_.substr(0, at);
    // The template writes "\n</think>\n\n": the newline before the closing tag is not reasoning.
    if (in_reasoning_)
      while (!before.empty() && before.back() == '\n') before.pop_back();
    emit(out, before);
    pending_.erase(0, at + tag.size());
    in_reasoning_ = !in_reasoning_;
    strip_leading_newlines_ = true;
  }
  size_t hold = partial_suffix(pending_, in_reasoning_ ? kThinkClose : kThinkOpen);
  if (in_reasoning_) {
    // Trailing newlines may precede </think>: hold them until we know.
    size_t keep = pending_.size() - hold;
    while (keep > 0 && pending_[keep - 1] == '\n') --keep;
    hold = pending_.size() - keep;
  }
  emit(out, pending_.substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return out;
}

SplitText ReasoningSplitter::flush() {
  SplitText out;
  emit(out, pending_);
  pending_.clear();
  return out;
}

}  // namespace cpinfer::server
