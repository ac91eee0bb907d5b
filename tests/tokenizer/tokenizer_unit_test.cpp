// Tokenizer unit tests on tiny synthetic tokenizer.json files: BPE merge order, added tokens,
// byte-level round trips, streaming detokenization, NFC, and clear errors for bad files.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <unistd.h>

#include "core/check.h"
#include "tokenizer/bpe.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace cpinfer {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

// The Qwen2/Qwen3 split regex, as tokenizer.json spells it.
constexpr const char* kQwenRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

// Byte-level spelling of raw bytes (" a" -> "Ġa").
std::string sym(std::string_view bytes) {
  std::string out;
  for (unsigned char b : bytes) utf8::append(out, tok_detail::byte_to_symbol()[b]);
  return out;
}

// Vocab: id b = byte b for all 256 bytes, then `extra` (raw bytes) from 256 on.
// merges are raw-byte pairs; added tokens are given as JSON.
json make_tokenizer(const std::vector<std::string>& extra,
                    const std::vector<std::pair<std::string, std::string>>& merges, json added = json::array(),
                    json normalizer = nullptr, bool qwen_split = true) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[sym(std::string(1, static_cast<char>(b)))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[sym(extra[i])] = 256 + static_cast<int>(i);
  json jm = json::array();
  for (const auto& [a, b] : merges) jm.push_back(sym(a) + " " + sym(b));
  json pre = nullptr;
  if (qwen_split) {
    pre = {
        {"type", "Sequence"},
        {"pretokenizers",
         json::array(
             {{{"type", "Split"}, {"pattern", {{"Regex", kQwenRegex}}}, {"behavior", "Isolated"}, {"invert", false}},
              {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}}})}};
  }
  return {{"version", "1.0"},
          {"added_tokens", added},
          {"normalizer", normalizer},
          {"pre_tokenizer", pre},
          {"decoder", {{"type", "ByteLevel"}}},
          {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", jm}}}};
}

Tokenizer load(const json& j) { return Tokenizer::from_json_string(j.dump(), "test-tokenizer.json"); }

json added_token(int id, const std::string& content, bool special, json flags = json::object()) {
  json t = {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
            {"rstrip", false}, {"normalized", false}, {"special", special}};
  for (auto& [k, v] : flags.items()) t[k] = v;
  return t;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a cpinfer::Error> ") + e.what();
  }
  return "<no error>";
}

#define EXPECT_ERROR_HAS(expr, needle)                                        \
  do {                                                                        \
    const std::string msg_ = error_of([&] { (void)(expr); });                 \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "error was: " << msg_; \
    EXPECT_EQ(msg_.find("<no error>"), std::string::npos);                    \
  } while (0)

TEST(TokenizerBpe, MergeRankDecidesOrder) {
  // "abc": with (b,c) ranked first the result is a|bc; with (a,b) first it is ab|c.
  const Tokenizer bc_first = load(make_tokenizer({"bc", "ab"}, {{"b", "c"}, {"a", "b"}}));
  EXPECT_EQ(bc_first.encode("abc"), (Ids{'a', 256}));
  const Tokenizer ab_first = load(make_tokenizer({"bc", "ab"}, {{"a", "b"}, {"b", "c"}}));
  EXPECT_EQ(ab_first.encode("abc"), (Ids{257, 'c'}));
  // A later merge builds on an earlier one.
  const Tokenizer chain = load(make_tokenizer({"bc", "abc"}, {{"b", "c"}, {"a", "bc"}}));
  EXPECT_EQ(chain.encode("abc"), (Ids{257}));
  EXPECT_EQ(chain.encode("abcabc"), (Ids{257, 257}));
}

TEST(TokenizerBpe, EqualRanksMergeLeftmostFirst) {
  const Tokenizer tok = load(make_tokenizer({"aa", "aaaa"}, {{"a", "a"}, {"aa", "aa"}}));
  EXPECT_EQ(tok.encode("aaa"), (Ids{256, 'a'}));
  EXPECT_EQ(tok.encode("aaaaa"), (Ids{257, 'a'}));
  EXPECT_EQ(tok.encode("aaaaaa"), (Ids{257, 256}));
}

TEST(TokenizerBpe, MergesAcceptPairArrays) {
  json j = make_tokenizer({"bc"}, {});
  j["model"]["merges"] = json::array({json::array({"b", "c"})});
  EXPECT_EQ(load(j).encode("abc"), (Ids{'a', 256}));
}

TEST(TokenizerBpe, PreTokenizerSplitsBeforeMerging) {
  // The space joins the following letters as in Qwen ("Ġbc" is one word), so (" ", "b") wins
  // there, while the first "bc" is a word of its own.
  const Tokenizer tok = load(make_tokenizer({" b", "bc"}, {{" ", "b"}, {"b", "c"}}));
  EXPECT_EQ(tok.encode("bc bc"), (Ids{257, 256, 'c'}));
  // Digits are split one by one, newlines stay apart from letters.
  EXPECT_EQ(tok.encode("12\n"), (Ids{'1', '2', '\n'}));
  EXPECT_EQ(tok.decode(tok.encode("bc bc")), "bc bc");
}

TEST(TokenizerBpe, WordCacheGivesSameResult) {
  const Tokenizer tok = load(make_tokenizer({"bc", "abc"}, {{"b", "c"}, {"a", "bc"}}));
  const Ids first = tok.encode("abc abc abc");
  EXPECT_EQ(tok.encode("abc abc abc"), first);
  EXPECT_EQ(first, (Ids{257, ' ', 257, ' ', 257}));
}

TEST(TokenizerAdded, SpecialTokensSplitFirstLongestMatch) {
  json added = json::array(
      {added_token(300, "<|im_start|>", true), added_token(301, "<|im", true), added_token(302, "<think>", false)});
  const Tokenizer tok = load(make_tokenizer({}, {}, added));
  EXPECT_EQ(tok.vocab_size(), 303);
  EXPECT_EQ(tok.encode("a<|im_start|>b"), (Ids{'a', 300, 'b'}));
  EXPECT_EQ(tok.encode("<|im"), (Ids{301}));
  EXPECT_EQ(tok.encode("<think>x"), (Ids{302, 'x'}));
  EXPECT_TRUE(tok.is_special(300));
  EXPECT_FALSE(tok.is_special(302));
  EXPECT_FALSE(tok.is_special('a'));
  EXPECT_EQ(tok.token_id("<|im_start|>"), 300);
  EXPECT_EQ(tok.token_id("Ġ"), ' ');
  EXPECT_EQ(tok.token_id("nope"), std::nullopt);
  // parse_special=false: special tokens are plain text, non-special added tokens still match.
  const Ids plain = tok.encode("<|im_start|><think>", false);
  EXPECT_EQ(plain.back(), 302);
  EXPECT_EQ(plain.size(), 13u);
  EXPECT_EQ(tok.decode(plain), "<|im_start|><think>");
  // Decoding: specials keep their text unless skipped.
  EXPECT_EQ(tok.decode(Ids{'a', 300, 302}), "a<|im_start|><think>");
  EXPECT_EQ(tok.decode(Ids{'a', 300, 302}, true), "a<think>");
}

TEST(TokenizerAdded, LstripRstripAbsorbWhitespace) {
  json added = json::array(
      {added_token(300, "[L]", true, {{"lstrip", true}}), added_token(301, "[R]", true, {{"rstrip", true}})});
  const Tokenizer tok = load(make_tokenizer({}, {}, added));
  EXPECT_EQ(tok.encode("a  [L] b"), (Ids{'a', 300, ' ', 'b'}));
  EXPECT_EQ(tok.encode("a [R]  b"), (Ids{'a', ' ', 301, 'b'}));
}

TEST(TokenizerAdded, SingleWordNeedsWordBoundaries) {
  json added = json::array({added_token(300, "ab", false, {{"single_word", true}})});
  const Tokenizer tok = load(make_tokenizer({}, {}, added));
  EXPECT_EQ(tok.encode("ab"), (Ids{300}));
  EXPECT_EQ(tok.encode("x ab."), (Ids{'x', ' ', 300, '.'}));
  EXPECT_EQ(tok.encode("xab"), (Ids{'x', 'a', 'b'}));
  EXPECT_EQ(tok.encode("ab_"), (Ids{'a', 'b', '_'}));
}

TEST(TokenizerAdded, NormalizedTokensMatchAfterNfc) {
  // "é" as a normalized added token matches the decomposed input e + U+0301 after NFC; a
  // non-normalized one would have to match the raw bytes.
  json added = json::array({added_token(300, "\u00e9", false, {{"normalized", true}})});
  const Tokenizer tok = load(make_tokenizer({}, {}, added, {{"type", "NFC"}}));
  EXPECT_EQ(tok.encode("e\u0301"), (Ids{300}));
  EXPECT_EQ(tok.encode("\u00e9"), (Ids{300}));
  // The token's own content is normalized before matching, and decodes as written.
  json decomposed = json::array({added_token(301, "o\u0308", false, {{"normalized", true}})});
  const Tokenizer tok2 = load(make_tokenizer({}, {}, decomposed, {{"type", "NFC"}}));
  EXPECT_EQ(tok2.encode("\u00f6"), (Ids{301}));
  EXPECT_EQ(tok2.decode(Ids{301}), "o\u0308");
}

TEST(TokenizerNormalize, NfcBeforeBpe) {
  const Tokenizer nfc = load(make_tokenizer({}, {}, json::array(), {{"type", "NFC"}}));
  EXPECT_EQ(nfc.encode("e\u0301"), nfc.encode("\u00e9"));
  EXPECT_EQ(nfc.decode(nfc.encode("A\u030A \u212B")), "\u00c5 \u00c5");  // Å, and the Angstrom sign
  const Tokenizer none = load(make_tokenizer({}, {}));
  EXPECT_EQ(none.decode(none.encode("e\u0301")), "e\u0301");
  EXPECT_EQ(utf8::nfc("\u1100\u1161"), "\uac00");  // Hangul jamo compose
}

TEST(TokenizerBytes, EveryByteRoundTrips) {
  const Tokenizer tok = load(make_tokenizer({}, {}));
  for (int b = 0; b < 256; ++b) EXPECT_EQ(tok.token_bytes(b), std::string(1, static_cast<char>(b))) << b;
  // Random valid UTF-8 (all sequence lengths, controls, NUL) survives encode/decode exactly.
  std::mt19937 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    std::string s;
    const int n = static_cast<int>(rng() % 40);
    for (int i = 0; i < n; ++i) {
      char32_t cp;
      switch (rng() % 4) {
        case 0:
          cp = rng() % 0x80;
          break;
        case 1:
          cp = 0x80 + rng() % 0x780;
          break;
        case 2:
          cp = 0x800 + rng() % 0xF800;
          break;
        default:
          cp = 0x10000 + rng() % 0x100000;
          break;
      }
      if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
      utf8::append(s, cp);
    }
    ASSERT_EQ(tok.decode(tok.encode(s)), s) << "iteration " << iter;
  }
}

TEST(TokenizerBytes, InvalidUtf8BecomesReplacementChar) {
  const Tokenizer tok = load(make_tokenizer({}, {}));
  EXPECT_EQ(tok.encode("a\xff"
                       "b"),
            tok.encode("a\uFFFD"
                       "b"));
  EXPECT_EQ(tok.decode(tok.encode("\xe4\xb8")), "\uFFFD");  // truncated 3-byte sequence
  EXPECT_EQ(tok.decode(Ids{0xE4, 0xB8, 'a'}),
            "\uFFFD"
            "a");                                                      // one U+FFFD per maximal subpart
  EXPECT_EQ(tok.decode(Ids{0xC0, 0x80}), "\uFFFD\uFFFD");              // overlong: both bytes invalid
  EXPECT_EQ(tok.decode(Ids{0xED, 0xA0, 0x80}), "\uFFFD\uFFFD\uFFFD");  // surrogate
}

TEST(TokenizerBytes, RandomBytesNeverCrash) {
  // Arbitrary bytes (mostly invalid UTF-8) through a tokenizer with the Qwen regex, NFC and added
  // tokens: encoding succeeds, ids are in range, and decoding gives back the sanitized NFC text.
  json added = json::array({added_token(300, "<|s|>", true)});
  const Tokenizer tok = load(make_tokenizer({"bc"}, {{"b", "c"}}, added, {{"type", "NFC"}}));
  std::mt19937 rng(3);
  const std::string alphabet =
      std::string("abc <|s>\n\r\t'") + "\xc3\xa9\xcc\x81\xe4\xb8\x80\xf0\x9f\x98\x80\xff\xc0\x80";
  for (int iter = 0; iter < 500; ++iter) {
    std::string s;
    for (int i = 0, n = static_cast<int>(rng() % 64); i < n; ++i)
      s.push_back(rng() % 3 ? alphabet[rng() % alphabet.size()] : static_cast<char>(rng() % 256));
    const Ids ids = tok.encode(s);
    for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
    const std::string back = tok.decode(ids);
    ASSERT_TRUE(utf8::is_valid(back));
    if (s.find("<|s|>") == std::string::npos) ASSERT_EQ(back, utf8::nfc(utf8::sanitize(s))) << "iteration " << iter;
  }
}

TEST(TokenizerStream, HoldsBackSplitCharacters) {
  const Tokenizer tok = load(make_tokenizer({}, {}));
  StreamDecoder sd(tok);
  EXPECT_EQ(sd.push('h'), "h");
  EXPECT_EQ(sd.push(0xC3), "");  // first byte of é
  EXPECT_EQ(sd.push(0xA9), "\u00e9");
  // 😀 = F0 9F 98 80, one byte per token.
  EXPECT_EQ(sd.push(0xF0), "");
  EXPECT_EQ(sd.push(0x9F), "");
  EXPECT_EQ(sd.push(0x98), "");
  EXPECT_EQ(sd.push(0x80), "\U0001F600");
  EXPECT_EQ(sd.push(0xFF), "\uFFFD");  // never valid: out at once
  EXPECT_EQ(sd.push(0xE4), "");
  EXPECT_EQ(sd.push('x'),
            "\uFFFD"
            "x");  // the pending lead byte became invalid
  EXPECT_EQ(sd.push(0xE4), "");
  EXPECT_EQ(sd.flush(), "\uFFFD");  // truncated tail
  EXPECT_EQ(sd.flush(), "");
}

TEST(TokenizerStream, ConcatenationEqualsDecode) {
  json added = json::array({added_token(400, "<|end|>", true)});
  const Tokenizer tok = load(make_tokenizer({"\xe4\xb8", "\x80\xf0"}, {{"\xe4", "\xb8"}}, added));
  std::mt19937 rng(11);
  for (int iter = 0; iter < 200; ++iter) {
    Ids ids;
    const int n = static_cast<int>(rng() % 30);
    for (int i = 0; i < n; ++i) {
      const uint32_t r = rng() % 10;
      ids.push_back(r == 0 ? 400 : r == 1 ? 256 + static_cast<int32_t>(rng() % 2) : static_cast<int32_t>(rng() % 256));
    }
    for (bool skip : {false, true}) {
      StreamDecoder sd(tok, skip);
      std::string streamed;
      for (int32_t id : ids) {
        const std::string piece = sd.push(id);
        ASSERT_TRUE(utf8::is_valid(piece));
        streamed += piece;
      }
      streamed += sd.flush();
      ASSERT_EQ(streamed, tok.decode(ids, skip)) << "iteration " << iter;
    }
  }
}

TEST(TokenizerErrors, MalformedFilesGiveClearErrors) {
  EXPECT_ERROR_HAS(Tokenizer::from_json_string("{not json", "t.json"), "t.json: not valid JSON");
  EXPECT_ERROR_HAS(Tokenizer::from_json_string("[1,2]", "t.json"), "must be a JSON object");
  EXPECT_ERROR_HAS(Tokenizer::from_json_string(R"({"added_tokens": []})", "t.json"), "no \"model\"");
  json j = make_tokenizer({}, {});
  j["model"]["type"] = "WordPiece";
  EXPECT_ERROR_HAS(load(j), "model type 'WordPiece' is not supported");
  j = make_tokenizer({}, {});
  j["model"]["merges"] = json::array({"a"});
  EXPECT_ERROR_HAS(load(j), "merge #0 'a' is not two tokens");
  j["model"]["merges"] = json::array({42});
  EXPECT_ERROR_HAS(load(j), "merge #0 is neither");
  j["model"]["merges"] = json::array({"a b"});  // "ab" is not in the vocab
  EXPECT_ERROR_HAS(load(j), "produces 'ab' which is not in the vocab");
  j["model"]["merges"] = json::array({"a zz"});
  EXPECT_ERROR_HAS(load(j), "uses a token that is not in the vocab");
  j["model"]["merges"] = "a b";
  EXPECT_ERROR_HAS(load(j), "model.merges must be an array");
  j = make_tokenizer({}, {});
  j["model"]["vocab"].erase("a");
  EXPECT_ERROR_HAS(load(j), "lacks the byte-level symbol for byte 97");
  j = make_tokenizer({}, {});
  j["model"]["vocab"]["zz"] = 'a';
  EXPECT_ERROR_HAS(load(j), "vocab id 97 is used by two tokens");
  j = make_tokenizer({}, {});
  j["model"]["vocab"]["a"] = "one";
  EXPECT_ERROR_HAS(load(j), "vocab id of 'a' is not an integer");
  j = make_tokenizer({}, {});
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  EXPECT_ERROR_HAS(load(j), "pre_tokenizer type 'Metaspace' is not supported");
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  EXPECT_ERROR_HAS(load(j), "regex does not compile");
  j = make_tokenizer({}, {});
  j["normalizer"] = {{"type", "NFKC"}};
  EXPECT_ERROR_HAS(load(j), "normalizer 'NFKC' is not supported");
  j = make_tokenizer({}, {});
  j["added_tokens"] = json::array({{{"content", "x"}}});
  EXPECT_ERROR_HAS(load(j), "needs an integer \"id\"");
  j = make_tokenizer({}, {});
  j["model"]["vocab"] = json::array();
  EXPECT_ERROR_HAS(load(j), "model.vocab must be an object");
  EXPECT_ERROR_HAS(Tokenizer::from_file("/nonexistent/tokenizer.json"), "cannot open /nonexistent/tokenizer.json");
  EXPECT_ERROR_HAS(Tokenizer::from_dir("/nonexistent"), "no tokenizer.json in '/nonexistent'");
  const Tokenizer tok = load(make_tokenizer({}, {}));
  EXPECT_ERROR_HAS(tok.decode(Ids{256}), "token id 256 is outside the vocabulary [0, 256)");
  EXPECT_ERROR_HAS(tok.decode(Ids{-1}), "token id -1 is outside");
}

TEST(TokenizerFiles, FromDirReadsConfigTokens) {
  const auto dir = std::filesystem::temp_directory_path() / ("cpinfer_tok_unit_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  json added = json::array({added_token(300, "<|end|>", true), added_token(301, "<|pad|>", true)});
  std::ofstream(dir / "tokenizer.json") << make_tokenizer({}, {}, added).dump();
  std::ofstream(dir / "tokenizer_config.json")
      << json{{"eos_token", "<|end|>"}, {"pad_token", {{"content", "<|pad|>"}}}}.dump();
  const Tokenizer tok = Tokenizer::from_dir(dir.string());
  EXPECT_EQ(tok.eos_token_id(), 300);
  EXPECT_EQ(tok.pad_token_id(), 301);
  std::ofstream(dir / "tokenizer_config.json") << "{oops";
  EXPECT_ERROR_HAS(Tokenizer::from_dir(dir.string()), "tokenizer_config.json: not valid JSON");
  std::filesystem::remove_all(dir);
}

TEST(TokenizerThreads, ConcurrentEncodeIsConsistent) {
  const Tokenizer tok = load(make_tokenizer({"bc", "abc"}, {{"b", "c"}, {"a", "bc"}}));
  std::string text;
  for (int i = 0; i < 200; ++i) text += "abc xabc " + std::to_string(i) + " ";
  const Ids expect = tok.encode(text);
  std::vector<std::thread> threads;
  std::vector<int> ok(4, 0);
  for (int t = 0; t < 4; ++t) threads.emplace_back([&, t] { ok[t] = tok.encode(text) == expect; });
  for (auto& th : threads) th.join();
  EXPECT_EQ(ok, std::vector<int>(4, 1));
}

}  // namespace
}  // namespace cpinfer
