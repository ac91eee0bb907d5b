// Starts the ranks of one cpinfer job: threads of this process (--comm local) or this process as
// one rank of an mpirun job (--comm mpi), and builds each rank's communicators.
#pragma once
#include <functional>
#include <string>

#include "core/check.h"
#include "parallel/context.h"

namespace cpinfer {

struct LaunchOptions {
  std::string comm = "local";  // local | mpi
  int world_size = 0;          // 0: attn_cp_size (local) or the mpirun size (mpi)
  int cp_size = 1;
  int ep_size = 0;  // ranks the experts are sharded over: 0 = the world size; 1 = replicated
  int timeout_s = 300;
  // GPU ranks: collectives move device memory through NCCL, bootstrapped by the local or mpi
  // communicator; rank r drives CUDA device gpu_base + (its local rank).
  bool gpu = false;
  int gpu_base = 0;
};

// The CUDA device of a rank: base + the rank's index on its node (OMPI_COMM_WORLD_LOCAL_RANK under
// mpirun, else the world rank).
int local_device(int base, int world_rank);

// Runs fn on every rank (on this process's rank only, under mpirun). Throws cpinfer::Error for
// inconsistent flags; a failure on any rank is rethrown naming the rank.
void launch(const LaunchOptions& opt, const std::function<void(ParallelCtx&)>& fn);

}  // namespace cpinfer
