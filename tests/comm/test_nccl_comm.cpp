// The NCCL communicator on the GPUs of one host, ranks as threads (run_local as bootstrap), one
// GPU per rank. The shared host-side collective checks run through a wrapper that stages host
// buffers on the device. Skips, saying so, where fewer GPUs exist than a case needs.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdio>
#include <latch>
#include <mutex>

#include "collective_checks.h"
#include "comm/communicator.h"
#include "comm/nccl_comm.h"
#include "core/check.h"

namespace cpinfer {
namespace {

using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

// Device copy of a host range; copies back on request.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t bytes) : bytes_(bytes) {
    if (bytes_ > 0) CPI_CHECK(cudaMalloc(&p_, bytes_) == cudaSuccess, "cudaMalloc ", bytes_);
  }
  ~DeviceBuffer() {
    if (p_) cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  char* get() const { return static_cast<char*>(p_); }
  void upload(const void* host, size_t bytes) {
    if (bytes) CPI_CHECK(cudaMemcpy(p_, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess, "upload");
  }
  void download(void* host, size_t bytes) const {
    if (bytes) CPI_CHECK(cudaMemcpy(host, p_, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, "download");
  }

 private:
  void* p_ = nullptr;
  size_t bytes_;
};

size_t sum(std::span<const size_t> v) {
  size_t s = 0;
  for (size_t x : v) s += x;
  return s;
}

// Presents an nccl communicator with host buffers: uploads inputs, runs the collective on device
// copies, downloads outputs. Lets collective_checks.h test the nccl back-end unchanged.
class HostStaged final : public Communicator {
 public:
  explicit HostStaged(std::unique_ptr<Communicator> inner) : inner_(std::move(inner)) { timeout_ = inner_->timeout(); }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string kind() const override { return inner_->kind(); }

  void all_gatherv(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes) override {
    const size_t total = sum(recv_bytes);
    DeviceBuffer d_recv(total);
    size_t my_off = 0;
    for (int r = 0; r < rank(); ++r) my_off += recv_bytes[r];
    if (recv && send == static_cast<char*>(recv) + my_off) {  // in place
      d_recv.upload(recv, total);
      inner_->all_gatherv(d_recv.get() + my_off, send_bytes, d_recv.get(), recv_bytes);
    } else {
      DeviceBuffer d_send(send_bytes);
      d_send.upload(send, send_bytes);
      inner_->all_gatherv(d_send.get(), send_bytes, d_recv.get(), recv_bytes);
    }
    d_recv.download(recv, total);
  }
  void all_reduce_sum(void* buf, size_t count, DType dtype) override {
    DeviceBuffer d(count * dtype_size(dtype));
    d.upload(buf, count * dtype_size(dtype));
    inner_->all_reduce_sum(d.get(), count, dtype);
    d.download(buf, count * dtype_size(dtype));
  }
  void reduce_scatterv_sum(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    const size_t es = dtype_size(dtype);
    DeviceBuffer ds(sum(counts) * es), dr(counts[rank()] * es);
    ds.upload(send, sum(counts) * es);
    inner_->reduce_scatterv_sum(ds.get(), dr.get(), counts, dtype);
    dr.download(recv, counts[rank()] * es);
  }
  void all_to_allv(const void* send, std::span<const size_t> send_bytes, void* recv,
                   std::span<const size_t> recv_bytes) override {
    DeviceBuffer ds(sum(send_bytes)), dr(sum(recv_bytes));
    ds.upload(send, sum(send_bytes));
    inner_->all_to_allv(ds.get(), send_bytes, dr.get(), recv_bytes);
    dr.download(recv, sum(recv_bytes));
  }
  void broadcast(void* buf, size_t bytes, int root) override {
    DeviceBuffer d(bytes);
    d.upload(buf, bytes);
    inner_->broadcast(d.get(), bytes, root);
    d.download(buf, bytes);
  }
  void barrier() override { inner_->barrier(); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    auto sub = inner_->split(color, key);
    if (!sub) return nullptr;
    return std::make_unique<HostStaged>(std::move(sub));
  }

 private:
  std::unique_ptr<Communicator> inner_;
};

// Runs fn on n ranks (threads), rank r with an nccl communicator on GPU r.
void run_on_gpus(int n, const std::function<void(std::unique_ptr<Communicator> nccl)>& fn,
                 std::chrono::milliseconds timeout = 60'000ms) {
  run_local(n, 120'000ms, [&](Communicator& boot) {
    auto nccl = make_nccl_communicator(boot, boot.rank(), nullptr, timeout);
    EXPECT_EQ(nccl->rank(), boot.rank());
    EXPECT_EQ(nccl->size(), n);
    EXPECT_EQ(nccl->kind(), "nccl");
    fn(std::move(nccl));
  });
}

std::vector<int> rank_counts() {
  const int gpus = device_count();
  if (gpus < 2) return {gpus};
  return {1, gpus};
}

TEST(NcclComm, AllCollectivesExact) {
  if (device_count() < 1) GTEST_SKIP() << "no CUDA device: the nccl communicator is not tested here";
  for (int n : rank_counts()) {
    run_on_gpus(n, [](std::unique_ptr<Communicator> nccl) {
      HostStaged staged(std::move(nccl));
      comm_test::check_all(staged);
    });
  }
}

// BF16/F16 sums (small integers: exact) and the equal-counts reduce-scatter path.
TEST(NcclComm, HalfPrecisionAndEqualCounts) {
  if (device_count() < 1) GTEST_SKIP() << "no CUDA device: the nccl communicator is not tested here";
  for (int n : rank_counts()) {
    run_on_gpus(n, [n](std::unique_ptr<Communicator> nccl) {
      HostStaged c(std::move(nccl));
      const int me = c.rank();
      for (DType t : {DType::BF16, DType::F16}) {
        const size_t count = 300;
        std::vector<float> f(count);
        for (size_t i = 0; i < count; ++i) f[i] = static_cast<float>(me + 1 + static_cast<int>(i % 5));
        std::vector<uint16_t> h(count);
        from_f32(f.data(), h.data(), t, count);
        c.all_reduce_sum(h.data(), count, t);
        to_f32(h.data(), t, f.data(), count);
        size_t bad = 0;
        for (size_t i = 0; i < count; ++i)
          bad += f[i] != static_cast<float>(n * (n + 1) / 2 + n * static_cast<int>(i % 5));
        EXPECT_EQ(bad, 0u) << dtype_name(t);
      }
      std::vector<size_t> counts(n, 64);
      std::vector<float> send(64 * static_cast<size_t>(n)), recv(64);
      for (size_t e = 0; e < send.size(); ++e) send[e] = static_cast<float>(e % 13 + me);
      c.reduce_scatterv_sum(send.data(), recv.data(), counts, DType::F32);
      size_t bad = 0;
      for (size_t i = 0; i < 64; ++i) {
        const size_t e = 64 * static_cast<size_t>(me) + i;
        bad += recv[i] != static_cast<float>(n * static_cast<int>(e % 13) + n * (n - 1) / 2);
      }
      EXPECT_EQ(bad, 0u);
    });
  }
}

TEST(NcclComm, HostBufferIsAClearError) {
  if (device_count() < 1) GTEST_SKIP() << "no CUDA device: the nccl communicator is not tested here";
  run_on_gpus(1, [](std::unique_ptr<Communicator> nccl) {
    std::vector<float> host(16, 1.0f);
    try {
      nccl->all_reduce_sum(host.data(), host.size(), DType::F32);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not device memory"), std::string::npos) << e.what();
    }
    EXPECT_THROW(nccl->all_reduce_sum(nullptr, 4, DType::I32), Error);
    nccl->barrier();  // still usable: argument errors are caught before NCCL runs
  });
}

// Rank 1 never enters the all-reduce: rank 0 gives up after the timeout, aborting its NCCL
// communicator (which stops the kernel waiting on the GPU), and says why.
TEST(NcclComm, MissingRankTimesOut) {
  if (device_count() < 2) GTEST_SKIP() << "fewer than 2 CUDA devices: the nccl timeout case is not tested here";
  std::latch rank0_done(1);
  std::string msg;
  double elapsed_ms = 0;
  run_on_gpus(
      2,
      [&](std::unique_ptr<Communicator> nccl) {
        if (nccl->rank() == 1) {
          rank0_done.wait();  // stands in for a rank stuck elsewhere
          return;
        }
        std::vector<float> ones(1024, 1.0f);
        DeviceBuffer d(ones.size() * sizeof(float));
        d.upload(ones.data(), ones.size() * sizeof(float));
        const auto t0 = Clock::now();
        try {
          nccl->all_reduce_sum(d.get(), ones.size(), DType::F32);
        } catch (const Error& e) {
          msg = e.what();
        }
        elapsed_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        EXPECT_THROW(nccl->barrier(), Error);  // aborted: refuses at once
        rank0_done.count_down();
      },
      1000ms);
  EXPECT_NE(msg.find("all_reduce_sum timed out after 1000 ms on NCCL rank 0 of 2"), std::string::npos) << msg;
  EXPECT_GE(elapsed_ms, 990.0);
  EXPECT_LT(elapsed_ms, 2000.0);
}

// Perf mode, off by default (run with --gtest_also_run_disabled_tests on a multi-GPU machine):
// time per call and bus bandwidth of the collectives context parallelism uses, 64 MiB per rank.
TEST(NcclComm, DISABLED_Throughput) {
  const int n = device_count();
  if (n < 2) GTEST_SKIP() << "fewer than 2 CUDA devices";
  run_on_gpus(n, [n](std::unique_ptr<Communicator> c) {
    const int me = c->rank();
    const size_t part = size_t{64} << 20;
    DeviceBuffer send(part), recv(part * n);
    CPI_CHECK(cudaMemset(send.get(), me + 1, part) == cudaSuccess, "memset");
    auto time_ms = [&](const std::function<void()>& f) {
      f();  // warm-up (connections, buffers)
      c->barrier();
      const int iters = 10;
      const auto t0 = Clock::now();
      for (int i = 0; i < iters; ++i) f();
      return std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / iters;
    };
    auto report = [&](const char* what, double ms, double bus_bytes) {
      if (me == 0) std::printf("[perf] %-28s n=%d %8.3f ms  busbw %7.1f GB/s\n", what, n, ms, bus_bytes / ms / 1e6);
    };
    std::vector<size_t> eq(n, part), uneq(n);
    for (int r = 0; r < n; ++r) uneq[r] = part - static_cast<size_t>(r) * 4096;
    const double frac = static_cast<double>(n - 1) / n;
    report("all_gatherv (equal)", time_ms([&] { c->all_gatherv(send.get(), part, recv.get(), eq); }),
           frac * static_cast<double>(part) * n);
    std::vector<uint8_t> first(n);
    for (int r = 0; r < n; ++r) {
      CPI_CHECK(cudaMemcpy(&first[r], recv.get() + r * part, 1, cudaMemcpyDeviceToHost) == cudaSuccess, "copy");
      EXPECT_EQ(first[r], r + 1);
    }
    report("all_gatherv (unequal)", time_ms([&] { c->all_gatherv(send.get(), uneq[me], recv.get(), uneq); }),
           frac * static_cast<double>(part) * n);
    report("all_reduce_sum f32", time_ms([&] { c->all_reduce_sum(recv.get(), part / 4, DType::F32); }),
           2.0 * frac * static_cast<double>(part));
    report("all_reduce_sum bf16", time_ms([&] { c->all_reduce_sum(recv.get(), part / 2, DType::BF16); }),
           2.0 * frac * static_cast<double>(part));
    std::vector<size_t> a2a(n, part / n);
    report("all_to_allv (equal)", time_ms([&] { c->all_to_allv(send.get(), a2a, recv.get(), a2a); }),
           frac * static_cast<double>(part));
    std::vector<size_t> counts(n, part / 4 / n);
    report("reduce_scatterv f32 (equal)",
           time_ms([&] { c->reduce_scatterv_sum(recv.get(), send.get(), counts, DType::F32); }),
           frac * static_cast<double>(part));
    counts[0] += 1024;
    counts[n - 1] -= 1024;
    report("reduce_scatterv f32 (uneq)",
           time_ms([&] { c->reduce_scatterv_sum(recv.get(), send.get(), counts, DType::F32); }),
           frac * static_cast<double>(part));
    report("barrier", time_ms([&] { c->barrier(); }), 0.0);
  });
}

}  // namespace
}  // namespace cpinfer
