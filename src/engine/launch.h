// Starts the ranks of one cpinfer job: threads of this process (--comm local) or this process as
// one rank of an mpirun job (--comm mpi), and builds each rank's communicators.
#pragma once
#include <functional>
#include <string>

#include "model/qwen3.h"

namespace cpinfer {

struct LaunchOptions {
  std::string comm = "local";  // local | mpi
  int world_size = 0;          // 0: attn_cp_size (local) or the mpirun size (mpi)
  int cp_size = 1;
  int timeout_s = 300;
};

// Runs fn on every rank (on this process's rank only, under mpirun). Throws cpinfer::Error for
// inconsistent flags; a failure on any rank is rethrown naming the rank.
void launch(const LaunchOptions& opt, const std::function<void(ParallelCtx&)>& fn);

}  // namespace cpinfer
