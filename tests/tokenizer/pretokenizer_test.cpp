// Pre-tokenizer pieces for the Qwen regex (PCRE2, UTF + UCP): the splits BPE sees. Whitespace
// follows Unicode White_Space as Hugging Face's Oniguruma does (U+0085 is space, U+FEFF is not);
// JavaScript's \s differs on exactly these two, so the differential corpus leaves them out.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "tokenizer/pretokenizer.h"

namespace cpinfer {
namespace {

using json = nlohmann::json;
using Words = std::vector<std::string>;

constexpr const char* kQwenRegex =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

tok_detail::PreTokenizer qwen() {
  const json j = {{"type", "Sequence"},
                  {"pretokenizers",
                   json::array({{{"type", "Split"}, {"pattern", {{"Regex", kQwenRegex}}}, {"behavior", "Isolated"}},
                                {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}})}};
  return tok_detail::PreTokenizer::from_json(j, "test");
}

Words split(const tok_detail::PreTokenizer& pt, std::string_view text) {
  Words w;
  pt.split(text, w);
  return w;
}

TEST(PreTokenizer, QwenRegexPieces) {
  const auto pt = qwen();
  EXPECT_EQ(split(pt, "Hello world"), (Words{"Hello", " world"}));
  EXPECT_EQ(split(pt, "I'M they'll x'Re"), (Words{"I", "'M", " they", "'ll", " x", "'Re"}));
  EXPECT_EQ(split(pt, "abc 123"), (Words{"abc", " ", "1", "2", "3"}));
  EXPECT_EQ(split(pt, "a   b"), (Words{"a", "  ", " b"}));          // \s+(?!\S) leaves one space
  EXPECT_EQ(split(pt, "x  \n\n y"), (Words{"x", "  \n\n", " y"}));  // \s*[\r\n]+
  EXPECT_EQ(split(pt, "f(x);\n"), (Words{"f", "(x", ");\n"}));
  EXPECT_EQ(split(pt, "你好，世界"), (Words{"你好", "，世界"}));      // \p{L} is Unicode
  EXPECT_EQ(split(pt, "\u0661\u0662"), (Words{"\u0661", "\u0662"}));  // Arabic-Indic digits are \p{N}
  EXPECT_EQ(split(pt, "trailing  "), (Words{"trailing", "  "}));
  EXPECT_EQ(split(pt, "\t\t\u0085x"), (Words{"\t\t", "\u0085x"}));  // NEL is White_Space
  EXPECT_EQ(split(pt, "a\uFEFF b"), (Words{"a", "\uFEFF", " b"}));  // BOM is not
  EXPECT_EQ(split(pt, "a\u3000b"), (Words{"a", "\u3000b"}));
  EXPECT_EQ(split(pt, ""), Words{});
}

TEST(PreTokenizer, ByteLevelGpt2RegexAndPrefixSpace) {
  const json j = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  const auto pt = tok_detail::PreTokenizer::from_json(j, "test");
  EXPECT_EQ(split(pt, "Hello world's 42"), (Words{" Hello", " world", "'s", " 42"}));
}

TEST(PreTokenizer, SplitRemovedAndLiteral) {
  const json j = {{"type", "Split"}, {"pattern", {{"String", "."}}}, {"behavior", "Removed"}};
  const auto pt = tok_detail::PreTokenizer::from_json(j, "test");
  EXPECT_EQ(split(pt, "a.b..c"), (Words{"a", "b", "c"}));
  const json bad = {{"type", "Split"}, {"pattern", {{"Regex", "a"}}}, {"behavior", "MergedWithNext"}};
  EXPECT_THROW(tok_detail::PreTokenizer::from_json(bad, "test"), Error);
}

TEST(PreTokenizer, VeryLongInputsDoNotFail) {
  const auto pt = qwen();
  EXPECT_EQ(split(pt, std::string(200000, 'a')).size(), 1u);
  EXPECT_EQ(split(pt, std::string(200000, ' ') + "x").size(), 2u);
  EXPECT_EQ(split(pt, std::string(100000, '7')).size(), 100000u);
}

}  // namespace
}  // namespace cpinfer
