// Minimal reproducers of bugs the fuzzers found (tests/fuzz, scripts/fuzz.sh). Each test states
// the contract: bad input gives a cpinfer::Error (server: ApiError 400), never a crash or another
// exception type. Crashing cases run as death tests so that one stack overflow fails its own test
// instead of killing the whole binary.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "core/check.h"
#include "loader/config.h"
#include "loader/safetensors.h"
#include "tokenizer/tokenizer.h"
#ifdef CPINFER_HAS_SERVER
#include "server/api.h"
#endif

namespace cpinfer {
namespace {

// Deep enough to overflow an 8 MiB stack in any recursion over the nesting, in Release and under
// ASan (nlohmann::json's copy constructor and dump() recurse once per level). 2 MB of text: well
// inside the server's 64 MiB body limit and the safetensors 100 MB header limit.
constexpr int kDeep = 1'000'000;
std::string deep_array() { return std::string(kDeep, '[') + std::string(kDeep, ']'); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The child exits 0 when `fn` throws an exception of type E (the contract), 1 for another
// exception or none; a crash (stack overflow) shows as a signal. The parent expects exit code 0.
template <class E, class Fn>
void expect_error_not_crash(Fn fn) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_EXIT(
      {
        int code = 1;
        try {
          fn();
        } catch (const E&) {
          code = 0;
        } catch (...) {
        }
        std::_Exit(code);
      },
      ::testing::ExitedWithCode(0), "");
}

std::string safetensors_image(const std::string& header) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header;
}

// loader/safetensors.cpp brief() (j.dump(), line ~31) quotes a tensor entry that is not an object
// ("entry of tensor 'a' must be an object, got ..."): dump() recurses once per nesting level.
TEST(FuzzRegression, SafetensorsDeeplyNestedEntryIsAnError) {
  const std::string image = safetensors_image("{\"a\":" + deep_array() + "}");
  expect_error_not_crash<Error>([&] { parse_safetensors(image.data(), image.size(), "deep.safetensors"); });
}

// loader/config.cpp: a deeply nested value of a field, quoted by brief() (j.dump()) or copied.
TEST(FuzzRegression, ConfigDeeplyNestedFieldIsAnError) {
  std::string text = read_file(std::string(CPINFER_SOURCE_DIR) + "/tests/fixtures/dense_qwen3/config.json");
  ASSERT_FALSE(text.empty());
  const size_t pos = text.find("\"vocab_size\": 384");
  ASSERT_NE(pos, std::string::npos);
  text.replace(pos, 17, "\"vocab_size\": " + deep_array());
  expect_error_not_crash<Error>([&] { parse_config(text, "deep/config.json"); });
}

// tokenizer/tokenizer.cpp load(): root.value("normalizer" | "pre_tokenizer" | "decoder" |
// "added_tokens", ...) returns a copy of the value (recursive copy constructor); the added-token
// error message calls a.dump(); bpe.cpp quotes bad merges with dump().
TEST(FuzzRegression, TokenizerDeeplyNestedFieldsAreErrors) {
  const std::string seed =
      read_file(std::string(CPINFER_SOURCE_DIR) + "/tests/fuzz/corpus/tokenizer_json/gpt2_like.json");
  ASSERT_FALSE(seed.empty());
  ASSERT_EQ(seed.back(), '}');
  for (const char* key : {"normalizer", "pre_tokenizer", "decoder", "added_tokens"}) {
    SCOPED_TRACE(key);
    // A later duplicate key replaces the seed's value (nlohmann keeps the last one).
    const std::string text = seed.substr(0, seed.size() - 1) + ",\"" + key + "\":" + deep_array() + "}";
    expect_error_not_crash<Error>([&] { Tokenizer::from_json_string(text, "deep/tokenizer.json"); });
  }
}

// A vocab with one absurd id (found by fuzz_tokenizer_json in CI: "D": 677777778) made the id
// table allocate gigabytes; sparse ids are an error now.
TEST(FuzzRegression, TokenizerSparseVocabIdsAreAnError) {
  const std::string text = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "D": 677777778}, "merges": []}})";
  try {
    Tokenizer::from_json_string(text, "sparse/tokenizer.json");
    FAIL() << "a vocab id of 677777778 for 3 tokens must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sparse"), std::string::npos) << e.what();
  }
}

#ifdef CPINFER_HAS_SERVER
using server::ApiError;
using server::Endpoint;
using server::parse_request;

// server/api.cpp parse_request() catches only json::parse_error (line ~170); a number too large
// for a double is json::out_of_range (406), which escapes and becomes a 500 "internal error" in
// server.cpp instead of a 400 for the client.
TEST(FuzzRegression, ApiNumberOverflowIsApiError) {
  EXPECT_THROW(parse_request(Endpoint::Chat, R"({"messages":[{"role":"user","content":"x"}],"max_tokens":1e400})"),
               ApiError);
  EXPECT_THROW(parse_request(Endpoint::Completion, R"({"prompt":"x","temperature":-1e309})"), ApiError);
}

// server/api.cpp quotes a bad token id with x.dump() (stop_token_ids, line ~230; prompt token
// arrays, line ~125): a deeply nested array in a request body overflows the server's stack.
TEST(FuzzRegression, ApiDeeplyNestedStopTokenIdsIsApiError) {
  const std::string body = R"({"messages":[{"role":"user","content":"x"}],"stop_token_ids":[)" + deep_array() + "]}";
  expect_error_not_crash<ApiError>([&] { parse_request(Endpoint::Chat, body); });
}

TEST(FuzzRegression, ApiDeeplyNestedPromptIdsIsApiError) {
  const std::string body = R"({"prompt":[1,)" + deep_array() + "]}";
  expect_error_not_crash<ApiError>([&] { parse_request(Endpoint::Completion, body); });
}

// Deep nesting in a field the parser ignores is fine today (parse and destruction do not
// recurse); keep it that way.
TEST(FuzzRegression, ApiDeeplyNestedUnknownFieldIsAccepted) {
  const std::string body = R"({"messages":[{"role":"user","content":"x"}],"metadata":)" + deep_array() + "}";
  expect_error_not_crash<std::exception>([&] {
    parse_request(Endpoint::Chat, body);
    throw std::runtime_error("accepted");  // reaching here is the expected outcome
  });
}
#endif

}  // namespace
}  // namespace cpinfer
