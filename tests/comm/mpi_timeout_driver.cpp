// Driver for the mpi_comm_timeout test: rank 0 enters all_reduce_sum (timeout 1 s) while rank 1
// is stuck in a barrier of another communicator. Rank 0 must fail with the timeout error and exit
// non-zero, after which mpirun ends the job. Any rank that finishes without an error exits 0.
#include <cstdio>

#include "comm/communicator.h"

int main() {
  using namespace std::chrono_literals;
  try {
    auto world = cpinfer::make_mpi_communicator(1000ms);
    auto other = world->split(0, world->rank());
    other->set_timeout(30s);
    if (world->rank() == 0) {
      float x = 1.0f;
      world->all_reduce_sum(&x, 1, cpinfer::DType::F32);
    } else {
      other->barrier();  // rank 0 never comes: stands in for a hung rank
    }
    std::printf("rank %d: no error\n", world->rank());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
