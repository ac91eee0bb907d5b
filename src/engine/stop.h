// When generation stops, in one place for `generate` and `serve`: stop token ids (the request's
// plus the model's EOS ids) and stop strings over the streamed text (the output ends before the
// first occurrence, which is not returned). The matcher holds back only the bytes that could still
// grow into a stop string, so streaming equals non-streaming.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "loader/config.h"

namespace cpinfer {

// `extra` followed by the model's EOS ids (unless ignore_eos).
std::vector<int32_t> stop_token_ids(const std::vector<int32_t>& extra, const ModelConfig& cfg, bool ignore_eos);

class StopMatcher {
 public:
  // Empty strings are ignored.
  explicit StopMatcher(std::vector<std::string> stops);
  // Appends piece; returns the text now safe to emit. After a stop string was found (the earliest
  // occurrence of any of them), stopped() is true and later pushes return nothing.
  std::string push(const std::string& piece);
  // End of output: whatever was held back (nothing after a stop).
  std::string flush();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // text not yet emitted (a possible prefix of a stop string)
  bool stopped_ = false;
};

}  // namespace cpinfer
