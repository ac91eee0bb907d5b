// The server's chat rendering (request body -> parse_request -> Tokenizer::render_chat) against the
// checkpoint's own chat_template rendered by @huggingface/jinja (tools/js/render_chat_template.mjs)
// for 600 generated conversations: tools, system prompts, multi-turn, reasoning, tool calls with
// string and object arguments, tool results, thinking on and off. Runs node; fails (never skips)
// when node, the package or the Qwen3 tokenizer files are missing, since CI runs setup first.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "server/api.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer::server {
namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

const char* kSetupHint = " (run scripts/setup.sh: it installs node's packages and extracts the Qwen3 tokenizer)";

class Gen {
 public:
  explicit Gen(uint64_t seed) : rng_(seed) {}
  int pick(int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng_); }
  bool coin(int percent = 50) { return pick(100) < percent; }

  std::string text() {
    static const char* kPieces[] = {"Hello",
                                    "what's the weather in Paris?",
                                    "naïve café",
                                    "中文测试",
                                    "emoji 🚀 ok",
                                    "quote \" and \\ backslash",
                                    "line\nbreak",
                                    "\nleading newline",
                                    "trailing newline\n",
                                    "tab\there",
                                    "<b>html</b>",
                                    "{\"json\": 1}",
                                    "   spaces   ",
                                    "Ünïcödé",
                                    "a",
                                    "",
                                    "The answer is 42.",
                                    "<tool_response>\nnot quite\n</tool_response> x"};
    std::string s;
    const int n = 1 + pick(3);
    for (int i = 0; i < n; ++i) s += std::string(i ? " " : "") + kPieces[pick(std::size(kPieces))];
    return s;
  }
  ojson number() {
    static const double kFloats[] = {0.5, -2.25, 1e-7,   1.5e21, 123456789.125, 3.0,
                                     0.1, 1e300, 5e-324, -0.0,   1e21,          1e-6};
    if (coin()) return ojson(pick(2000) - 1000);
    return ojson(kFloats[pick(std::size(kFloats))]);
  }
  ojson value(int depth = 0) {
    switch (pick(depth > 1 ? 5 : 7)) {
      case 0:
        return text();
      case 1:
        return number();
      case 2:
        return coin();
      case 3:
        return nullptr;
      case 4:
        return "enum_" + std::to_string(pick(9));
      case 5: {
        ojson a = ojson::array();
        for (int i = pick(4); i > 0; --i) a.push_back(value(depth + 1));
        return a;
      }
      default: {
        ojson o = ojson::object();
        for (int i = pick(4); i > 0; --i) o[key()] = value(depth + 1);
        return o;
      }
    }
  }
  std::string key() {
    static const char* kKeys[] = {"city", "unit", "zeta",  "alpha",      "query", "n_results",
                                  "lang", "déjà", "Upper", "with space", "b",     "a"};
    return kKeys[pick(std::size(kKeys))];
  }
  std::string fn_name() {
    static const char* kNames[] = {"get_weather", "search", "calc", "send_email", "lookup_user", "f"};
    return kNames[pick(std::size(kNames))];
  }
  ojson tool() {
    ojson props = ojson::object();
    for (int i = 1 + pick(3); i > 0; --i)
      props[key()] = {{"type", coin() ? "string" : "number"}, {"description", text()}};
    ojson params = {{"type", "object"}, {"properties", props}};
    if (coin()) params["required"] = ojson::array({props.begin().key()});
    if (coin(30)) params["default"] = value();
    ojson fn = ojson::object();
    fn["name"] = fn_name();
    if (coin(80)) fn["description"] = text();
    fn["parameters"] = params;
    return {{"type", "function"}, {"function", fn}};
  }
  ojson arguments() {
    ojson o = ojson::object();
    for (int i = pick(4); i > 0; --i) o[key()] = value(1);
    if (coin()) return o.dump();  // OpenAI clients send a JSON string
    return o;
  }

  // One request body: messages, maybe tools, maybe thinking off.
  ojson conversation() {
    ojson body = ojson::object();
    ojson msgs = ojson::array();
    if (coin(60)) msgs.push_back({{"role", "system"}, {"content", text()}});
    const int turns = 1 + pick(4);
    for (int t = 0; t < turns; ++t) {
      msgs.push_back(
          {{"role", "user"}, {"content", coin(15) ? "<tool_response>\n" + text() + "\n</tool_response>" : text()}});
      if (t + 1 == turns && coin(70)) break;  // end on the user's turn
      ojson a = {{"role", "assistant"}};
      const int style = pick(4);
      if (style == 0) a["content"] = text();
      if (style == 1) a["content"] = "<think>\n" + text() + "\n</think>\n\n" + text();
      if (style == 2) {
        a["content"] = text();
        a["reasoning_content"] = "reason " + text();
      }
      const bool calls = coin(45);
      if (style == 3 && !calls) a["content"] = "";
      if (calls) {
        if (style == 3) a["content"] = nullptr;
        ojson tc = ojson::array();
        for (int k = 1 + pick(3); k > 0; --k)
          tc.push_back({{"id", "call_" + std::to_string(k)},
                        {"type", "function"},
                        {"function", {{"name", fn_name()}, {"arguments", arguments()}}}});
        a["tool_calls"] = tc;
      }
      msgs.push_back(a);
      if (calls)
        for (int k = 1 + pick(3); k > 0; --k)
          msgs.push_back({{"role", "tool"}, {"tool_call_id", "call_" + std::to_string(k)}, {"content", text()}});
    }
    body["messages"] = msgs;
    if (coin(60)) {
      ojson tools = ojson::array();
      for (int k = 1 + pick(3); k > 0; --k) tools.push_back(tool());
      body["tools"] = tools;
    }
    if (coin(50)) body["chat_template_kwargs"] = {{"enable_thinking", coin()}};
    return body;
  }

 private:
  std::mt19937_64 rng_;
};

TEST(ChatTemplateJinja, RenderingEqualsTheCheckpointsTemplate) {
  const fs::path tok_dir = fs::path(CPINFER_SOURCE_DIR) / "build" / "qwen3-tokenizer";
  ASSERT_TRUE(fs::exists(tok_dir / "tokenizer_config.json")) << "no " << tok_dir << kSetupHint;
  const std::string node = CPINFER_NODE_EXECUTABLE;
  ASSERT_TRUE(!node.empty() && node.find("NOTFOUND") == std::string::npos && fs::exists(node))
      << "node was not found when configuring" << kSetupHint;
  const fs::path js_dir = fs::path(CPINFER_SOURCE_DIR) / "tools" / "js";
  ASSERT_TRUE(fs::exists(js_dir / "node_modules" / "@huggingface" / "jinja")) << "no @huggingface/jinja" << kSetupHint;
  const Tokenizer tok = Tokenizer::from_dir(tok_dir.string());

  constexpr int kCases = 600;
  Gen gen(20261203);
  ojson cases = ojson::array();
  std::vector<std::string> ours;
  int with_tools = 0, with_calls = 0, thinking_off = 0, with_system = 0, multi_turn = 0;
  for (int i = 0; i < kCases; ++i) {
    const ojson body = gen.conversation();
    const GenRequest g = parse_request(Endpoint::Chat, body.dump());
    ours.push_back(tok.render_chat(g.messages, /*add_generation_prompt=*/true, g.enable_thinking, g.tools));
    ojson c = {{"messages", body["messages"]}, {"tools", body.contains("tools") ? body["tools"] : ojson::array()}};
    if (body.contains("chat_template_kwargs")) c["enable_thinking"] = body["chat_template_kwargs"]["enable_thinking"];
    cases.push_back(c);
    with_tools += !g.tools.empty();
    thinking_off += !g.enable_thinking;
    with_system += g.messages[0].role == "system";
    int users = 0;
    for (const ChatMessage& m : g.messages) {
      with_calls += !m.tool_calls.empty();
      users += m.role == "user";
    }
    multi_turn += users > 1;
  }
  // The generator covers what it should.
  EXPECT_GT(with_tools, kCases / 3);
  EXPECT_GT(with_calls, kCases / 3);
  EXPECT_GT(thinking_off, kCases / 8);
  EXPECT_GT(with_system, kCases / 3);
  EXPECT_GT(multi_turn, kCases / 3);

  const fs::path work = fs::path(CPINFER_BINARY_DIR) / ("jinja_diff_" + std::to_string(::getpid()));
  fs::create_directories(work);
  const fs::path in = work / "cases.json", out = work / "rendered.json";
  std::ofstream(in, std::ios::binary) << cases.dump();
  const std::string cmd = "\"" + node + "\" \"" + (js_dir / "render_chat_template.mjs").string() + "\" \"" +
                          (tok_dir / "tokenizer_config.json").string() + "\" \"" + in.string() + "\" \"" +
                          out.string() + "\"";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << "the JS reference failed: " << cmd << kSetupHint;
  std::ifstream rendered(out, std::ios::binary);
  const nlohmann::json expected = nlohmann::json::parse(rendered);
  fs::remove_all(work);
  ASSERT_EQ(expected.size(), ours.size());
  int mismatches = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    if (expected[i].get<std::string>() == ours[i]) continue;
    if (++mismatches <= 3)
      ADD_FAILURE() << "conversation " << i << ": " << cases[i].dump() << "\n--- jinja ---\n"
                    << expected[i].get<std::string>() << "\n--- cpinfer ---\n"
                    << ours[i];
  }
  EXPECT_EQ(mismatches, 0) << "of " << ours.size();
}

}  // namespace
}  // namespace cpinfer::server
