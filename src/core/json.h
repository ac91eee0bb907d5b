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
// A NUL byte anywhere in `text` is refused ("<label>: NUL byte at offset N"): nlohmann takes it as
// the end of the input, so whatever follows would be ignored without a word.
nlohmann::json parse_json(std::string_view text, const std::string& label, const JsonParseCallback& extra = {});

// parse_json, and a key repeated within one object is refused ("<label>: duplicate key 'k'"):
// nlohmann keeps the last one silently, so two readers of the same file could disagree.
nlohmann::json parse_json_unique_keys(std::string_view text, const std::string& label);

// A short quote of a value for error messages: its JSON text, cut to 60 characters with "...".
std::string json_brief(const nlohmann::json& j);

}  // namespace cpinfer
