// Fuzzes the OpenAI request parser (server::parse_request). The first byte picks the endpoint.
// ApiError (a 400 for the client) and cpinfer::Error are correct outcomes; every accepted request
// must satisfy the ranges the parser promises, and its error JSON must serialize.
#include <algorithm>
#include <cstdint>
#include <string_view>

#include "fuzz_util.h"
#include "server/api.h"

using cpinfer::server::ApiError;
using cpinfer::server::Endpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Endpoint ep = (data[0] & 1) ? Endpoint::Completion : Endpoint::Chat;
  std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  try {
    cpinfer::server::GenRequest r = cpinfer::server::parse_request(ep, body);
    auto fail = [](const char* what) { cpinfer::fuzz::report_bug(what, "accepted request"); };
    if (ep == Endpoint::Chat && r.messages.empty()) fail("chat request without messages");
    if (ep == Endpoint::Completion && r.prompt.empty() && r.prompt_ids.empty()) fail("empty prompt");
    for (int32_t id : r.prompt_ids)
      if (id < 0) fail("negative prompt id");
    for (int32_t id : r.stop_token_ids)
      if (id < 0) fail("negative stop token id");
    if (r.max_tokens && *r.max_tokens < 1) fail("max_tokens < 1");
    const auto& s = r.sampling;
    if (!(s.temperature >= 0.0f && s.temperature <= 2.0f)) fail("temperature out of [0, 2]");
    if (!(s.top_p > 0.0f && s.top_p <= 1.0f)) fail("top_p out of (0, 1]");
    if (!(s.min_p >= 0.0f && s.min_p <= 1.0f)) fail("min_p out of [0, 1]");
    if (s.top_k == 0) fail("top_k == 0");
    for (const auto& st : r.stop)
      if (st.empty()) fail("empty stop string");
    if (r.n < 1 || r.n > 64) fail("n out of [1, 64]");
    if (r.logprobs < -1 || r.logprobs > 20) fail("logprobs out of [-1, 20]");
    using Kind = cpinfer::server::ToolChoice::Kind;
    if (r.tool_choice.kind == Kind::None && !r.tools.empty()) fail("tools rendered with tool_choice none");
    if (r.tool_choice.kind != Kind::None && r.tools.empty()) fail("tool_choice without tools");
    if (r.tool_choice.kind == Kind::Named &&
        std::find(r.tool_names.begin(), r.tool_names.end(), r.tool_choice.name) == r.tool_names.end())
      fail("named tool_choice not in tools");
    for (const auto& t : r.tools)
      if (t.empty() || t.front() != '{' || t.back() != '}') fail("a tool that is not a JSON object");
    if (cpinfer::fuzz::verbose()) std::fprintf(stderr, "accepted\n");
  } catch (const ApiError& e) {
    if (e.message.empty()) cpinfer::fuzz::report_bug("(empty message)", "ApiError");
    if (cpinfer::fuzz::verbose()) std::fprintf(stderr, "rejected (ApiError): %s\n", e.what());
    // The server sends this to the client: it must serialize as server.cpp does it.
    cpinfer::fuzz::run_expecting_errors(
        [&] { (void)cpinfer::server::error_json(e).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); });
  } catch (const cpinfer::Error& e) {
    if (cpinfer::fuzz::verbose()) std::fprintf(stderr, "rejected: %s\n", e.what());
  } catch (const std::exception& e) {
    cpinfer::fuzz::report_bug(e.what(), typeid(e).name());
  }
  return 0;
}
