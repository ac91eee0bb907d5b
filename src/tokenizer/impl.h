// Internal: the tables behind cpinfer::Tokenizer (shared, immutable after loading).
#pragma once
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/pretokenizer.h"

namespace cpinfer::tok_detail {

struct TokenizerImpl {
  std::string source;  // file name for messages
  BpeModel bpe;
  PreTokenizer pre;
  bool nfc = false;                    // normalizer is NFC (else none)
  AddedTokenMatcher raw_added;         // normalized=false tokens, matched on the input
  AddedTokenMatcher normalized_added;  // normalized=true tokens, matched after NFC
  std::unordered_map<std::string, int32_t> added_by_content;
  std::unordered_map<int32_t, AddedToken> added_by_id;
  int32_t vocab_size = 0;
  std::optional<int32_t> eos_id, pad_id;
};

}  // namespace cpinfer::tok_detail
