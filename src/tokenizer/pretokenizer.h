// Pre-tokenizer: splits normalized text into words before BPE, as tokenizer.json's
// "pre_tokenizer" says. Supported: Split (Regex or String pattern, behavior Isolated or Removed),
// ByteLevel (optionally with the GPT-2 regex and add_prefix_space), and Sequence of these.
// Regexes run on PCRE2 with UTF + UCP so \p{L}, \p{N}, \s and (?!\S) are Unicode-aware.
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace cpinfer::tok_detail {

class Regex;  // a compiled PCRE2 pattern (pretokenizer.cpp)

class PreTokenizer {
 public:
  // j: tokenizer.json "pre_tokenizer" (null = the whole text is one word).
  static PreTokenizer from_json(const nlohmann::json& j, const std::string& source);
  PreTokenizer();
  ~PreTokenizer();
  PreTokenizer(PreTokenizer&&) noexcept;
  PreTokenizer& operator=(PreTokenizer&&) noexcept;

  // Splits valid UTF-8 text into non-empty words (appended to words).
  void split(std::string_view text, std::vector<std::string>& words) const;

 private:
  struct Step {
    enum class Kind { kSplit, kPrefixSpace } kind;
    std::shared_ptr<const Regex> regex;
    bool remove_matches = false;  // Split behavior "Removed"
  };
  std::vector<Step> steps_;
};

}  // namespace cpinfer::tok_detail
