// Shared helpers of the op tests: owned host tensors with random contents, a double-precision
// view of any float tensor, a closeness check that also catches unwritten (NaN-poisoned)
// outputs, and the fixture of the CpuAttention suite (two files).
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"

namespace cpinfer::test {

// A tensor that owns its host bytes (8-byte aligned).
struct HostTensor {
  std::vector<uint64_t> storage;  // uint64 keeps 8-byte alignment for I64
  Tensor t;

  HostTensor() = default;
  HostTensor(DType dtype, std::initializer_list<int64_t> dims) {
    t = Tensor(nullptr, dtype, dims);
    storage.assign((t.nbytes() + 7) / 8 + 1, 0);
    t.data = storage.data();
  }
  HostTensor(const HostTensor& o) : storage(o.storage), t(o.t) { t.data = storage.data(); }
  HostTensor& operator=(const HostTensor& o) {
    storage = o.storage;
    t = o.t;
    t.data = storage.data();
    return *this;
  }
  operator Tensor() const { return t; }
  operator Weight() const { return Weight(t); }  // a float weight (linear, experts)
  int64_t numel() const { return t.numel(); }
  template <class T>
  T* ptr() {
    return t.ptr<T>();
  }

  // Element i as double (float dtypes and I32/I64).
  double get(int64_t i) const {
    switch (t.dtype) {
      case DType::F32:
        return t.ptr<const float>()[i];
      case DType::F16:
        return f16_to_f32(t.ptr<const uint16_t>()[i]);
      case DType::BF16:
        return bf16_to_f32(t.ptr<const uint16_t>()[i]);
      case DType::I32:
        return t.ptr<const int32_t>()[i];
      case DType::I64:
        return static_cast<double>(t.ptr<const int64_t>()[i]);
      default:
        return 0.0;
    }
  }
  void set(int64_t i, double v) {
    float f = static_cast<float>(v);
    switch (t.dtype) {
      case DType::F32:
        t.ptr<float>()[i] = f;
        break;
      case DType::F16:
        t.ptr<uint16_t>()[i] = f32_to_f16(f);
        break;
      case DType::BF16:
        t.ptr<uint16_t>()[i] = f32_to_bf16(f);
        break;
      case DType::I32:
        t.ptr<int32_t>()[i] = static_cast<int32_t>(v);
        break;
      case DType::I64:
        t.ptr<int64_t>()[i] = static_cast<int64_t>(v);
        break;
      default:
        break;
    }
  }
  std::vector<double> to_double() const {
    std::vector<double> out(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) out[static_cast<size_t>(i)] = get(i);
    return out;
  }
  // NaN everywhere, so an element the op forgot to write fails the check.
  void poison() {
    for (int64_t i = 0; i < numel(); ++i) set(i, std::numeric_limits<double>::quiet_NaN());
  }
};

class Rng {
 public:
  explicit Rng(uint32_t seed) : gen_(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(gen_); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(gen_); }
  std::mt19937& gen() { return gen_; }

  HostTensor normal_tensor(DType dtype, std::initializer_list<int64_t> dims, double stddev = 1.0, double mean = 0.0) {
    HostTensor h(dtype, dims);
    for (int64_t i = 0; i < h.numel(); ++i) h.set(i, mean + stddev * normal());
    return h;
  }

 private:
  std::mt19937 gen_;
};

inline HostTensor index_tensor(const std::vector<int64_t>& v, DType dtype = DType::I32) {
  HostTensor h(dtype, {static_cast<int64_t>(v.size())});
  for (size_t i = 0; i < v.size(); ++i) h.set(static_cast<int64_t>(i), static_cast<double>(v[i]));
  return h;
}

// Every element written (finite) and |actual - ref| <= rtol * (|ref| + rms(ref)): relative per
// element, with the tensor's own scale as the floor where an element cancels to ~0.
inline ::testing::AssertionResult all_close(const HostTensor& actual, const std::vector<double>& ref, double rtol,
                                            const std::string& what = "") {
  if (static_cast<size_t>(actual.numel()) != ref.size())
    return ::testing::AssertionFailure() << what << ": size " << actual.numel() << " vs reference " << ref.size();
  double ss = 0.0;
  for (double r : ref) ss += r * r;
  const double rms = ref.empty() ? 0.0 : std::sqrt(ss / static_cast<double>(ref.size()));
  double worst = 0.0;
  int64_t worst_i = -1;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double a = actual.get(static_cast<int64_t>(i));
    if (!std::isfinite(a))
      return ::testing::AssertionFailure() << what << ": element " << i << " is " << a << " (not written?)";
    const double err = std::abs(a - ref[i]) / (std::abs(ref[i]) + rms + 1e-30);
    if (err > worst) {
      worst = err;
      worst_i = static_cast<int64_t>(i);
    }
  }
  if (worst > rtol)
    return ::testing::AssertionFailure() << what << ": relative error " << worst << " > " << rtol << " at element "
                                         << worst_i << " (got " << actual.get(worst_i) << ", want " << ref[worst_i]
                                         << ")";
  return ::testing::AssertionSuccess();
}

// core/dtype.h's name as a std::string (for test messages built with +).
inline std::string dtype_str(DType t) { return std::string(dtype_name(t)); }

// Sanitizer builds run the long cases at reduced size to stay within the CI time budget.
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// The fixture of the CpuAttention suite, whose tests span test_cpu_rope_kv.cpp and
// test_cpu_attention.cpp: one class for both, as gtest requires of the tests of one suite.
class CpuAttention : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

}  // namespace cpinfer::test
