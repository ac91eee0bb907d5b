#include "core/check.h"

#include <filesystem>

namespace cpinfer::detail {

void throw_error(const std::string& msg, const std::source_location& loc) {
  std::string file = std::filesystem::path(loc.file_name()).filename().string();
  throw Error(msg + " [" + file + ":" + std::to_string(loc.line()) + "]");
}

}  // namespace cpinfer::detail
