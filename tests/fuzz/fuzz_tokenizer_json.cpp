// Fuzzes tokenizer.json loading (Tokenizer::from_json_string) on small inputs; when a file is
// accepted, exercises the loaded tokenizer: encode of a fixed text with and without special
// tokens, decode of the result, token_bytes of the first ids, StreamDecoder over the ids.
#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  cpinfer::fuzz::run_expecting_errors([&] {
    cpinfer::Tokenizer tok = cpinfer::Tokenizer::from_json_string(text, "fuzz/tokenizer.json");
    const int32_t vocab = tok.vocab_size();
    if (vocab <= 0) cpinfer::fuzz::report_bug("vocab_size() <= 0 after a successful load", "Tokenizer");
    const std::string sample =
        "Hello, world! 123 <|im_start|>user\n\xc3\xa9t\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd<think>x</think>";
    for (bool special : {true, false}) {
      std::vector<int32_t> ids = tok.encode(sample, special);
      for (int32_t id : ids)
        if (id < 0 || id >= vocab)
          cpinfer::fuzz::report_bug("encode() produced an id outside [0, vocab_size)", "Tokenizer");
      std::string all = tok.decode(ids);
      cpinfer::StreamDecoder sd(tok);
      std::string streamed;
      for (int32_t id : ids) streamed += sd.push(id);
      streamed += sd.flush();
      if (streamed != all) cpinfer::fuzz::report_bug("StreamDecoder output differs from decode()", "StreamDecoder");
      (void)tok.decode(ids, /*skip_special=*/true);
    }
    for (int32_t id = 0; id < std::min(vocab, 512); ++id) {
      (void)tok.token_bytes(id);
      (void)tok.is_special(id);
    }
    (void)tok.token_id("a");
    (void)tok.token_id("<|im_start|>");
  });
  return 0;
}
