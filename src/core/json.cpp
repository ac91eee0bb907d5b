#include "core/json.h"

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
  try {
    return nlohmann::json::parse(text.begin(), text.end(), cb);
  } catch (const TooDeep&) {
    CPI_FAIL(label, ": JSON nested deeper than ", kMaxJsonDepth, " levels");
  } catch (const nlohmann::json::exception& e) {
    CPI_FAIL(label, ": not valid JSON (", e.what(), ")");
  }
}

}  // namespace cpinfer
