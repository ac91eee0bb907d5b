// UTF-8 helpers for the tokenizer: validation with the Unicode "maximal subpart" rule (the one
// Rust's from_utf8_lossy and WHATWG use, so our U+FFFD count matches Hugging Face decoding),
// NFC through utf8proc, and the few character classes the added-token matcher needs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace cpinfer::utf8 {

inline constexpr std::string_view kReplacement = "\xEF\xBF\xBD";  // U+FFFD

enum class SeqKind { kValid, kInvalid, kIncomplete };

struct Seq {
  SeqKind kind;
  size_t len;       // bytes: the sequence (kValid), the maximal invalid subpart (kInvalid, >= 1),
                    // or the bytes present of a truncated but so far valid prefix (kIncomplete)
  char32_t cp = 0;  // the code point when kValid
};

// Classifies the bytes starting at s[pos] (pos < s.size()).
Seq next_seq(std::string_view s, size_t pos);

// True when s is entirely well-formed UTF-8.
bool is_valid(std::string_view s);

// Replaces every maximal invalid subpart (and a truncated tail) by U+FFFD.
std::string sanitize(std::string_view s);

// Appends the UTF-8 encoding of cp.
void append(std::string& out, char32_t cp);

// NFC of valid UTF-8 (utf8proc, Unicode 15). Pure ASCII returns a copy without a library call.
std::string nfc(std::string_view s);

// Decodes the code point that ends at s[end - 1] (valid UTF-8 assumed); returns its start in *start.
char32_t prev_cp(std::string_view s, size_t end, size_t* start);

// Character classes as Rust's char methods define them (used for added-token lstrip/rstrip and
// single_word, which Hugging Face implements with char::is_whitespace / is_alphanumeric).
bool is_whitespace(char32_t cp);
bool is_word_char(char32_t cp);  // alphanumeric or '_'

}  // namespace cpinfer::utf8
