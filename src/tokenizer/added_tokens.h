// Added tokens (tokenizer.json "added_tokens"): split out of the text before normalization and
// BPE, leftmost-longest like HF's Aho-Corasick matcher, honoring lstrip/rstrip/single_word.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace cpinfer::tok_detail {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool single_word = false;
  bool lstrip = false;      // absorb whitespace on the left
  bool rstrip = false;      // absorb whitespace on the right
  bool normalized = false;  // matched on normalized text (else on the raw input)
  bool special = false;
};

struct Segment {
  size_t begin, end;  // byte range in the text passed to split()
  int32_t token_id;   // the added token, or -1 for plain text
};

class AddedTokenMatcher {
 public:
  // tokens: those of one pass (all normalized or all not); empty contents are ignored.
  explicit AddedTokenMatcher(std::vector<AddedToken> tokens = {});
  bool empty() const { return tokens_.empty(); }

  // Splits text into plain and added-token segments. With parse_special=false special tokens
  // are left in the text. Whitespace absorbed by lstrip/rstrip belongs to no segment.
  void split(std::string_view text, bool parse_special, std::vector<Segment>& out) const;

 private:
  std::vector<AddedToken> tokens_;              // sorted longest first
  std::vector<std::vector<uint32_t>> by_byte_;  // first byte -> indices into tokens_
};

}  // namespace cpinfer::tok_detail
