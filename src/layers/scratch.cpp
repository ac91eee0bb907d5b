#include "layers/scratch.h"

#include <chrono>

namespace cpinfer {

namespace {
double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
}  // namespace

void Profiler::start() {
  profile_ = {};
  if (!opt_.profiling) return;
  be_.sync();
  t_ = now_s();
}

void Profiler::mark(double ForwardProfile::*bucket) {
  if (!opt_.profiling) return;
  be_.sync();
  const double t = now_s();
  profile_.*bucket += t - t_;
  t_ = t;
}

}  // namespace cpinfer
