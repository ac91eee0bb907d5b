// Fuzzes the real Qwen3 tokenizer (loaded once from $CPINFER_TOKENIZER_DIR, default
// <repo>/build/qwen3-tokenizer): encode of arbitrary bytes (valid UTF-8 or not), decode of the
// result (must round-trip valid UTF-8 text), decode of fuzzed in-range id sequences, and
// StreamDecoder agreeing with decode(). The first input byte picks the mode.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"

namespace {

const cpinfer::Tokenizer& qwen3() {
  static const std::unique_ptr<cpinfer::Tokenizer> tok = [] {
    const char* env = std::getenv("CPINFER_TOKENIZER_DIR");
    std::string dir = env && *env ? env : std::string(CPINFER_SOURCE_DIR) + "/build/qwen3-tokenizer";
    try {
      return std::make_unique<cpinfer::Tokenizer>(cpinfer::Tokenizer::from_dir(dir));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "fuzz_tokenizer: cannot load the Qwen3 tokenizer from %s (set CPINFER_TOKENIZER_DIR): %s\n",
                   dir.c_str(), e.what());
      std::exit(2);
    }
  }();
  return *tok;
}

bool valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (size_t k = 1; k < n; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
      return false;
    i += n;
  }
  return true;
}

void check_stream(const cpinfer::Tokenizer& tok, const std::vector<int32_t>& ids, bool skip_special) {
  const std::string all = tok.decode(ids, skip_special);
  cpinfer::StreamDecoder sd(tok, skip_special);
  std::string streamed;
  for (int32_t id : ids) {
    std::string piece = sd.push(id);
    if (!valid_utf8(piece)) cpinfer::fuzz::report_bug("StreamDecoder::push returned invalid UTF-8", "StreamDecoder");
    streamed += piece;
  }
  streamed += sd.flush();
  if (streamed != all) cpinfer::fuzz::report_bug("StreamDecoder output differs from decode()", "StreamDecoder");
  if (!valid_utf8(all)) cpinfer::fuzz::report_bug("decode() returned invalid UTF-8", "Tokenizer");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  qwen3();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const cpinfer::Tokenizer& tok = qwen3();
  const uint8_t mode = data[0];
  ++data;
  --size;
  cpinfer::fuzz::run_expecting_errors([&] {
    if (mode % 2 == 0) {
      // Text -> ids -> text.
      std::string_view text(reinterpret_cast<const char*>(data), size);
      const bool special = (mode & 2) != 0;
      std::vector<int32_t> ids = tok.encode(text, special);
      for (int32_t id : ids)
        if (id < 0 || id >= tok.vocab_size()) cpinfer::fuzz::report_bug("encode() id out of range", "Tokenizer");
      std::string back = tok.decode(ids);
      // Byte-level BPE is lossless for valid UTF-8 without special tokens (NFC may recompose, so
      // only compare when the text is already NFC-stable: ASCII is).
      bool ascii = true;
      for (char c : text) ascii &= static_cast<unsigned char>(c) < 0x80;
      if (ascii && !special && back != text) cpinfer::fuzz::report_bug("ASCII text does not round-trip", "Tokenizer");
      check_stream(tok, ids, (mode & 4) != 0);
    } else {
      // Ids (3 bytes each, reduced into range) -> text, both decode paths.
      const uint32_t vocab = static_cast<uint32_t>(tok.vocab_size());
      std::vector<int32_t> ids;
      for (size_t i = 0; i + 3 <= size && ids.size() < 2048; i += 3) {
        uint32_t v = data[i] | (data[i + 1] << 8) | (static_cast<uint32_t>(data[i + 2]) << 16);
        ids.push_back(static_cast<int32_t>(v % vocab));
      }
      check_stream(tok, ids, (mode & 2) != 0);
      for (int32_t id : ids) (void)tok.token_bytes(id, (mode & 2) != 0);
    }
  });
  return 0;
}
