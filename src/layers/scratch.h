// What every layer needs besides its weights: scratch tensors that grow on demand and are reused
// across forwards, and the profiler that books wall time to a kind of work.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "layers/options.h"
#include "ops/backend.h"

namespace cpinfer {

// Scratch buffers of one layer object, by slot (the layer's own small enum).
class Scratch {
 public:
  Scratch(Backend& be, int n_slots) : be_(be), bufs_(size_t(n_slots)) {}
  Tensor get(int slot, DType t, std::initializer_list<int64_t> dims) {
    Tensor probe(nullptr, t, dims, be_.device());
    const size_t bytes = std::max<size_t>(probe.nbytes(), 16);
    Buffer& b = bufs_[size_t(slot)];
    if (b.bytes() < bytes) b = Buffer(be_, bytes + bytes / 4);
    return b.tensor(t, dims);
  }
  // [n, cols] rows (storage for at least one row, so that n = 0 still has a valid pointer).
  Tensor rows(int slot, DType t, int64_t n, int64_t cols) {
    return get(slot, t, {std::max<int64_t>(n, 1), cols}).slice(0, n);
  }
  Tensor upload_i32(int slot, const std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
    Tensor t = get(slot, DType::I32, dims);
    if (!v.empty()) be_.upload(t.data, v.data(), v.size() * sizeof(int32_t));
    return t;
  }

 private:
  Backend& be_;
  std::vector<Buffer> bufs_;
};

// Books the wall time since the previous mark to one kind of work; a no-op unless profiling
// (when it synchronizes the device at every mark).
class Profiler {
 public:
  Profiler(Backend& be, const ModelOptions& opt) : be_(be), opt_(opt) {}
  void start();
  void mark(double ForwardProfile::*bucket);
  const ForwardProfile& profile() const { return profile_; }

 private:
  Backend& be_;
  const ModelOptions& opt_;
  ForwardProfile profile_;
  double t_ = 0;
};

}  // namespace cpinfer
