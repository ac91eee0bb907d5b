// Tensor: a non-owning, contiguous, row-major view (pointer + dtype + shape + device).
// Ownership lives elsewhere (Buffer below, the mmap of a checkpoint, a back-end allocation).
#pragma once
#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/check.h"
#include "core/dtype.h"

namespace cpinfer {

enum class Device : uint8_t { CPU, CUDA };

struct Tensor {
  static constexpr int kMaxDims = 4;
  void* data = nullptr;
  DType dtype = DType::F32;
  Device device = Device::CPU;
  int ndim = 0;
  std::array<int64_t, kMaxDims> shape{};

  Tensor() = default;
  Tensor(void* d, DType t, std::initializer_list<int64_t> dims, Device dev = Device::CPU)
      : data(d), dtype(t), device(dev) {
    CPI_CHECK(dims.size() <= kMaxDims, "tensor rank ", dims.size(), " > ", kMaxDims);
    for (int64_t s : dims) shape[ndim++] = s;
  }

  bool defined() const { return ndim > 0; }
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype); }
  // Product of all dimensions but the last: the number of rows of a 2-D reading.
  int64_t rows() const { return ndim == 0 ? 0 : numel() / shape[ndim - 1]; }
  int64_t cols() const { return ndim == 0 ? 0 : shape[ndim - 1]; }
  size_t row_bytes() const { return static_cast<size_t>(cols()) * dtype_size(dtype); }

  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }

  // Same data, another shape with the same element count.
  Tensor view(std::initializer_list<int64_t> dims) const {
    Tensor t(data, dtype, dims, device);
    CPI_CHECK(t.numel() == numel(), "view ", t.shape_str(), " of ", shape_str(), " changes the element count");
    return t;
  }
  // Rows [begin, begin+n) along the first dimension.
  Tensor slice(int64_t begin, int64_t n) const {
    CPI_CHECK(ndim >= 1 && begin >= 0 && n >= 0 && begin + n <= shape[0], "slice [", begin, ", ", begin + n,
              ") out of ", shape_str());
    Tensor t = *this;
    int64_t inner = numel() / (shape[0] == 0 ? 1 : shape[0]);
    t.data = static_cast<char*>(data) + static_cast<size_t>(begin * inner) * dtype_size(dtype);
    t.shape[0] = n;
    return t;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (int i = 0; i < ndim; ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

}  // namespace cpinfer
