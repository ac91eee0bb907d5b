// The "mpi" back-end: one rank per process, host buffers. Every collective is the non-blocking
// MPI form polled with MPI_Testall until it completes or the deadline passes, so a hung or
// mismatched peer becomes a clear error instead of a hang. After a timeout the requests stay
// pending (MPI cannot cancel collectives), so the communicator refuses further calls and the
// process skips MPI_Finalize: the CLI exits non-zero and mpirun ends the job.
//
// MPI-3 counts and displacements are int. Calls whose messages could exceed that cap are split:
// reductions and broadcasts into chunks, v-collectives into point-to-point messages of at most
// the cap (all_to_allv first agrees on the path with one tiny all-reduce, since a rank only knows
// its own sizes).
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_comm.h"
#include "core/check.h"

#if CPINFER_HAVE_MPI
#include <mpi.h>
#endif

namespace cpinfer {

bool launched_by_mpirun() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr || std::getenv("PMI_SIZE") != nullptr ||
         std::getenv("PMIX_RANK") != nullptr;
}

#if !CPINFER_HAVE_MPI

std::unique_ptr<Communicator> make_mpi_communicator(std::chrono::milliseconds) {
  CPI_FAIL(
      "this build has no MPI support (reconfigure with -DCPINFER_MPI=ON and OpenMPI installed, e.g. "
      "apt-get install libopenmpi-dev openmpi-bin)");
}

void mpi_set_max_message_bytes(Communicator&, size_t) { CPI_FAIL("this build has no MPI support"); }

#else

namespace {

using Clock = std::chrono::steady_clock;
constexpr int kTag = 7411;  // point-to-point messages of the chunked v-collectives

// Finalizes MPI at exit when this library initialized it, unless a collective failed: pending
// requests would make MPI_Finalize wait for peers that never come.
struct MpiRuntime {
  std::mutex mu;
  bool initialized_here = false;
  bool broken = false;
  ~MpiRuntime() {
    if (!initialized_here || broken) return;
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
};

MpiRuntime& runtime() {
  static MpiRuntime rt;
  return rt;
}

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(code);
  return std::string(buf, static_cast<size_t>(len));
}

// Polls reqs until all complete or the deadline; throws naming `what` on timeout or MPI error.
void wait_requests(std::vector<MPI_Request>& reqs, std::chrono::milliseconds timeout, const char* what, int rank,
                   int size) {
  const auto deadline = Clock::now() + timeout;
  for (int spins = 0;; ++spins) {
    int done = 0;
    const int rc = MPI_Testall(static_cast<int>(reqs.size()), reqs.data(), &done, MPI_STATUSES_IGNORE);
    if (rc != MPI_SUCCESS) {
      runtime().broken = true;
      CPI_FAIL(what, " failed on MPI rank ", rank, " of ", size, ": ", mpi_error_string(rc));
    }
    if (done) return;
    if (Clock::now() >= deadline) {
      runtime().broken = true;
      CPI_FAIL(what, " timed out after ", timeout.count(), " ms on MPI rank ", rank, " of ", size,
               ": a peer did not enter ", what,
               " (hung, crashed, slower than the timeout, or calling a different collective)");
    }
    // Spin briefly for latency, then back off so oversubscribed ranks leave the cores to peers.
    if (spins < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

size_t checked_total(std::span<const size_t> v, const char* what, const char* name) {
  size_t total = 0;
  for (size_t x : v) CPI_CHECK(!__builtin_add_overflow(total, x, &total), name, ": ", what, " sum overflows");
  return total;
}

bool overlaps(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  if (a_bytes == 0 || b_bytes == 0) return false;
  auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  return pa < pb + b_bytes && pb < pa + a_bytes;
}

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::chrono::milliseconds timeout, size_t max_msg) : comm_(comm), max_msg_(max_msg) {
    timeout_ = timeout;
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized && !runtime().broken) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string kind() const override { return "mpi"; }
  void set_max_message_bytes(size_t b) {
    CPI_CHECK(b >= 8 && b <= static_cast<size_t>(INT_MAX), "mpi max message bytes ", b, " out of [8, INT_MAX]");
    max_msg_ = b;
  }

  void all_gatherv(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes) override {
    const char* name = "all_gatherv";
    begin(name);
    check_counts(recv_bytes, "recv_bytes", name);
    CPI_CHECK(recv_bytes[rank_] == send_bytes, name, ": recv_bytes[", rank_, "] = ", recv_bytes[rank_],
              " but this rank sends ", send_bytes, " bytes");
    const size_t total = checked_total(recv_bytes, "recv_bytes", name);
    CPI_CHECK((send || !send_bytes) && (recv || !total), name, ": null buffer");
    size_t my_off = 0;
    for (int q = 0; q < rank_; ++q) my_off += recv_bytes[q];
    const bool in_place = recv && send == static_cast<char*>(recv) + my_off;
    CPI_CHECK(in_place || !overlaps(send, send_bytes, recv, total), name,
              ": send overlaps recv without being this rank's slot of recv");
    std::vector<MPI_Request> reqs;
    if (total <= max_msg_) {  // every count and displacement fits in int
      std::vector<int> counts(size_), displs(size_);
      size_t off = 0;
      for (int q = 0; q < size_; ++q) {
        counts[q] = static_cast<int>(recv_bytes[q]);
        displs[q] = static_cast<int>(off);
        off += recv_bytes[q];
      }
      reqs.emplace_back();
      call(MPI_Iallgatherv(in_place ? MPI_IN_PLACE : send, static_cast<int>(send_bytes), MPI_BYTE, recv, counts.data(),
                           displs.data(), MPI_BYTE, comm_, &reqs.back()),
           name);
      wait(reqs, name);
      return;
    }
    size_t off = 0;
    for (int q = 0; q < size_; ++q) {
      if (q != rank_) {
        post_chunks(send, send_bytes, q, /*is_send=*/true, reqs, name);
        post_chunks(static_cast<char*>(recv) + off, recv_bytes[q], q, /*is_send=*/false, reqs, name);
      }
      off += recv_bytes[q];
    }
    if (!in_place && send_bytes > 0) std::memcpy(static_cast<char*>(recv) + my_off, send, send_bytes);
    wait(reqs, name);
  }

  void all_reduce_sum(void* buf, size_t count, DType dtype) override {
    const char* name = "all_reduce_sum";
    begin(name);
    CPI_CHECK(dtype == DType::F32, name, ": dtype ", dtype_name(dtype), " not supported; the mpi back-end reduces F32");
    CPI_CHECK(buf || count == 0, name, ": null buffer for ", count, " elements");
    const size_t step = max_msg_ / sizeof(float);
    std::vector<MPI_Request> reqs;
    for (size_t c = 0; c < count; c += step) {
      const size_t len = std::min(step, count - c);
      reqs.emplace_back();
      call(MPI_Iallreduce(MPI_IN_PLACE, static_cast<float*>(buf) + c, static_cast<int>(len), MPI_FLOAT, MPI_SUM, comm_,
                          &reqs.back()),
           name);
    }
    wait(reqs, name);
  }

  void reduce_scatterv_sum(const void* send, void* recv, std::span<const size_t> counts, DType dtype) override {
    const char* name = "reduce_scatterv_sum";
    begin(name);
    CPI_CHECK(dtype == DType::F32, name, ": dtype ", dtype_name(dtype), " not supported; the mpi back-end reduces F32");
    check_counts(counts, "counts", name);
    const size_t total = checked_total(counts, "counts", name);
    CPI_CHECK(total <= SIZE_MAX / sizeof(float), name, ": total count ", total, " too large");
    CPI_CHECK((send || !total) && (recv || !counts[rank_]), name, ": null buffer");
    CPI_CHECK(!overlaps(send, total * sizeof(float), recv, counts[rank_] * sizeof(float)), name,
              ": recv overlaps send");
    std::vector<MPI_Request> reqs;
    if (total * sizeof(float) <= max_msg_) {
      std::vector<int> icounts(counts.begin(), counts.end());
      reqs.emplace_back();
      call(MPI_Ireduce_scatter(send, recv, icounts.data(), MPI_FLOAT, MPI_SUM, comm_, &reqs.back()), name);
      wait(reqs, name);
      return;
    }
    // Chunked: one reduction per (segment, chunk) to the segment's owner.
    const size_t step = max_msg_ / sizeof(float);
    size_t off = 0;
    for (int r = 0; r < size_; ++r) {
      for (size_t c = 0; c < counts[r]; c += step) {
        const size_t len = std::min(step, counts[r] - c);
        reqs.emplace_back();
        call(
            MPI_Ireduce(static_cast<const float*>(send) + off + c, r == rank_ ? static_cast<float*>(recv) + c : nullptr,
                        static_cast<int>(len), MPI_FLOAT, MPI_SUM, r, comm_, &reqs.back()),
            name);
      }
      off += counts[r];
    }
    wait(reqs, name);
  }

  void all_to_allv(const void* send, std::span<const size_t> send_bytes, void* recv,
                   std::span<const size_t> recv_bytes) override {
    const char* name = "all_to_allv";
    begin(name);
    check_counts(send_bytes, "send_bytes", name);
    check_counts(recv_bytes, "recv_bytes", name);
    const size_t st = checked_total(send_bytes, "send_bytes", name);
    const size_t rt = checked_total(recv_bytes, "recv_bytes", name);
    CPI_CHECK((send || !st) && (recv || !rt), name, ": null buffer");
    CPI_CHECK(!overlaps(send, st, recv, rt), name, ": recv overlaps send");
    // A rank knows only its own sizes: agree on the path first.
    int big = std::max(st, rt) > max_msg_ ? 1 : 0;
    std::vector<MPI_Request> reqs(1);
    call(MPI_Iallreduce(MPI_IN_PLACE, &big, 1, MPI_INT, MPI_LOR, comm_, &reqs[0]), name);
    wait(reqs, name);
    reqs.clear();
    if (!big) {
      std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
      size_t so = 0, ro = 0;
      for (int q = 0; q < size_; ++q) {
        sc[q] = static_cast<int>(send_bytes[q]);
        sd[q] = static_cast<int>(so);
        rc[q] = static_cast<int>(recv_bytes[q]);
        rd[q] = static_cast<int>(ro);
        so += send_bytes[q];
        ro += recv_bytes[q];
      }
      reqs.emplace_back();
      call(MPI_Ialltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(), MPI_BYTE, comm_,
                          &reqs.back()),
           name);
      wait(reqs, name);
      return;
    }
    size_t so = 0, ro = 0;
    for (int q = 0; q < size_; ++q) {
      const char* s = static_cast<const char*>(send) + so;
      char* r = static_cast<char*>(recv) + ro;
      if (q == rank_) {
        CPI_CHECK(send_bytes[q] == recv_bytes[q], name, ": rank ", rank_, " sends itself ", send_bytes[q],
                  " bytes but expects ", recv_bytes[q]);
        if (send_bytes[q] > 0) std::memcpy(r, s, send_bytes[q]);
      } else {
        post_chunks(s, send_bytes[q], q, /*is_send=*/true, reqs, name);
        post_chunks(r, recv_bytes[q], q, /*is_send=*/false, reqs, name);
      }
      so += send_bytes[q];
      ro += recv_bytes[q];
    }
    wait(reqs, name);
  }

  void broadcast(void* buf, size_t bytes, int root) override {
    const char* name = "broadcast";
    begin(name);
    CPI_CHECK(root >= 0 && root < size_, name, ": root ", root, " out of range for ", size_, " ranks");
    CPI_CHECK(buf || bytes == 0, name, ": null buffer for ", bytes, " bytes");
    std::vector<MPI_Request> reqs;
    for (size_t c = 0; c < bytes; c += max_msg_) {
      reqs.emplace_back();
      call(MPI_Ibcast(static_cast<char*>(buf) + c, static_cast<int>(std::min(max_msg_, bytes - c)), MPI_BYTE, root,
                      comm_, &reqs.back()),
           name);
    }
    wait(reqs, name);
  }

  void barrier() override {
    begin("barrier");
    std::vector<MPI_Request> reqs(1);
    call(MPI_Ibarrier(comm_, &reqs[0]), "barrier");
    wait(reqs, "barrier");
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    begin("split");
    // MPI_Comm_split blocks; a barrier with a deadline first makes sure every rank is there.
    std::vector<MPI_Request> reqs(1);
    call(MPI_Ibarrier(comm_, &reqs[0]), "split");
    wait(reqs, "split");
    MPI_Comm out = MPI_COMM_NULL;
    call(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &out), "split");
    if (out == MPI_COMM_NULL) return nullptr;
    MPI_Comm_set_errhandler(out, MPI_ERRORS_RETURN);
    return std::make_unique<MpiCommunicator>(out, timeout_, max_msg_);
  }

 private:
  void begin(const char* name) {
    CPI_CHECK(!broken_, name, " on MPI rank ", rank_, ": the communicator is broken by an earlier failure");
  }
  void call(int rc, const char* name) {
    if (rc == MPI_SUCCESS) return;
    broken_ = true;
    runtime().broken = true;
    CPI_FAIL(name, " failed on MPI rank ", rank_, " of ", size_, ": ", mpi_error_string(rc));
  }
  void wait(std::vector<MPI_Request>& reqs, const char* name) {
    try {
      wait_requests(reqs, timeout_, name, rank_, size_);
    } catch (...) {
      broken_ = true;
      throw;
    }
  }
  void check_counts(std::span<const size_t> c, const char* what, const char* name) const {
    CPI_CHECK(c.size() == static_cast<size_t>(size_), name, ": ", what, " has ", c.size(), " entries, expected ", size_,
              " (one per rank)");
  }
  // Posts point-to-point messages of at most max_msg_ bytes each; non-overtaking order on one tag
  // keeps the chunks of a pair in sequence.
  void post_chunks(const void* p, size_t bytes, int peer, bool is_send, std::vector<MPI_Request>& reqs,
                   const char* name) {
    for (size_t c = 0; c < bytes; c += max_msg_) {
      const int len = static_cast<int>(std::min(max_msg_, bytes - c));
      reqs.emplace_back();
      if (is_send) {
        call(MPI_Isend(static_cast<const char*>(p) + c, len, MPI_BYTE, peer, kTag, comm_, &reqs.back()), name);
      } else {
        call(MPI_Irecv(static_cast<char*>(const_cast<void*>(p)) + c, len, MPI_BYTE, peer, kTag, comm_, &reqs.back()),
             name);
      }
    }
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
  size_t max_msg_;
  bool broken_ = false;
};

}  // namespace

std::unique_ptr<Communicator> make_mpi_communicator(std::chrono::milliseconds timeout) {
  CPI_CHECK(timeout.count() > 0, "make_mpi_communicator: timeout must be positive, got ", timeout.count(), " ms");
  MpiRuntime& rt = runtime();
  {
    std::lock_guard lk(rt.mu);
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    CPI_CHECK(!finalized, "make_mpi_communicator: MPI was already finalized");
    if (!initialized) {
      CPI_CHECK(launched_by_mpirun(),
                "make_mpi_communicator: this process was not started by mpirun (no OMPI_COMM_WORLD_SIZE, PMI_SIZE or "
                "PMIX_RANK in the environment); launch it as e.g. `mpirun -np 2 <command>`");
      int provided = 0;
      const int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      CPI_CHECK(rc == MPI_SUCCESS, "MPI_Init_thread failed: ", mpi_error_string(rc));
      rt.initialized_here = true;
      CPI_CHECK(provided >= MPI_THREAD_FUNNELED, "MPI provides thread level ", provided, " below MPI_THREAD_FUNNELED");
    }
  }
  MPI_Comm dup = MPI_COMM_NULL;
  std::vector<MPI_Request> reqs(1);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const int rc = MPI_Comm_idup(MPI_COMM_WORLD, &dup, &reqs[0]);
  CPI_CHECK(rc == MPI_SUCCESS, "MPI_Comm_idup failed: ", mpi_error_string(rc));
  wait_requests(reqs, timeout, "make_mpi_communicator (MPI_Comm_idup)", rank, size);
  MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN);
  return std::make_unique<MpiCommunicator>(dup, timeout, static_cast<size_t>(INT_MAX));
}

void mpi_set_max_message_bytes(Communicator& comm, size_t max_bytes) {
  auto* mpi = dynamic_cast<MpiCommunicator*>(&comm);
  CPI_CHECK(mpi != nullptr, "mpi_set_max_message_bytes: communicator of kind '", comm.kind(), "' is not an mpi one");
  mpi->set_max_message_bytes(max_bytes);
}

#endif  // CPINFER_HAVE_MPI

}  // namespace cpinfer
