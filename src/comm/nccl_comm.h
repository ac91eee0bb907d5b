// The "nccl" back-end: ranks are GPUs, buffers are device memory. Built only with CUDA and NCCL
// (CPINFER_HAVE_NCCL); the model never includes this header, only the apps wiring ranks to GPUs.
#pragma once
#include <chrono>
#include <memory>

#include "comm/communicator.h"

namespace cpinfer {

// Creates a communicator over the same ranks as `bootstrap` (a "local" or "mpi" communicator;
// every rank calls this), rank r on CUDA device `device`. NCCL's unique id travels through
// bootstrap.broadcast. Collectives run on cuda_stream (a cudaStream_t; nullptr: the communicator
// creates and owns a non-blocking stream) after the work already queued there, and return once
// they completed on the GPU. Buffers must be device memory of `device`. all_reduce_sum and
// reduce_scatterv_sum take F32, BF16 and F16. Initialization and every call give up after timeout
// (or when NCCL reports an asynchronous error): the NCCL communicator is aborted and the call
// throws; later calls throw at once. Sets NCCL_NVLS_ENABLE=0 unless the environment sets it.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device, void* cuda_stream,
                                                     std::chrono::milliseconds timeout);

}  // namespace cpinfer
