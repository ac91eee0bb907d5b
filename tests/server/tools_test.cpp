// Tool calling pieces without a model: the tojson writer the chat template needs, the
// <tool_call> parser (whole and cut at every byte), and request parsing of tools and tool_choice.
#include <gtest/gtest.h>

#include "server/api.h"
#include "server/tools.h"

namespace cpinfer::server {
namespace {

using ojson = nlohmann::ordered_json;

TEST(Tools, TojsonWritesWhatHuggingfaceJinjaWrites) {
  EXPECT_EQ(jinja_tojson(ojson::parse(R"({"b": 1, "a": [true, null, "x"], "c": {}})")),
            R"({"b": 1, "a": [true, null, "x"], "c": {}})");
  EXPECT_EQ(jinja_tojson(ojson("quote \" back \\ nl \n tab \t bell \x07 é 中")),
            "\"quote \\\" back \\\\ nl \\n tab \\t bell \\u0007 é 中\"");
  // Numbers as JavaScript prints them.
  const std::pair<double, const char*> numbers[] = {
      {3.0, "3"},
      {0.5, "0.5"},
      {-2.25, "-2.25"},
      {1e21, "1e+21"},
      {1.5e21, "1.5e+21"},
      {1e20, "100000000000000000000"},
      {1e-6, "0.000001"},
      {1e-7, "1e-7"},
      {5e-324, "5e-324"},
      {-0.0, "0"},
      {123456789.125, "123456789.125"},
      {0.1, "0.1"},
      {1e300, "1e+300"},
  };
  for (const auto& [x, want] : numbers) EXPECT_EQ(jinja_tojson(ojson(x)), want) << x;
  EXPECT_EQ(jinja_tojson(ojson(int64_t(-42))), "-42");
  EXPECT_EQ(jinja_tojson(ojson(uint64_t(18446744073709551615ull))), "18446744073709552000");
}

ToolCallParser::Out run(const std::string& text, size_t cut_every) {
  ToolCallParser p;
  ToolCallParser::Out all;
  for (size_t i = 0; i < text.size(); i += cut_every) {
    auto o = p.push(text.substr(i, cut_every));
    all.content += o.content;
    for (auto& c : o.calls) all.calls.push_back(c);
  }
  auto o = p.flush();
  all.content += o.content;
  for (auto& c : o.calls) all.calls.push_back(c);
  return all;
}

TEST(Tools, ParserFindsCallsHowEverTheTextIsCut) {
  const std::string text =
      "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n"
      "</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n</tool_call>";
  for (size_t cut : {size_t(1), size_t(2), size_t(3), size_t(7), size_t(1000)}) {
    SCOPED_TRACE(cut);
    auto out = run(text, cut);
    EXPECT_EQ(out.content, "Let me check.\n");
    ASSERT_EQ(out.calls.size(), 2u);
    EXPECT_EQ(out.calls[0].name, "get_weather");
    EXPECT_EQ(out.calls[0].arguments, R"({"city":"Paris","days":2})");  // key order kept
    EXPECT_EQ(out.calls[1].name, "search");
    EXPECT_EQ(out.calls[1].arguments, "{}");
  }
}

TEST(Tools, ParserLeavesWhatIsNotACallAsContent) {
  EXPECT_EQ(run("a < b and <tool", 1).content, "a < b and <tool");  // a partial tag at the end
  auto bad = run("x<tool_call>{not json}</tool_call>y", 2);
  EXPECT_TRUE(bad.calls.empty());
  EXPECT_EQ(bad.content, "x<tool_call>{not json}</tool_call>y");
  auto no_name = run("<tool_call>{\"arguments\": {}}</tool_call>", 3);
  EXPECT_TRUE(no_name.calls.empty());
  // An unclosed call that is complete JSON still counts (the model hit a stop token).
  auto unclosed = run("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"k\": [1]}}\n", 4);
  ASSERT_EQ(unclosed.calls.size(), 1u);
  EXPECT_EQ(unclosed.calls[0].arguments, R"({"k":[1]})");
  auto cut_off = run("<tool_call>\n{\"name\": \"f\", \"argu", 4);
  EXPECT_TRUE(cut_off.calls.empty());
  EXPECT_EQ(cut_off.content, "<tool_call>\n{\"name\": \"f\", \"argu");
}

TEST(Tools, ForcedPrefixIsContinuedByTheModel) {
  ToolChoice named{ToolChoice::Kind::Named, "get_weather"};
  ToolCallParser p;
  EXPECT_TRUE(p.push(forced_tool_prefix(named)).content.empty());
  auto o = p.push("{\"city\": \"Oslo\"}}\n</tool_call>");
  ASSERT_EQ(o.calls.size(), 1u);
  EXPECT_EQ(o.calls[0].name, "get_weather");
  EXPECT_EQ(o.calls[0].arguments, R"({"city":"Oslo"})");
  EXPECT_EQ(forced_tool_prefix({ToolChoice::Kind::Required, ""}), "<tool_call>\n");
  EXPECT_EQ(forced_tool_prefix({ToolChoice::Kind::Auto, ""}), "");
}

TEST(Tools, RequestParsing) {
  const char* tool = R"({"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}})";
  GenRequest g = parse_request(Endpoint::Chat, std::string(R"({"messages": [{"role": "user", "content": "hi"},
      {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
        "function": {"name": "f", "arguments": "{\"x\": 1}"}}, {"id": "c2", "type": "function",
        "function": {"name": "g", "arguments": {"y": [2, 1.5]}}}]},
      {"role": "tool", "tool_call_id": "c1", "content": "42"}], "tools": [)") +
                                                   tool + R"(], "tool_choice": "auto"})");
  ASSERT_EQ(g.tools.size(), 1u);
  EXPECT_EQ(g.tools[0], R"({"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": 2}}})");
  EXPECT_EQ(g.tool_choice.kind, ToolChoice::Kind::Auto);
  ASSERT_EQ(g.messages[1].tool_calls.size(), 2u);
  EXPECT_EQ(g.messages[1].tool_calls[0].arguments, R"({"x": 1})");  // a string goes in as is
  EXPECT_EQ(g.messages[1].tool_calls[1].arguments, R"({"y": [2, 1.5]})");
  EXPECT_EQ(g.messages[2].role, "tool");

  // Without tools nothing is parsed as a call (tool_choice none), also for completions.
  EXPECT_EQ(parse_request(Endpoint::Chat, R"({"messages": [{"role": "user", "content": "hi"}]})").tool_choice.kind,
            ToolChoice::Kind::None);
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt": "hi"})").tool_choice.kind, ToolChoice::Kind::None);
  auto choice = [&](const std::string& c) {
    return parse_request(Endpoint::Chat,
                         std::string(R"({"messages": [{"role": "user", "content": "hi"}], "tools": [)") + tool +
                             "], \"tool_choice\": " + c + "}");
  };
  EXPECT_EQ(choice("\"required\"").tool_choice.kind, ToolChoice::Kind::Required);
  GenRequest none = choice("\"none\"");
  EXPECT_EQ(none.tool_choice.kind, ToolChoice::Kind::None);
  EXPECT_TRUE(none.tools.empty());  // left out of the prompt
  GenRequest named = choice(R"({"type": "function", "function": {"name": "f"}})");
  EXPECT_EQ(named.tool_choice.kind, ToolChoice::Kind::Named);
  EXPECT_EQ(named.tool_choice.name, "f");

  auto param_of = [](const std::string& body) {
    try {
      parse_request(Endpoint::Chat, body);
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400);
      return e.param;
    }
    return std::string("<accepted>");
  };
  const std::string msgs = R"("messages": [{"role": "user", "content": "hi"}])";
  EXPECT_EQ(param_of("{" + msgs + R"(, "tools": {}})"), "tools");
  EXPECT_EQ(param_of("{" + msgs + R"(, "tools": [{"type": "retrieval"}]})"), "tools[0].type");
  EXPECT_EQ(param_of("{" + msgs + R"(, "tools": [{"type": "function", "function": {}}]})"), "tools[0].function.name");
  EXPECT_EQ(param_of("{" + msgs + R"(, "tool_choice": "required"})"), "tool_choice");
  EXPECT_EQ(param_of("{" + msgs + ", \"tools\": [" + tool + R"(], "tool_choice": "sometimes"})"), "tool_choice");
  EXPECT_EQ(param_of("{" + msgs + ", \"tools\": [" + tool +
                     R"(], "tool_choice": {"type": "function", "function": {"name": "nope"}}})"),
            "tool_choice");
  EXPECT_EQ(param_of(R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})"),
            "messages[0].tool_calls");
  EXPECT_EQ(param_of(R"({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}]})"),
            "messages[0].tool_calls[0].function.arguments");
}

}  // namespace
}  // namespace cpinfer::server

namespace cpinfer::server {
namespace {

TEST(ApiLogprobs, ChatAndCompletionShapes) {
  std::vector<LogprobEntry> e = {{"Hi", -0.5f, {{"Hi", -0.5f}, {"Yo", -1.5f}}},
                                 {std::string("\xe4\xb8", 2), -2.0f, {}}};
  const nlohmann::json chat = chat_logprobs_json(e);
  ASSERT_EQ(chat["content"].size(), 2u);
  EXPECT_EQ(chat["content"][0]["token"], "Hi");
  EXPECT_EQ(chat["content"][0]["bytes"], nlohmann::json::array({72, 105}));
  EXPECT_EQ(chat["content"][0]["top_logprobs"][1]["token"], "Yo");
  EXPECT_EQ(chat["content"][1]["token"], "bytes:\\xe4\\xb8");  // half a character: vLLM's spelling
  EXPECT_EQ(chat["content"][1]["bytes"], nlohmann::json::array({0xe4, 0xb8}));
  const nlohmann::json comp = completion_logprobs_json(e, 10);
  EXPECT_EQ(comp["tokens"][0], "Hi");
  EXPECT_EQ(comp["text_offset"], nlohmann::json::array({10, 12}));
  EXPECT_FLOAT_EQ(comp["top_logprobs"][0]["Yo"].get<float>(), -1.5f);
  EXPECT_EQ(comp["token_logprobs"][1].get<float>(), -2.0f);

  GenRequest chat_req = parse_request(Endpoint::Chat, R"({"messages": [{"role": "user", "content": "x"}],
                                                           "logprobs": true, "top_logprobs": 4})");
  EXPECT_EQ(chat_req.logprobs, 4);
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt": "x", "logprobs": 2})").logprobs, 2);
  EXPECT_EQ(parse_request(Endpoint::Completion, R"({"prompt": "x"})").logprobs, -1);
  EXPECT_THROW(parse_request(Endpoint::Chat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})"),
               ApiError);
  EXPECT_THROW(parse_request(Endpoint::Completion, R"({"prompt": "x", "logprobs": 21})"), ApiError);
}

}  // namespace
}  // namespace cpinfer::server
