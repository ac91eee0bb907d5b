#include "engine/stop.h"

#include <algorithm>
#include <string_view>

namespace cpinfer {

namespace {
// Length of the longest suffix of text that is a proper prefix of word.
size_t partial_suffix(std::string_view text, std::string_view word) {
  for (size_t k = std::min(word.size() - 1, text.size()); k > 0; --k)
    if (text.substr(text.size() - k) == word.substr(0, k)) return k;
  return 0;
}
}  // namespace

std::vector<int32_t> stop_token_ids(const std::vector<int32_t>& extra, const ModelConfig& cfg, bool ignore_eos) {
  std::vector<int32_t> ids = extra;
  if (!ignore_eos) ids.insert(ids.end(), cfg.eos_token_ids.begin(), cfg.eos_token_ids.end());
  return ids;
}

StopMatcher::StopMatcher(std::vector<std::string> stops) {
  for (std::string& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

std::string StopMatcher::push(const std::string& piece) {
  if (stopped_) return {};
  pending_ += piece;
  size_t first = std::string::npos;
  for (const auto& s : stops_) first = std::min(first, pending_.find(s));
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  size_t hold = 0;
  for (const auto& s : stops_) hold = std::max(hold, partial_suffix(pending_, s));
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopMatcher::flush() {
  std::string out = stopped_ ? std::string() : pending_;
  pending_.clear();
  return out;
}

}  // namespace cpinfer
