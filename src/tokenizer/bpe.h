// Byte-level BPE model: the GPT-2 byte<->symbol alphabet, vocab and merge ranks from
// tokenizer.json "model", and the merge loop over one pre-tokenized word (with a word cache).
#pragma once
#include <nlohmann/json_fwd.hpp>

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace cpinfer::tok_detail {

// GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes map
// to U+0100.. in byte order (so ' ' is 'Ġ' U+0120 and '\n' is 'Ċ' U+010A).
const std::array<char32_t, 256>& byte_to_symbol();
// Inverse: -1 when cp is not a byte-level symbol.
int byte_of_symbol(char32_t cp);
// Byte-level symbol string (UTF-8) -> raw bytes; false when some character is not a symbol.
bool symbols_to_bytes(std::string_view symbols, std::string* bytes);

class BpeModel {
 public:
  // model: the tokenizer.json "model" object. source names the file in errors.
  static BpeModel from_json(const nlohmann::json& model, const std::string& source);

  // Appends the ids of one pre-tokenized word given as raw bytes (non-empty).
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  // Raw bytes of vocab id (empty for ids not in the vocab).
  const std::string& id_bytes(int32_t id) const;
  std::optional<int32_t> id_of_bytes(std::string_view bytes) const;
  // Lookup by the vocab's own spelling ("Ġthe").
  std::optional<int32_t> id_of_token(std::string_view token) const;
  int32_t max_id() const { return max_id_; }

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // id of the merged token
  };
  struct Cache {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>> words;
  };
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;
  const Merge* find_merge(int32_t a, int32_t b) const;

  // Keys view the strings in id_to_bytes_, which is sized once and never reallocated (moving the
  // vector keeps its elements in place); BpeModel is move-only so the views stay valid.
  std::vector<std::string> id_to_bytes_;
  std::unordered_map<std::string_view, int32_t> bytes_to_id_;
  std::unordered_map<std::string, int32_t> unmappable_;  // vocab keys that are not byte-level symbols
  std::unordered_map<uint64_t, Merge> merges_;           // key: (id_a << 32) | id_b
  std::array<int32_t, 256> byte_ids_{};
  bool ignore_merges_ = false;
  int32_t max_id_ = -1;
  std::unique_ptr<Cache> cache_ = std::make_unique<Cache>();
};

}  // namespace cpinfer::tok_detail
