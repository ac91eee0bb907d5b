// Communicator: the collectives context parallelism and expert parallelism need, behind one
// interface with three back-ends: "local" (ranks are threads of one process; tests and CPU runs),
// "mpi" (processes under mpirun; host buffers) and "nccl" (GPU buffers, see nccl_comm.h).
//
// Contract shared by every back-end:
//  - Every rank of a communicator calls every collective in the same order with matching
//    arguments (sizes agree across ranks as documented per call).
//  - No call waits forever: when a peer does not arrive within timeout(), or a peer has failed,
//    the call throws cpinfer::Error naming the collective. After such an error the communicator
//    (and, for the local back-end, every communicator of the same run_local job) is broken: later
//    calls throw at once.
//  - Buffers are host memory for local/mpi and device memory for nccl.
#pragma once
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "core/dtype.h"

namespace cpinfer {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string kind() const = 0;  // "local", "mpi", "nccl"

  // recv = concatenation of every rank's send, in rank order. recv_bytes has size() entries and
  // recv_bytes[r] is rank r's send_bytes (zero allowed). send may alias its own slot of recv
  // (send == recv + Σ_{q<rank} recv_bytes[q]), the in-place form.
  virtual void all_gatherv(const void* send, size_t send_bytes, void* recv, std::span<const size_t> recv_bytes) = 0;
  // In place: buf[i] = Σ_r buf_r[i]. F32 on host back-ends; F32/BF16 for nccl. Every rank gets
  // bit-identical results.
  virtual void all_reduce_sum(void* buf, size_t count, DType dtype) = 0;
  // send holds Σcounts elements, segments in rank order; rank r gets in recv (counts[r] elements)
  // the sum over ranks of segment r. counts is the same on every rank. recv must not overlap send.
  virtual void reduce_scatterv_sum(const void* send, void* recv, std::span<const size_t> counts, DType dtype) = 0;
  // send_bytes[r]: bytes this rank sends to rank r (segments of send in rank order);
  // recv_bytes[r]: bytes it receives from rank r (segments of recv in rank order).
  // recv must not overlap send.
  virtual void all_to_allv(const void* send, std::span<const size_t> send_bytes, void* recv,
                           std::span<const size_t> recv_bytes) = 0;
  // Copies root's buf (bytes, the same on every rank) into every rank's buf.
  virtual void broadcast(void* buf, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Like MPI_Comm_split: ranks with the same color form a new communicator, ordered by (key, old
  // rank). A negative color joins no group and gets nullptr. All ranks call it. The new
  // communicator inherits timeout().
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // ---- Stream-ordered (queued) collectives: device back-ends only.
  // After bind_stream(s) with a compute stream s (a cudaStream_t), every collective is ordered
  // after the work already queued on s and before the work queued on s afterwards, and returns
  // without waiting for the GPU: the host never blocks inside a layer loop. A watchdog enforces
  // timeout() from the moment a collective can start; on a timeout or an NCCL error it aborts
  // the communicator (so no stream waits forever) and the next call, or wait_all(), throws.
  // Host back-ends ignore bind_stream and stay synchronous: queued() is false.
  virtual void bind_stream(void* compute_stream) { (void)compute_stream; }
  virtual bool queued() const { return false; }
  // Overlapped forms: the collective is queued like the others, but later compute work is NOT
  // ordered after it until join(ticket), so the compute stream runs independent work meanwhile
  // (the overlap window); neither its recv nor (for the reduce) its send buffer may be touched
  // before the join. Every started collective must be joined. Synchronous on host back-ends.
  using Ticket = uint64_t;
  virtual Ticket all_gatherv_start(const void* send, size_t send_bytes, void* recv,
                                   std::span<const size_t> recv_bytes) {
    all_gatherv(send, send_bytes, recv, recv_bytes);
    return 0;
  }
  virtual Ticket reduce_scatterv_sum_start(const void* send, void* recv, std::span<const size_t> counts, DType dtype) {
    reduce_scatterv_sum(send, recv, counts, dtype);
    return 0;
  }
  // all_to_allv in the overlapped form (the sharded-KV ring: the next rank's K/V arrives while the
  // rank attends to the K/V in hand). Neither buffer may be written before the join.
  virtual Ticket all_to_allv_start(const void* send, std::span<const size_t> send_bytes, void* recv,
                                   std::span<const size_t> recv_bytes) {
    all_to_allv(send, send_bytes, recv, recv_bytes);
    return 0;
  }
  // Orders the compute work queued from now on after the started collective `ticket`.
  virtual void join(Ticket ticket) { (void)ticket; }
  // Blocks until every queued collective has completed; throws if one failed or timed out.
  virtual void wait_all() {}

  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds t) { timeout_ = t; }

 protected:
  std::chrono::milliseconds timeout_{std::chrono::minutes(5)};
};

// Ranks as threads of one process. Starts n threads (n >= 1), gives thread r a "local"
// Communicator of rank r (timeout as given), runs fn(comm) on each and joins all. If any rank
// threw, rethrows the first failure as cpinfer::Error("rank R: <what>"). Once a rank throws, the
// other ranks' pending and later collectives fail promptly ("peer rank R failed") instead of
// waiting for the timeout; a rank whose fn returned while peers wait for it in a collective makes
// them fail promptly too.
void run_local(int n, std::chrono::milliseconds timeout, const std::function<void(Communicator&)>& fn);

// A "local" communicator of one rank (rank 0, size 1) for single-process runs without threads.
std::unique_ptr<Communicator> make_self_communicator();

// True when this process was started by mpirun/mpiexec/srun (OMPI_COMM_WORLD_SIZE, PMI_SIZE or
// PMIX_RANK is set).
bool launched_by_mpirun();

// A communicator over all MPI processes (a duplicate of MPI_COMM_WORLD). Calls
// MPI_Init_thread(MPI_THREAD_FUNNELED) once if MPI is not initialized yet (then MPI_Finalize runs
// at exit, unless a collective failed: then the process exits without it and mpirun ends the job).
// Only the thread that created it may use it. Throws when not launched by mpirun or when the build
// has no MPI support.
std::unique_ptr<Communicator> make_mpi_communicator(std::chrono::milliseconds timeout);

}  // namespace cpinfer
