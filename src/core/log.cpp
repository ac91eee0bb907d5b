#include "core/log.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <mutex>

namespace cpinfer {

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Info)};
const auto g_start = std::chrono::steady_clock::now();
std::mutex g_mu;
}  // namespace

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void log_line(LogLevel level, const std::string& msg) {
  static const char* names[] = {"debug", "info", "warn", "error"};
  double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - g_start).count();
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "[cpinfer %8.3fs %s] %s\n", t, names[static_cast<int>(level)], msg.c_str());
}

}  // namespace cpinfer
