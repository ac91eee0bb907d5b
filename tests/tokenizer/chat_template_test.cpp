// Qwen3 chat template: expected strings were checked by hand against the template text in the
// Qwen3 tokenizer_config.json (and with a Jinja2 render of that template while writing them).
// render_chat does not depend on the vocab, so a one-byte-per-token tokenizer serves.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "core/check.h"
#include "tokenizer/bpe.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace cpinfer {
namespace {

Tokenizer byte_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) {
    std::string s;
    utf8::append(s, tok_detail::byte_to_symbol()[b]);
    vocab[s] = b;
  }
  const nlohmann::json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return Tokenizer::from_json_string(j.dump(), "bytes.json");
}

ChatMessage msg(std::string role, std::string content, std::string reasoning = "") {
  return {std::move(role), std::move(content), std::move(reasoning)};
}

TEST(ChatTemplate, GenerationPromptAndThinkingSwitch) {
  const Tokenizer tok = byte_tokenizer();
  const std::vector<ChatMessage> m = {msg("user", "Hi")};
  EXPECT_EQ(tok.render_chat(m, true, true), "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  EXPECT_EQ(tok.render_chat(m, true, false),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  EXPECT_EQ(tok.render_chat(m, false, false), "<|im_start|>user\nHi<|im_end|>\n");
  EXPECT_EQ(tok.render_chat({}, true, true), "<|im_start|>assistant\n");
}

TEST(ChatTemplate, SystemTurns) {
  const Tokenizer tok = byte_tokenizer();
  EXPECT_EQ(tok.render_chat({msg("system", "Be brief."), msg("user", "Hi"), msg("system", "Later rule.")}, true, true),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
            "<|im_start|>system\nLater rule.<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, OnlyTurnsAfterLastQueryKeepReasoning) {
  const Tokenizer tok = byte_tokenizer();
  const std::vector<ChatMessage> m = {msg("user", "Q1"), msg("assistant", "A1", "R1"), msg("user", "Q2"),
                                      msg("assistant", "A2", "R2")};
  EXPECT_EQ(tok.render_chat(m, false, true),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nR2\n</think>\n\nA2<|im_end|>\n");
  // Continuing the conversation: the last assistant turn is followed by a new query, so it
  // loses its reasoning too.
  std::vector<ChatMessage> more = m;
  more.push_back(msg("user", "Q3"));
  EXPECT_EQ(tok.render_chat(more, true, false),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
            "<|im_start|>user\nQ3<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
}

TEST(ChatTemplate, LastAssistantTurnAlwaysGetsThinkBlock) {
  const Tokenizer tok = byte_tokenizer();
  EXPECT_EQ(tok.render_chat({msg("user", "Q"), msg("assistant", "A")}, false, true),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nA<|im_end|>\n");
  // Newlines around reasoning and before content are trimmed in the think block.
  EXPECT_EQ(tok.render_chat({msg("user", "Q"), msg("assistant", "\n\nA\n", "\n\nR\n")}, false, true),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR\n</think>\n\nA\n<|im_end|>\n");
}

TEST(ChatTemplate, ReasoningInsideContentIsParsed) {
  const Tokenizer tok = byte_tokenizer();
  const std::vector<ChatMessage> m = {msg("user", "Q1"), msg("assistant", "<think>\nold\n</think>\n\nA1"),
                                      msg("user", "Q2"), msg("assistant", "<think>\nnew thought\n</think>\n\nA2")};
  EXPECT_EQ(tok.render_chat(m, false, true),
            "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n<think>\nnew thought\n</think>\n\nA2<|im_end|>\n");
}

TEST(ChatTemplate, ToolResultsAndMultiStepReasoning) {
  const Tokenizer tok = byte_tokenizer();
  // Tool results are grouped into one user turn and do not count as a new query, so the
  // assistant turns after the real query keep their reasoning when they have it.
  const std::vector<ChatMessage> m = {msg("user", "Q"), msg("assistant", "calling", "plan"), msg("tool", "r1"),
                                      msg("tool", "r2"), msg("assistant", "done", "R")};
  EXPECT_EQ(tok.render_chat(m, false, true),
            "<|im_start|>user\nQ<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nplan\n</think>\n\ncalling<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\nR\n</think>\n\ndone<|im_end|>\n");
  // A user message that is a wrapped tool response is not a query either.
  const std::vector<ChatMessage> wrapped = {msg("user", "Q"), msg("assistant", "A", "R1"),
                                            msg("user", "<tool_response>x</tool_response>"), msg("assistant", "B")};
  EXPECT_EQ(tok.render_chat(wrapped, true, true),
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nR1\n</think>\n\nA<|im_end|>\n"
            "<|im_start|>user\n<tool_response>x</tool_response><|im_end|>\n"
            "<|im_start|>assistant\n<think>\n\n</think>\n\nB<|im_end|>\n<|im_start|>assistant\n");
}

TEST(ChatTemplate, UnknownRoleIsAnError) {
  const Tokenizer tok = byte_tokenizer();
  try {
    tok.render_chat({msg("user", "Q"), msg("narrator", "x")}, true, true);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("chat message 1 has role 'narrator'"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace cpinfer
