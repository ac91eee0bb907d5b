// The "nccl" back-end. The communicator is created non-blocking (config.blocking = 0), so no NCCL
// call can hang the host: each call returns at once (possibly ncclInProgress) and completion is
// polled with ncclCommGetAsyncError (issue) and cudaStreamQuery (GPU work) until the deadline,
// after which the communicator is aborted with ncclCommAbort and the call throws.
//
// Bound to a compute stream (bind_stream) the communicator is queued: a collective waits on an
// event of the compute stream, runs on the communicator's own stream and hands the compute stream
// an event to wait on; the host returns at once. A watchdog thread follows the queued collectives
// in order: it notes when each one could start (an event recorded just before it) and aborts the
// communicator when one runs longer than the timeout after that, or NCCL reports an error. Every
// NCCL call is made under one mutex, so the abort never races a call of the rank's thread.
//
// NCCL has no v-collectives: all_gatherv is one ncclAllGather when all parts are equal, else a
// group of broadcasts (one per rank, ring-pipelined); reduce_scatterv is ncclReduceScatter when all
// counts are equal, else a group of reduces; all_to_allv is a group of send/recv pairs.
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/nccl_comm.h"
#include "core/check.h"

namespace cpinfer {
namespace {

using Clock = std::chrono::steady_clock;

#define CPI_CUDA_OK(call)                                                                                \
  do {                                                                                                   \
    cudaError_t _e = (call);                                                                             \
    CPI_CHECK(_e == cudaSuccess, #call " failed: ", cudaGetErrorName(_e), ": ", cudaGetErrorString(_e)); \
  } while (0)

bool dtype_to_nccl(DType t, ncclDataType_t& out) {
  switch (t) {
    case DType::F32:
      out = ncclFloat32;
      return true;
    case DType::BF16:
      out = ncclBfloat16;
      return true;
    case DType::F16:
      out = ncclFloat16;
      return true;
    default:
      return false;
  }
}

void backoff(int spins) {
  if (spins < 2000) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, cudaStream_t stream, bool own_stream, std::chrono::milliseconds timeout)
      : comm_(comm), device_(device), stream_(stream), own_stream_(own_stream) {
    timeout_ = timeout;
    ncclCommUserRank(comm_, &rank_);
    ncclCommCount(comm_, &size_);
    cudaError_t e = cudaSetDevice(device_);
    if (e == cudaSuccess) e = cudaMalloc(&scratch_, sizeof(float));
    if (e != cudaSuccess) {  // the destructor will not run: release what this object was given
      ncclCommAbort(comm_);
      if (own_stream_) cudaStreamDestroy(stream_);
      CPI_FAIL("nccl communicator: cudaMalloc of 4 bytes on device ", device_, " failed: ", cudaGetErrorString(e));
    }
  }

  ~NcclCommunicator() override {
    if (watchdog_.joinable()) {
      {
        std::lock_guard<std::mutex> lk(mu_);
        stop_ = true;
      }
      cv_.notify_all();
      watchdog_.join();
    }
    cudaSetDevice(device_);
    if (comm_ != nullptr) {
      // Finalize flushes outstanding work and needs the peers; one that never comes must not hang
      // us for long, so give it a bounded wait and abort otherwise.
      ncclResult_t st = ncclCommFinalize(comm_);
      const auto deadline = Clock::now() + std::min<std::chrono::milliseconds>(timeout_, std::chrono::seconds(30));
      for (int spins = 0; st == ncclSuccess || st == ncclInProgress; ++spins) {
        if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess || st != ncclInProgress) break;
        if (Clock::now() >= deadline) break;
        backoff(spins);
      }
      if (st == ncclSuccess) {
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (scratch_) cudaFree(scratch_);
    for (const Pending& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.done);
    }
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    for (const auto& o : open_) cudaEventDestroy(o.second);
    if (own_stream_ && stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "nccl"; }

  void bind_stream(void* compute_stream) override {
    std::lock_guard<std::mutex> lk(mu_);
    CPI_CHECK(compute_ == nullptr || compute_ == compute_stream, "nccl communicator: already bound to another stream");
    if (compute_stream == nullptr || compute_ != nullptr) return;
    CPI_CUDA_OK(cudaSetDevice(device_));
    compute_ = static_cast<cudaStream_t>(compute_stream);
    watchdog_ = std::thread([this] { watch(); });
  }
  bool queued() const override { return compute_ != nullptr; }

  void all_gatherv(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes) override {
    gather(send, send_bytes, recv, recv_bytes, false);
  }
  Ticket all_gatherv_start(const void* send, size_t send_bytes, void* recv,
                           std::span<const size_t> recv_bytes) override {
    return gather(send, send_bytes, recv, recv_bytes, true);
  }
  void reduce_scatterv_sum(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    reduce_scatter(send, recv, counts, dtype, false);
  }
  Ticket reduce_scatterv_sum_start(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    return reduce_scatter(send, recv, counts, dtype, true);
  }
  void join(Ticket ticket) override {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = std::find_if(open_.begin(), open_.end(), [&](const auto& o) { return o.first == ticket; });
    if (it == open_.end()) return;  // 0 (completed synchronously) or joined already
    CPI_CUDA_OK(cudaStreamWaitEvent(compute_, it->second, 0));
    free_events_.push_back(it->second);  // reusable once recorded: the wait captured it
    open_.erase(it);
  }
  void wait_all() override {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return pending_.empty() || !failure_.empty(); });
    CPI_CHECK(failure_.empty(), failure_);
    CPI_CHECK(open_.empty(), "nccl communicator: ", open_.size(), " overlapped collective(s) never joined");
  }

 private:
  Ticket gather(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes, bool overlap) {
    const char* name = "all_gatherv";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    check_counts(recv_bytes, "recv_bytes", name);
    CPI_CHECK(recv_bytes[rank_] == send_bytes, name, ": recv_bytes[", rank_, "] = ", recv_bytes[rank_],
              " but this rank sends ", send_bytes, " bytes");
    size_t total = 0;
    for (size_t b : recv_bytes) total += b;
    check_device(send, send_bytes, "send", name);
    check_device(recv, total, "recv", name);
    if (total == 0) return 0;
    enqueue_begin();
    if (std::all_of(recv_bytes.begin(), recv_bytes.end(), [&](size_t b) { return b == recv_bytes[0]; })) {
      // Equal parts (the common case): one all-gather instead of n broadcasts.
      issue(ncclAllGather(send, recv, send_bytes, ncclUint8, comm_, stream_), name, deadline);
      return finish(name, deadline, overlap);
    }
    issue(ncclGroupStart(), name, deadline);
    size_t off = 0;
    for (int r = 0; r < size_; ++r) {
      if (recv_bytes[r] > 0)
        // sendbuff is only read on the root; elsewhere pass the destination as a valid pointer.
        issue(ncclBroadcast(r == rank_ ? send : static_cast<char*>(recv) + off, static_cast<char*>(recv) + off,
                            recv_bytes[r], ncclUint8, r, comm_, stream_),
              name, deadline);
      off += recv_bytes[r];
    }
    issue(ncclGroupEnd(), name, deadline);
    return finish(name, deadline, overlap);
  }
  Ticket reduce_scatter(const void* send, void* recv, std::span<const size_t> counts, DType dtype, bool overlap) {
    const char* name = "reduce_scatterv_sum";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    ncclDataType_t t;
    CPI_CHECK(dtype_to_nccl(dtype, t), name, ": dtype ", dtype_name(dtype), " not supported (F32, BF16, F16)");
    check_counts(counts, "counts", name);
    const size_t es = dtype_size(dtype);
    size_t total = 0;
    bool equal = true;
    for (size_t c : counts) {
      total += c;
      equal &= c == counts[0];
    }
    check_device(send, total * es, "send", name);
    check_device(recv, counts[rank_] * es, "recv", name);
    if (total == 0) return 0;
    enqueue_begin();
    if (equal) {
      issue(ncclReduceScatter(send, recv, counts[0], t, ncclSum, comm_, stream_), name, deadline);
    } else {
      issue(ncclGroupStart(), name, deadline);
      size_t off = 0;
      for (int r = 0; r < size_; ++r) {
        const char* seg = static_cast<const char*>(send) + off * es;
        // recvbuff is only read on the root; elsewhere pass the segment itself as a valid pointer.
        if (counts[r] > 0)
          issue(ncclReduce(seg, r == rank_ ? recv : const_cast<char*>(seg), counts[r], t, ncclSum, r, comm_, stream_),
                name, deadline);
        off += counts[r];
      }
      issue(ncclGroupEnd(), name, deadline);
    }
    return finish(name, deadline, overlap);
  }

 public:
  void all_reduce_sum(void* buf, size_t count, DType dtype) override {
    const char* name = "all_reduce_sum";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    ncclDataType_t t;
    CPI_CHECK(dtype_to_nccl(dtype, t), name, ": dtype ", dtype_name(dtype), " not supported (F32, BF16, F16)");
    check_device(buf, count * dtype_size(dtype), "", name);
    if (count == 0) return;
    enqueue_begin();
    issue(ncclAllReduce(buf, buf, count, t, ncclSum, comm_, stream_), name, deadline);
    finish(name, deadline, false);
  }

  void all_to_allv(const void* send, std::span<const size_t> send_bytes, void* recv,
                   std::span<const size_t> recv_bytes) override {
    all_to_all(send, send_bytes, recv, recv_bytes, false);
  }
  Ticket all_to_allv_start(const void* send, std::span<const size_t> send_bytes, void* recv,
                           std::span<const size_t> recv_bytes) override {
    return all_to_all(send, send_bytes, recv, recv_bytes, true);
  }
  Ticket all_to_all(const void* send, std::span<const size_t> send_bytes, void* recv,
                    std::span<const size_t> recv_bytes, bool overlap) {
    const char* name = "all_to_allv";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    check_counts(send_bytes, "send_bytes", name);
    check_counts(recv_bytes, "recv_bytes", name);
    CPI_CHECK(send_bytes[rank_] == recv_bytes[rank_], name, ": rank ", rank_, " sends itself ", send_bytes[rank_],
              " bytes but expects ", recv_bytes[rank_]);
    size_t st = 0, rt = 0;
    for (int q = 0; q < size_; ++q) st += send_bytes[q], rt += recv_bytes[q];
    check_device(send, st, "send", name);
    check_device(recv, rt, "recv", name);
    enqueue_begin();
    issue(ncclGroupStart(), name, deadline);
    size_t so = 0, ro = 0;
    for (int q = 0; q < size_; ++q) {
      const char* s = static_cast<const char*>(send) + so;
      char* r = static_cast<char*>(recv) + ro;
      if (q == rank_) {
        if (send_bytes[q] > 0) CPI_CUDA_OK(cudaMemcpyAsync(r, s, send_bytes[q], cudaMemcpyDeviceToDevice, stream_));
      } else {
        if (send_bytes[q] > 0) issue(ncclSend(s, send_bytes[q], ncclUint8, q, comm_, stream_), name, deadline);
        if (recv_bytes[q] > 0) issue(ncclRecv(r, recv_bytes[q], ncclUint8, q, comm_, stream_), name, deadline);
      }
      so += send_bytes[q];
      ro += recv_bytes[q];
    }
    issue(ncclGroupEnd(), name, deadline);
    return finish(name, deadline, overlap);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    const char* name = "broadcast";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    CPI_CHECK(root >= 0 && root < size_, name, ": root ", root, " out of range for ", size_, " ranks");
    check_device(buf, bytes, "", name);
    if (bytes == 0) return;
    enqueue_begin();
    issue(ncclBroadcast(buf, buf, bytes, ncclUint8, root, comm_, stream_), name, deadline);
    finish(name, deadline, false);
  }

  void barrier() override {
    const char* name = "barrier";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    enqueue_begin();
    issue(ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_), name, deadline);
    finish(name, deadline, false);
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    const char* name = "split";
    std::unique_lock<std::mutex> lk(mu_);
    const auto deadline = begin(name);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    // NCCL's init thread writes the new handle (nullptr for no color) into *out when it finishes,
    // after ncclCommSplit returned; on a timeout that slot must outlive this call, so it lives on
    // the heap and is given up (8 bytes) when the split is abandoned.
    auto* out = new ncclComm_t(nullptr);
    issue(ncclCommSplit(comm_, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, out, &config), name, deadline);
    // Done when the parent is usable again (the split job finished, *out final) and the child, if
    // any, finished its own initialization.
    ncclResult_t child_st = ncclSuccess;
    ncclComm_t child = nullptr;
    for (int spins = 0;; ++spins) {
      ncclResult_t parent_st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &parent_st);
      if (parent_st != ncclSuccess && parent_st != ncclInProgress) fail_nccl(name, parent_st);
      child = __atomic_load_n(out, __ATOMIC_ACQUIRE);
      child_st = ncclSuccess;
      if (child != nullptr) ncclCommGetAsyncError(child, &child_st);
      const bool child_done = color < 0 ? true : child != nullptr && child_st != ncclInProgress;
      if (parent_st == ncclSuccess && child_done) break;
      if (Clock::now() >= deadline) {
        if (child) ncclCommAbort(child);
        fail(detail::concat(name, " timed out after ", timeout_.count(), " ms on NCCL rank ", rank_, " of ", size_,
                            " while the new communicator initialized"));
      }
      backoff(spins);
    }
    // Without a color NCCL may store its nullptr into *out at any point of its job; keep the slot.
    if (child == nullptr) return nullptr;
    delete out;
    if (child_st != ncclSuccess) {
      ncclCommAbort(child);
      fail(detail::concat(name, " failed on NCCL rank ", rank_, ": ", ncclGetErrorString(child_st)));
    }
    return std::make_unique<NcclCommunicator>(child, device_, stream_, false, timeout_);
  }

 private:
  Clock::time_point begin(const char* name) {
    CPI_CHECK(comm_ != nullptr, name, " on NCCL rank ", rank_, ": the communicator was aborted by an earlier failure",
              failure_.empty() ? std::string() : ": " + failure_);
    CPI_CUDA_OK(cudaSetDevice(device_));
    return Clock::now() + timeout_;
  }

  // Queued mode: the collective about to be issued waits for the compute stream's work so far;
  // the start event tells the watchdog when it could begin. (mu_ held.)
  void enqueue_begin() {
    if (!compute_) return;
    cudaEvent_t ready = take_event(), start = take_event();
    CPI_CUDA_OK(cudaEventRecord(ready, compute_));
    CPI_CUDA_OK(cudaStreamWaitEvent(stream_, ready, 0));
    free_events_.push_back(ready);  // reusable once recorded: the wait captured it
    CPI_CUDA_OK(cudaEventRecord(start, stream_));
    issuing_start_ = start;
  }
  // After the issue: synchronous mode waits here; queued mode hands the completion to the watchdog
  // and to the compute stream (at once, or at join(ticket) for an overlapped one). (mu_ held.)
  Ticket finish(const char* name, Clock::time_point deadline, bool overlap) {
    if (!compute_) {
      wait_done(name, deadline);
      return 0;
    }
    cudaEvent_t done = take_event();
    CPI_CUDA_OK(cudaEventRecord(done, stream_));
    Ticket ticket = 0;
    if (overlap) {
      cudaEvent_t joinable = take_event();
      CPI_CUDA_OK(cudaEventRecord(joinable, stream_));
      ticket = ++last_ticket_;
      open_.emplace_back(ticket, joinable);
    } else {
      CPI_CUDA_OK(cudaStreamWaitEvent(compute_, done, 0));
    }
    pending_.push_back(Pending{issuing_start_, done, name, {}, false});
    issuing_start_ = nullptr;
    cv_.notify_all();
    return ticket;
  }
  cudaEvent_t take_event() {
    if (!free_events_.empty()) {
      cudaEvent_t e = free_events_.back();
      free_events_.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    CPI_CUDA_OK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }

  // The watchdog thread: completes queued collectives in order, aborts on error or timeout.
  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lk(mu_);
    for (int spins = 0; !stop_;) {
      if (pending_.empty() || comm_ == nullptr) {
        spins = 0;
        cv_.wait(lk, [&] { return stop_ || (!pending_.empty() && comm_ != nullptr); });
        continue;
      }
      Pending& p = pending_.front();
      if (!p.started && cudaEventQuery(p.start) == cudaSuccess) {
        p.started = true;
        p.start_time = Clock::now();
      }
      if (p.started) {
        const cudaError_t e = cudaEventQuery(p.done);
        if (e == cudaSuccess) {
          free_events_.push_back(p.start);
          free_events_.push_back(p.done);
          pending_.pop_front();
          cv_.notify_all();
          spins = 0;
          continue;
        }
        ncclResult_t st = ncclSuccess;
        ncclCommGetAsyncError(comm_, &st);
        if (e != cudaErrorNotReady) {
          abort_queued(detail::concat(p.name, " failed on NCCL rank ", rank_, ": CUDA error ", cudaGetErrorName(e),
                                      ": ", cudaGetErrorString(e)));
        } else if (st != ncclSuccess && st != ncclInProgress) {
          abort_queued(
              detail::concat(p.name, " failed on NCCL rank ", rank_, " of ", size_, ": ", ncclGetErrorString(st)));
        } else if (Clock::now() - p.start_time > timeout_) {
          abort_queued(detail::concat(p.name, " timed out after ", timeout_.count(), " ms on NCCL rank ", rank_, " of ",
                                      size_, ": a peer did not enter ", p.name,
                                      " (hung, crashed, slower than the timeout, or calling a different collective)"));
        }
        if (comm_ == nullptr) continue;
      }
      lk.unlock();
      backoff(spins++);
      lk.lock();
    }
  }
  // Watchdog side of a failure (mu_ held): abort so the streams run on, remember why for the
  // rank's next call, release the waiters.
  void abort_queued(const std::string& msg) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
    failure_ = msg;
    for (const Pending& q : pending_) {
      cudaEventDestroy(q.start);
      cudaEventDestroy(q.done);
    }
    pending_.clear();
    cv_.notify_all();
  }

  void check_counts(std::span<const size_t> c, const char* what, const char* name) const {
    CPI_CHECK(c.size() == static_cast<size_t>(size_), name, ": ", what, " has ", c.size(), " entries, expected ", size_,
              " (one per rank)");
  }

  // NCCL reads device memory of this rank's GPU; a host pointer would fault inside a kernel.
  void check_device(const void* p, size_t bytes, const char* what, const char* name) const {
    if (bytes == 0) return;
    CPI_CHECK(p != nullptr, name, ": null ", what, " buffer for ", bytes, " bytes");
    cudaPointerAttributes a{};
    const cudaError_t e = cudaPointerGetAttributes(&a, p);
    CPI_CHECK(e == cudaSuccess && (a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged), name, ": the ",
              what, " buffer is not device memory (the nccl communicator takes GPU buffers)");
    CPI_CHECK(a.type == cudaMemoryTypeManaged || a.device == device_, name, ": the ", what, " buffer lives on device ",
              a.device, " but this rank uses device ", device_);
  }

  // Accepts ncclSuccess; waits out ncclInProgress (non-blocking issue); anything else fails.
  void issue(ncclResult_t r, const char* name, Clock::time_point deadline) {
    if (r == ncclSuccess) return;
    if (r != ncclInProgress) fail_nccl(name, r);
    ncclResult_t st = ncclInProgress;
    for (int spins = 0;; ++spins) {
      ncclCommGetAsyncError(comm_, &st);
      if (st == ncclSuccess) return;
      if (st != ncclInProgress) fail_nccl(name, st);
      if (Clock::now() >= deadline) fail_timeout(name);
      backoff(spins);
    }
  }

  // Polls the stream until the GPU finished, watching for NCCL errors and the deadline.
  void wait_done(const char* name, Clock::time_point deadline) {
    for (int spins = 0;; ++spins) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady)
        fail(detail::concat(name, " failed on NCCL rank ", rank_, ": CUDA error ", cudaGetErrorName(e), ": ",
                            cudaGetErrorString(e)));
      ncclResult_t st = ncclSuccess;
      ncclCommGetAsyncError(comm_, &st);
      if (st != ncclSuccess && st != ncclInProgress) fail_nccl(name, st);
      if (Clock::now() >= deadline) fail_timeout(name);
      backoff(spins);
    }
  }

  [[noreturn]] void fail_nccl(const char* name, ncclResult_t r) {
    const char* last = ncclGetLastError(comm_);
    fail(detail::concat(name, " failed on NCCL rank ", rank_, " of ", size_, ": ", ncclGetErrorString(r),
                        last && *last ? std::string(" (") + last + ")" : std::string()));
  }
  [[noreturn]] void fail_timeout(const char* name) {
    fail(detail::concat(name, " timed out after ", timeout_.count(), " ms on NCCL rank ", rank_, " of ", size_,
                        ": a peer did not enter ", name,
                        " (hung, crashed, slower than the timeout, or calling a different collective)"));
  }
  // Aborts the NCCL communicator (stops its kernels) and throws; later calls fail at once.
  [[noreturn]] void fail(const std::string& msg) {
    ncclCommAbort(comm_);
    comm_ = nullptr;
    failure_ = msg;
    cv_.notify_all();
    throw Error(msg);
  }

  ncclComm_t comm_;
  int device_;
  cudaStream_t stream_;
  bool own_stream_;
  int rank_ = 0, size_ = 1;
  float* scratch_ = nullptr;  // [1] barrier operand

  // Queued mode (bind_stream). mu_ guards comm_ and everything below.
  struct Pending {
    cudaEvent_t start, done;
    const char* name;
    Clock::time_point start_time;
    bool started;
  };
  std::mutex mu_;
  std::condition_variable cv_;
  cudaStream_t compute_ = nullptr;
  std::deque<Pending> pending_;
  cudaEvent_t issuing_start_ = nullptr;  // start event of the collective being issued
  std::vector<cudaEvent_t> free_events_;
  std::vector<std::pair<Ticket, cudaEvent_t>> open_;  // overlapped collectives not joined yet
  Ticket last_ticket_ = 0;
  std::string failure_;
  bool stop_ = false;
  std::thread watchdog_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, void* cuda_stream,
                                                     std::chrono::milliseconds timeout) {
  CPI_CHECK(timeout.count() > 0, "make_nccl_communicator: timeout must be positive, got ", timeout.count(), " ms");
  int n_devices = 0;
  CPI_CUDA_OK(cudaGetDeviceCount(&n_devices));
  CPI_CHECK(device >= 0 && device < n_devices, "make_nccl_communicator: device ", device, " out of range: ", n_devices,
            " CUDA device(s) visible");
  // NVLink SHARP (NVLS) multicast is off on the lent machines; NCCL would fail to set it up.
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  CPI_CUDA_OK(cudaSetDevice(device));

  // Every rank enters the broadcast even when rank 0 failed to make an id, so no rank hangs.
  ncclUniqueId id;
  std::memset(&id, 0, sizeof id);
  ncclResult_t id_rc = ncclSuccess;
  if (bootstrap.rank() == 0) id_rc = ncclGetUniqueId(&id);
  int ok = id_rc == ncclSuccess ? 1 : 0;
  bootstrap.broadcast(&ok, sizeof ok, 0);
  CPI_CHECK(ok, "make_nccl_communicator: ncclGetUniqueId failed on rank 0",
            bootstrap.rank() == 0 ? std::string(": ") + ncclGetErrorString(id_rc) : std::string());
  bootstrap.broadcast(&id, sizeof id, 0);

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const auto deadline = Clock::now() + timeout;
  ncclResult_t rc = ncclCommInitRankConfig(&comm, bootstrap.size(), id, bootstrap.rank(), &config);
  CPI_CHECK(rc == ncclSuccess || rc == ncclInProgress, "ncclCommInitRankConfig failed on rank ", bootstrap.rank(), ": ",
            ncclGetErrorString(rc));
  ncclResult_t st = ncclInProgress;
  for (int spins = 0;; ++spins) {
    ncclCommGetAsyncError(comm, &st);
    if (st != ncclInProgress) break;
    if (Clock::now() >= deadline) {
      ncclCommAbort(comm);
      CPI_FAIL("make_nccl_communicator timed out after ", timeout.count(), " ms on rank ", bootstrap.rank(), " of ",
               bootstrap.size(), ": NCCL initialization did not complete (a peer did not join)");
    }
    backoff(spins);
  }
  if (st != ncclSuccess) {
    const char* last = ncclGetLastError(comm);
    std::string detail = last ? last : "";
    ncclCommAbort(comm);
    CPI_FAIL("NCCL initialization failed on rank ", bootstrap.rank(), " (device ", device,
             "): ", ncclGetErrorString(st), detail.empty() ? "" : " (" + detail + ")");
  }

  cudaStream_t stream = static_cast<cudaStream_t>(cuda_stream);
  bool own = false;
  if (stream == nullptr) {
    const cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
      ncclCommAbort(comm);
      CPI_FAIL("make_nccl_communicator: cudaStreamCreate failed: ", cudaGetErrorString(e));
    }
    own = true;
  }
  return std::make_unique<NcclCommunicator>(comm, device, stream, own, timeout);
}

}  // namespace cpinfer
