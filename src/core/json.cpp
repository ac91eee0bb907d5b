#include "core/json.h"

#include <set>
#include <vector>

#include "core/check.h"

namespace cpinfer {

namespace {
struct TooDeep {};
}  // namespace

nlohmann::json parse_json(std::string_view text, const std::string& label, const JsonParseCallback& extra) {
  auto cb = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (depth > kMaxJsonDepth) throw TooDeep{};
    return extra ? extra(depth, event, parsed) : true;
  };
  if (size_t nul = text.find('\0'); nul != std::string_view::npos)
    CPI_FAIL(label, ": NUL byte at offset ", nul, " (JSON text cannot contain one; the file is corrupt)");
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb);
  } catch (const TooDeep&) {
    CPI_FAIL(label, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
  } catch (const nlohmann::json::exception& e) {
    CPI_FAIL(label, ": not valid JSON (", e.what(), ")");
  }
}

nlohmann::json parse_json_unique_keys(std::string_view text, const std::string& label) {
  using nlohmann::json;
  std::vector<std::set<std::string, std::less<>>> keys;  // one set per open object
  std::string duplicate;
  auto cb = [&](int /*depth*/, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == json::parse_event_t::key && !keys.empty() && duplicate.empty()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(k).second) duplicate = k;
    }
    return true;
  };
  json j = parse_json(text, label, cb);
  CPI_CHECK(duplicate.empty(), label, ": duplicate key '", duplicate, "'");
  return j;
}

std::string json_brief(const nlohmann::json& j) {
  std::string s = j.dump();
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

}  // namespace cpinfer
