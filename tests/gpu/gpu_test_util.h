// Harness of the CUDA op tests (llama.cpp test-backend-ops style): every case runs one op on the
// CPU reference back-end (fp32, inputs already rounded to bf16 so both sides see the same values)
// and on the CUDA back-end, then compares by normalized MSE Σ(a−b)²/Σb² and max abs error and
// prints one summary line per case. CUDA outputs live inside guarded allocations: the bytes
// around them must come back untouched, and outputs start NaN-poisoned so that an element the
// op forgot to write fails the comparison.
#pragma once
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "ops/backend.h"

namespace cpinfer::gputest {

// True when a CUDA device can be used; otherwise `why` says what failed.
inline bool cuda_device_present(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *why = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
    cudaGetLastError();
    return false;
  }
  if (n == 0) {
    *why = "cudaGetDeviceCount returned 0";
    return false;
  }
  return true;
}

class Rng {
 public:
  explicit Rng(uint32_t seed) : gen_(seed) {}
  // n values ~ N(0, scale²), rounded to bf16.
  std::vector<float> bf16_normal(size_t n, float scale = 1.0f) {
    std::normal_distribution<float> d(0.0f, scale);
    std::vector<float> v(n);
    for (auto& x : v) x = bf16_to_f32(f32_to_bf16(d(gen_)));
    return v;
  }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(gen_); }
  std::mt19937& gen() { return gen_; }

 private:
  std::mt19937 gen_;
};

struct Stats {
  double nmse = 0.0;
  double max_err = 0.0;
  int64_t n_nan = 0;
};

inline Stats compare_values(const std::vector<float>& got, const std::vector<float>& ref) {
  Stats s;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++s.n_nan;
      continue;
    }
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
    s.max_err = std::max(s.max_err, std::fabs(d));
  }
  s.nmse = den > 0.0 ? num / den : num;
  return s;
}

class GpuOpsTest : public ::testing::Test {
 protected:
  static constexpr size_t kGuardBytes = 256;  // keeps the guarded data 256-byte aligned
  static constexpr uint8_t kGuardByte = 0x5A;

  void SetUp() override {
    std::string why;
    if (!cuda_device_present(&why)) GTEST_SKIP() << "no CUDA device: " << why;
    cpu_ = make_cpu_backend();
    gpu_ = make_cuda_backend(0);
  }

  void TearDown() override {
    if (!gpu_) return;
    gpu_->sync();
    for (const Guarded& g : guarded_) {
      std::vector<uint8_t> bytes(g.total);
      gpu_->download(bytes.data(), g.buf->data(), g.total);
      size_t bad = 0;
      for (size_t i = 0; i < kGuardBytes; ++i) bad += bytes[i] != kGuardByte;
      for (size_t i = g.total - kGuardBytes; i < g.total; ++i) bad += bytes[i] != kGuardByte;
      EXPECT_EQ(bad, 0u) << "guard bytes around CUDA tensor '" << g.name << "' were overwritten (" << bad << " of "
                         << 2 * kGuardBytes << ")";
    }
  }

  // ---- CPU tensors (fp32 activations; host memory of the CPU back-end)
  Tensor cpu_f32(const std::vector<float>& v, std::initializer_list<int64_t> dims) {
    Tensor t = cpu_alloc(DType::F32, dims);
    CPI_CHECK(static_cast<size_t>(t.numel()) == v.size(), "cpu_f32: ", v.size(), " values for ", t.shape_str());
    if (!v.empty()) std::memcpy(t.data, v.data(), v.size() * 4);
    return t;
  }
  Tensor cpu_i32(const std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
    Tensor t = cpu_alloc(DType::I32, dims);
    if (!v.empty()) std::memcpy(t.data, v.data(), v.size() * 4);
    return t;
  }
  Tensor cpu_alloc(DType dt, std::initializer_list<int64_t> dims) {
    Tensor shape(nullptr, dt, dims, Device::CPU);
    cpu_bufs_.emplace_back(*cpu_, std::max<size_t>(shape.nbytes(), 16));
    Tensor t(cpu_bufs_.back().data(), dt, dims, Device::CPU);
    return t;
  }
  static std::vector<float> cpu_read(const Tensor& t) {
    std::vector<float> v(static_cast<size_t>(t.numel()));
    to_f32(t.data, t.dtype, v.data(), v.size());
    return v;
  }

  // ---- CUDA tensors inside guard bytes. `init` null: NaN-poisoned (float) / 0x5A bytes.
  Tensor gpu_tensor(const std::string& name, DType dt, std::initializer_list<int64_t> dims,
                    const std::vector<float>* init) {
    Tensor shape(nullptr, dt, dims, Device::CUDA);
    const size_t data_bytes = shape.nbytes();
    const size_t total = kGuardBytes + data_bytes + kGuardBytes;
    auto buf = std::make_unique<Buffer>(*gpu_, total);
    std::vector<uint8_t> host(total, kGuardByte);
    uint8_t* data = host.data() + kGuardBytes;
    const size_t n = static_cast<size_t>(shape.numel());
    if (dt == DType::F32 || dt == DType::BF16 || dt == DType::F16) {
      std::vector<float> vals = init ? *init : std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
      CPI_CHECK(vals.size() == n, "gpu_tensor ", name, ": ", vals.size(), " values for ", shape.shape_str());
      from_f32(vals.data(), data, dt, n);
    } else if (init) {
      CPI_FAIL("gpu_tensor ", name, ": use gpu_i32 for integer tensors");
    }
    gpu_->upload(buf->data(), host.data(), total);
    Tensor t(static_cast<uint8_t*>(buf->data()) + kGuardBytes, dt, dims, Device::CUDA);
    guarded_.push_back(Guarded{name, buf.get(), total});
    gpu_bufs_.push_back(std::move(buf));
    return t;
  }
  Tensor gpu_i32(const std::string& name, const std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
    Tensor shape(nullptr, DType::I32, dims, Device::CUDA);
    CPI_CHECK(static_cast<size_t>(shape.numel()) == v.size(), "gpu_i32 ", name, ": size mismatch");
    auto buf = std::make_unique<Buffer>(*gpu_, std::max<size_t>(shape.nbytes(), 16));
    gpu_->upload(buf->data(), v.data(), v.size() * 4);
    Tensor t(buf->data(), DType::I32, dims, Device::CUDA);
    gpu_bufs_.push_back(std::move(buf));
    return t;
  }
  std::vector<float> gpu_read(const Tensor& t) {
    gpu_->sync();
    std::vector<uint8_t> bytes(t.nbytes());
    gpu_->download(bytes.data(), t.data, bytes.size());
    std::vector<float> v(static_cast<size_t>(t.numel()));
    to_f32(bytes.data(), t.dtype, v.data(), v.size());
    return v;
  }
  std::vector<int32_t> gpu_read_i32(const Tensor& t) {
    gpu_->sync();
    std::vector<int32_t> v(static_cast<size_t>(t.numel()));
    gpu_->download(v.data(), t.data, v.size() * 4);
    return v;
  }

  // Compares and prints "[gpu_ops] op shape nmse max_err"; fails above the tolerances.
  void expect_close(const std::string& op, const std::string& shape, const std::vector<float>& got,
                    const std::vector<float>& ref, double max_nmse, double max_abs) {
    ASSERT_EQ(got.size(), ref.size()) << op << " " << shape;
    const Stats s = compare_values(got, ref);
    std::printf("[gpu_ops] %-16s %-34s nmse=%.3e max_err=%.3e%s\n", op.c_str(), shape.c_str(), s.nmse, s.max_err,
                s.n_nan ? "  NON-FINITE/UNWRITTEN" : "");
    std::fflush(stdout);
    EXPECT_EQ(s.n_nan, 0) << op << " " << shape << ": " << s.n_nan << " of " << got.size()
                          << " outputs are NaN/inf (unwritten or broken)";
    EXPECT_LE(s.nmse, max_nmse) << op << " " << shape;
    EXPECT_LE(s.max_err, max_abs) << op << " " << shape;
  }

  std::unique_ptr<Backend> cpu_, gpu_;

 private:
  struct Guarded {
    std::string name;
    Buffer* buf;
    size_t total;  // kGuardBytes | data | kGuardBytes
  };
  std::vector<Buffer> cpu_bufs_;
  std::vector<std::unique_ptr<Buffer>> gpu_bufs_;
  std::vector<Guarded> guarded_;
};

inline std::string shape_of(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    s += (first ? "" : ",") + std::to_string(d);
    first = false;
  }
  return s + "]";
}

}  // namespace cpinfer::gputest
