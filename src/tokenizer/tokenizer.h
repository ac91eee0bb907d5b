// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (Qwen2/Qwen3 family) and the
// Qwen3 chat template. Encoding follows Hugging Face `tokenizers`: added tokens are split out
// first, the rest is NFC-normalized, split by the pre-tokenizer regex (PCRE2, Unicode classes),
// mapped to byte-level symbols and merged by rank. Thread-safe: a Tokenizer may be shared by
// threads (the per-word cache is locked); copies share their tables.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace cpinfer {

// One call of an assistant message, as the chat template writes it.
struct ChatToolCall {
  std::string name;
  std::string arguments;  // the text the template inserts: a string argument as is, an object as tojson
};

struct ChatMessage {
  std::string role;  // "system", "user", "assistant" or "tool"
  std::string content;
  std::string reasoning_content;         // assistant only; empty = none (then <think>..</think> in content counts)
  std::vector<ChatToolCall> tool_calls;  // assistant only
};

namespace tok_detail {
struct TokenizerImpl;
}

class Tokenizer {
 public:
  // Reads model_dir/tokenizer.json and, when present, model_dir/tokenizer_config.json (eos/pad
  // token names). Throws cpinfer::Error naming the file when it is missing, not JSON, or
  // describes an unsupported tokenizer (only byte-level BPE is supported).
  static Tokenizer from_dir(const std::string& model_dir);
  static Tokenizer from_file(const std::string& tokenizer_json_path);
  // Same, from the text of a tokenizer.json (source names it in error messages).
  static Tokenizer from_json_string(std::string_view json_text, const std::string& source = "<string>");

  // parse_special=false tokenizes special added tokens (special: true, e.g. <|im_start|>) as
  // plain text; non-special added tokens (e.g. <think>) are always matched, as in HF.
  // Invalid UTF-8 in text is replaced by U+FFFD first (maximal-subpart rule).
  std::vector<int32_t> encode(std::string_view text, bool parse_special = true) const;
  // Bytes of the tokens concatenated; invalid UTF-8 becomes U+FFFD (HF errors="replace").
  // Throws for ids outside [0, vocab_size()); ids in holes of the id space decode to nothing.
  std::string decode(std::span<const int32_t> ids, bool skip_special = false) const;
  // Raw bytes of one token (added tokens: their content); empty for holes and skipped specials.
  std::string token_bytes(int32_t id, bool skip_special = false) const;

  int32_t vocab_size() const;                                     // highest id + 1 incl. added tokens
  std::optional<int32_t> token_id(std::string_view token) const;  // vocab form ("Ġthe") or added token
  bool is_special(int32_t id) const;                              // added token with special: true
  std::optional<int32_t> eos_token_id() const;                    // tokenizer_config.json eos_token
  std::optional<int32_t> pad_token_id() const;                    // tokenizer_config.json pad_token

  // Qwen3 chat template (tokenizer_config.json chat_template, tools omitted):
  // <|im_start|>{role}\n{content}<|im_end|>\n per turn; assistant turns after the last user query
  // keep <think>\n{reasoning}\n</think>\n\n; add_generation_prompt appends <|im_start|>assistant\n,
  // and enable_thinking=false then appends <think>\n\n</think>\n\n.
  // `tools`: each tool definition as the template's `tool | tojson` writes it; empty: no tools.
  std::string render_chat(const std::vector<ChatMessage>& messages, bool add_generation_prompt, bool enable_thinking,
                          const std::vector<std::string>& tools = {}) const;

 private:
  explicit Tokenizer(std::shared_ptr<const tok_detail::TokenizerImpl> impl);
  std::shared_ptr<const tok_detail::TokenizerImpl> impl_;
};

// Incremental detokenization for streaming: push() returns only complete UTF-8 text, holding back
// a multi-byte character split across tokens until its last byte arrives. Bytes that can never
// become valid are emitted as U+FFFD at once. The concatenation of all push() results and flush()
// equals tok.decode(all ids, skip_special).
class StreamDecoder {
 public:
  // tok must outlive the decoder.
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = false);
  std::string push(int32_t id);  // newly complete text (may be empty)
  std::string flush();           // whatever is left (an incomplete tail as U+FFFD); resets

 private:
  std::string take_complete(bool final);
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;  // bytes not yet returned
};

}  // namespace cpinfer
