// MPI back-end extras beyond communicator.h (make_mpi_communicator is declared there).
#pragma once
#include <cstddef>

#include "comm/communicator.h"

namespace cpinfer {

// Test hook: caps one MPI message at max_bytes (default and upper bound: INT_MAX, the largest
// count MPI-3 takes), so small messages exercise the chunked paths that calls above 2 GiB take.
// comm must come from make_mpi_communicator or split(); its later splits inherit the cap. All
// ranks must set the same cap. Throws for other communicators or a cap below 16 bytes.
void mpi_set_max_message_bytes(Communicator& comm, size_t max_bytes);

}  // namespace cpinfer
