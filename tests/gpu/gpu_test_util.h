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
#include <functional>
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

// Records `op` (which enqueues on `stream`) with a global-mode stream capture, which fails on any
// host synchronization, then launches the graph once and waits for it. error is empty when all of
// that worked, else says what failed (the op's exception or the capture's error); n_nodes counts
// the recorded graph's nodes.
struct CaptureRun {
  std::string error;
  size_t n_nodes = 0;
};
inline CaptureRun capture_and_launch(cudaStream_t stream, const std::function<void()>& op) {
  CaptureRun r;
  cudaError_t err = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
  if (err != cudaSuccess) return {std::string("cudaStreamBeginCapture: ") + cudaGetErrorString(err), 0};
  try {
    op();
  } catch (const std::exception& e) {
    r.error = std::string("the op threw under capture: ") + e.what();
  }
  cudaGraph_t graph = nullptr;
  err = cudaStreamEndCapture(stream, &graph);
  cudaGetLastError();  // an invalidated capture leaves its error behind
  if (r.error.empty() && err != cudaSuccess) r.error = std::string("capture invalidated: ") + cudaGetErrorString(err);
  if (r.error.empty()) {
    cudaGraphGetNodes(graph, nullptr, &r.n_nodes);
    cudaGraphExec_t exec = nullptr;
    err = cudaGraphInstantiate(&exec, graph, 0);
    if (err == cudaSuccess) err = cudaGraphLaunch(exec, stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
    if (err != cudaSuccess) r.error = std::string("graph instantiate / launch: ") + cudaGetErrorString(err);
    if (exec) cudaGraphExecDestroy(exec);
  }
  if (graph) cudaGraphDestroy(graph);
  return r;
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

  // op(out) on out [rows, cols] BF16 starting as init: a warm-up call (which may grow buffers and
  // synchronize), then into a fresh copy eagerly and into another recorded with capture_and_launch
  // on `stream`. The recorded call must not synchronize, and the replay must give the eager result
  // bit for bit, different from init. Returns the graph's node count (0 when it failed).
  size_t expect_graph_matches_eager(const std::string& what, int64_t rows, int64_t cols, const std::vector<float>& init,
                                    cudaStream_t stream, const std::function<void(Tensor)>& op) {
    Tensor eager = gpu_tensor("eager", DType::BF16, {rows, cols}, &init);
    Tensor graphed = gpu_tensor("graphed", DType::BF16, {rows, cols}, &init);
    op(eager);  // warm-up: workspace, pointer tables
    gpu_->sync();
    Tensor fresh = gpu_tensor("eager2", DType::BF16, {rows, cols}, &init);
    op(fresh);
    const CaptureRun run = capture_and_launch(stream, [&] { op(graphed); });
    EXPECT_TRUE(run.error.empty()) << what << ": " << run.error;
    if (!run.error.empty()) return 0;
    std::printf("[gpu_ops] captured %s: %zu graph nodes\n", what.c_str(), run.n_nodes);
    const std::vector<float> a = gpu_read(fresh), b = gpu_read(graphed);
    size_t diff = 0, first = a.size();
    for (size_t i = 0; i < a.size(); ++i)
      if (a[i] != b[i] && diff++ == 0) first = i;
    EXPECT_EQ(diff, 0u) << what << ": the graph replay differs from the eager call in " << diff << " of " << a.size()
                        << " elements, first at index " << first;
    EXPECT_GT(compare_values(b, init).nmse, 1e-3) << what << ": the captured call did not change the output";
    return run.n_nodes;
  }

  // Backend::moe_experts_add_rms_norm (the MoE block with the next sub-layer's residual add +
  // RMSNorm in its weighted sum) against moe_experts + add_rms_norm on the GPU: the residual and the
  // normed rows bit for bit, for norm weights in BF16 and F32, with h a buffer of its own and with
  // h = x (as the decoder calls it). x, ids, w and shard as for moe_experts; x keeps its values.
  // no_local: no pair is the shard's, so the residual must stay as it was.
  void expect_moe_norm_fused_exact(const std::string& what, const Tensor& x, const Tensor& ids, const Tensor& w,
                                   const ExpertShard& shard, Rng& rng, bool no_local = false) {
    const int64_t t = x.rows(), h = x.cols();
    const std::vector<float> x0 = gpu_read(x), res0 = rng.bf16_normal(t * h, 2.0f);
    std::vector<float> nw = rng.bf16_normal(h, 0.2f);
    for (float& v : nw) v += 1.0f;
    const float eps = 1e-6f;
    for (DType wdt : {DType::BF16, DType::F32}) {
      for (bool alias : {false, true}) {
        const std::string sh = what + (wdt == DType::F32 ? " normF32" : " normBF16") + (alias ? " h=x" : "");
        Tensor gnw = gpu_tensor("norm_w", wdt, {h}, &nw);
        Tensor out1 = gpu_tensor("out", x.dtype, {t, h}, nullptr);
        Tensor r1 = gpu_tensor("residual", x.dtype, {t, h}, &res0), h1 = gpu_tensor("h", x.dtype, {t, h}, nullptr);
        gpu_->moe_experts(x, ids, w, shard, out1);
        gpu_->add_rms_norm(r1, out1, gnw, eps, h1);
        Tensor xin = alias ? gpu_tensor("x", x.dtype, {t, h}, &x0) : x;
        Tensor out2 = gpu_tensor("out", x.dtype, {t, h}, nullptr);
        Tensor r2 = gpu_tensor("residual", x.dtype, {t, h}, &res0);
        Tensor h2 = alias ? xin : gpu_tensor("h", x.dtype, {t, h}, nullptr);
        gpu_->moe_experts_add_rms_norm(xin, ids, w, shard, out2, r2, gnw, eps, h2);
        const std::vector<float> want_r = gpu_read(r1), want_h = gpu_read(h1);
        const std::vector<float> got_r = gpu_read(r2), got_h = gpu_read(h2);
        EXPECT_EQ(compare_values(want_h, want_h).n_nan, 0) << sh << ": the two ops left NaNs";
        if (no_local)
          EXPECT_EQ(compare_values(want_r, res0).max_err, 0.0) << sh << ": no local pair, yet the residual changed";
        else
          EXPECT_GT(compare_values(want_r, res0).nmse, 1e-6) << sh << ": the experts added nothing";
        size_t diff_r = 0, diff_h = 0;
        for (size_t i = 0; i < want_r.size(); ++i) {
          diff_r += !(got_r[i] == want_r[i]);
          diff_h += !(got_h[i] == want_h[i]);
        }
        EXPECT_EQ(diff_r, 0u) << sh << ": residual differs from add_rms_norm's in " << diff_r << " of " << t * h;
        EXPECT_EQ(diff_h, 0u) << sh << ": normed rows differ from add_rms_norm's in " << diff_h << " of " << t * h;
        std::printf("[gpu_ops] moe_experts_add_rms_norm %s: residual %zu, h %zu elements differ\n", sh.c_str(), diff_r,
                    diff_h);
      }
    }
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
