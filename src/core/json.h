// JSON from untrusted text (config.json, safetensors headers, tokenizer.json, HTTP bodies).
#pragma once
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace cpinfer {

// Deeper nesting than this is refused: nlohmann's dump() and copies recurse once per level, so a
// value nested a million deep (2 MB of brackets) would overflow the stack wherever it is copied or
// quoted in an error message. No file or request cpinfer reads nests beyond a handful of levels.
constexpr int kMaxJsonDepth = 128;

using JsonParseCallback = std::function<bool(int depth, nlohmann::json::parse_event_t, nlohmann::json&)>;

// Parses `text`; throws cpinfer::Error "<label>: not valid JSON (...)" or "<label>: JSON nested
// deeper than 128 levels". `extra`, when given, sees every parse event as nlohmann's callback does.
nlohmann::json parse_json(std::string_view text, const std::string& label, const JsonParseCallback& extra = {});

}  // namespace cpinfer
