// The SM clock, board power and clock-limit reasons of GPU 0 through NVML, loaded at run time
// (libnvidia-ml.so.1 comes with the driver; the CUDA toolkit here ships no nvml.h, so the few
// entry points are declared by their documented C signatures). A benchmark reads them right after
// each timed run: a long tensor-core run settles at a lower clock than a short one (the board's
// power limit), and a throughput is only comparable with another at the same clock.
#pragma once
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <vector>

class GpuClock {
 public:
  GpuClock() {
    lib_ = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib_ == nullptr) return;
    auto init = reinterpret_cast<int (*)()>(dlsym(lib_, "nvmlInit_v2"));
    auto handle = reinterpret_cast<int (*)(unsigned, void**)>(dlsym(lib_, "nvmlDeviceGetHandleByIndex_v2"));
    clock_ = reinterpret_cast<int (*)(void*, int, unsigned*)>(dlsym(lib_, "nvmlDeviceGetClockInfo"));
    power_ = reinterpret_cast<int (*)(void*, unsigned*)>(dlsym(lib_, "nvmlDeviceGetPowerUsage"));
    reasons_ =
        reinterpret_cast<int (*)(void*, unsigned long long*)>(dlsym(lib_, "nvmlDeviceGetCurrentClocksThrottleReasons"));
    ok_ = init != nullptr && handle != nullptr && clock_ != nullptr && init() == 0 && handle(0, &dev_) == 0;
  }
  GpuClock(const GpuClock&) = delete;
  GpuClock& operator=(const GpuClock&) = delete;
  bool ok() const { return ok_; }
  // MHz, 0 when unknown.
  unsigned sm_mhz() const {
    unsigned v = 0;
    return ok_ && clock_(dev_, kClockSm, &v) == 0 ? v : 0;
  }
  // Watts, 0 when unknown.
  unsigned power_w() const {
    unsigned mw = 0;
    return ok_ && power_ != nullptr && power_(dev_, &mw) == 0 ? mw / 1000 : 0;
  }
  // Whether the clock is held down by the power limit (software cap or hardware power brake) now.
  bool power_capped() const {
    unsigned long long r = 0;
    return ok_ && reasons_ != nullptr && reasons_(dev_, &r) == 0 && (r & (kSwPowerCap | kHwPowerBrake)) != 0;
  }

 private:
  static constexpr int kClockSm = 1;                         // NVML_CLOCK_SM
  static constexpr unsigned long long kSwPowerCap = 0x4;     // nvmlClocksThrottleReasonSwPowerCap
  static constexpr unsigned long long kHwPowerBrake = 0x80;  // nvmlClocksThrottleReasonHwPowerBrakeSlowdown
  void* lib_ = nullptr;
  void* dev_ = nullptr;
  bool ok_ = false;
  int (*clock_)(void*, int, unsigned*) = nullptr;
  int (*power_)(void*, unsigned*) = nullptr;
  int (*reasons_)(void*, unsigned long long*) = nullptr;
};

// The readings after each of a path's timed runs, and their medians.
class ClockSamples {
 public:
  void read(const GpuClock& c) {
    mhz_.push_back(c.sm_mhz());
    watts_.push_back(c.power_w());
    capped_ += c.power_capped() ? 1 : 0;
  }
  bool empty() const { return mhz_.empty(); }
  unsigned median_mhz() const { return median(mhz_); }
  unsigned median_w() const { return median(watts_); }
  // The share of the runs after which the power limit held the clock.
  double capped_share() const { return mhz_.empty() ? 0.0 : static_cast<double>(capped_) / mhz_.size(); }

 private:
  static unsigned median(std::vector<unsigned> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  }
  std::vector<unsigned> mhz_, watts_;
  int capped_ = 0;
};
