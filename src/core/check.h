// Error checks that throw with the source location and a message a user can act on.
// Library code never exits: the CLI and the server turn cpinfer::Error into one clear line.
#pragma once
#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>

namespace cpinfer {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
[[noreturn]] void throw_error(const std::string& msg, const std::source_location& loc);

// Streams every argument into one string: CHECK(x > 0, "x=", x, " must be positive").
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace cpinfer

// Throws cpinfer::Error("<message> [file:line]") when cond is false.
#define CPI_CHECK(cond, ...)                                                                                   \
  do {                                                                                                         \
    if (!(cond)) [[unlikely]]                                                                                  \
      ::cpinfer::detail::throw_error(::cpinfer::detail::concat(__VA_ARGS__), std::source_location::current()); \
  } while (0)

#define CPI_FAIL(...) \
  ::cpinfer::detail::throw_error(::cpinfer::detail::concat(__VA_ARGS__), std::source_location::current())
