// Shared by the libFuzzer targets: what counts as a correct outcome for bad input.
// A cpinfer::Error (or server::ApiError) with a message is the contract; any other exception
// escaping is a bug, reported here and turned into a crash so that libFuzzer saves the input.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string>
#include <typeinfo>

#include "core/check.h"

namespace cpinfer::fuzz {

[[noreturn]] inline void report_bug(const char* what, const char* type) {
  std::fprintf(stderr, "\n=== cpinfer fuzz: unexpected exception of type %s: %s\n", type, what);
  std::abort();
}

// CPINFER_FUZZ_VERBOSE=1 prints each rejected input's message (to check that seeds are accepted
// or to read the errors of a crash directory's inputs).
inline bool verbose() {
  static const bool v = [] {
    const char* e = std::getenv("CPINFER_FUZZ_VERBOSE");
    return e != nullptr && *e != '\0' && *e != '0';
  }();
  return v;
}

// Runs fn(); returns true when it completed, false when it threw cpinfer::Error (or one of the
// `Allowed` exception types); aborts on anything else.
template <class... Allowed, class Fn>
bool run_expecting_errors(Fn&& fn) {
  try {
    fn();
    if (verbose()) std::fprintf(stderr, "accepted\n");
    return true;
  } catch (const cpinfer::Error& e) {
    // An empty message would be useless to a user.
    if (e.what()[0] == '\0') report_bug("(empty message)", "cpinfer::Error");
    if (verbose()) std::fprintf(stderr, "rejected: %s\n", e.what());
    return false;
  } catch (const std::exception& e) {
    if ((... || (dynamic_cast<const Allowed*>(&e) != nullptr))) {
      if (verbose()) std::fprintf(stderr, "rejected: %s\n", e.what());
      return false;
    }
    report_bug(e.what(), typeid(e).name());
  } catch (...) {
    report_bug("(not a std::exception)", "unknown");
  }
}

}  // namespace cpinfer::fuzz
