#include "engine/launch.h"

#include <chrono>
#include <cstdlib>
#include <memory>

#ifdef CPINFER_HAVE_NCCL
#include "comm/nccl_comm.h"
#endif

namespace cpinfer {

int local_device(int base, int world_rank) {
  if (const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) return base + std::atoi(lr);
  return base + world_rank;
}

namespace {
void check_ep_size(int ep_size, int world) {
  CPI_CHECK(ep_size == 0 || ep_size == 1 || ep_size == world, "--ep-size ", ep_size, " is not supported with ", world,
            " ranks: experts are sharded over all ranks (--ep-size ", world, ") or replicated on each (--ep-size 1)");
}

void run_rank(Communicator& boot, const LaunchOptions& opt, const std::function<void(ParallelCtx&)>& fn) {
  const int cp_size = opt.cp_size;
  ParallelCtx par;
  std::unique_ptr<Communicator> cp_group, tp_group, nccl;
  Communicator* data = &boot;
  if (opt.gpu && boot.size() > 1) {
#ifdef CPINFER_HAVE_NCCL
    nccl = make_nccl_communicator(boot, local_device(opt.gpu_base, boot.rank()), nullptr, boot.timeout());
    data = nccl.get();
#else
    CPI_FAIL("several GPU ranks need NCCL, and this build has none (rebuild with CUDA and NCCL)");
#endif
  }
  Communicator& world = *data;
  if (world.size() > 1) {
    par.world = &world;
    par.control = &boot;
  }
  check_ep_size(opt.ep_size, world.size());
  par.replicate_experts = opt.ep_size == 1 && world.size() > 1;
  if (cp_size == world.size()) {
    par.cp = world.size() > 1 ? &world : nullptr;
  } else if (cp_size > 1) {
    // CP groups are runs of consecutive ranks: {0..C-1}, {C..2C-1}, ...
    cp_group = world.split(world.rank() / cp_size, world.rank());
    par.cp = cp_group.get();
  }
  // Attention TP groups: the ranks with the same CP rank, one from each CP group.
  const int tp_size = world.size() / cp_size;
  if (tp_size == world.size()) {
    par.attn_tp = tp_size > 1 ? &world : nullptr;
  } else if (tp_size > 1) {
    tp_group = world.split(world.rank() % cp_size, world.rank());
    par.attn_tp = tp_group.get();
  }
  fn(par);
}
}  // namespace

void launch(const LaunchOptions& opt, const std::function<void(ParallelCtx&)>& fn) {
  CPI_CHECK(opt.cp_size >= 1, "--attn-cp-size must be >= 1, got ", opt.cp_size);
  CPI_CHECK(opt.timeout_s >= 1, "--comm-timeout must be >= 1 s, got ", opt.timeout_s);
  const auto timeout = std::chrono::milliseconds(int64_t(opt.timeout_s) * 1000);
  if (opt.comm == "local") {
    CPI_CHECK(!launched_by_mpirun(), "running under mpirun with --comm local: pass --comm mpi");
    int world = opt.world_size > 0 ? opt.world_size : opt.cp_size;
    CPI_CHECK(world % opt.cp_size == 0, "--attn-cp-size ", opt.cp_size, " does not divide the world size ", world,
              " (--world-size)");
    check_ep_size(opt.ep_size, world);
    if (world == 1) {
      fn(*std::make_unique<ParallelCtx>());
      return;
    }
    run_local(world, timeout, [&](Communicator& c) { run_rank(c, opt, fn); });
    return;
  }
  if (opt.comm == "mpi") {
    CPI_CHECK(launched_by_mpirun(), "--comm mpi needs the job to be started by mpirun (e.g. mpirun -np 2 cpinfer ...)");
    auto world = make_mpi_communicator(timeout);
    CPI_CHECK(opt.world_size == 0 || opt.world_size == world->size(), "--world-size ", opt.world_size,
              " but mpirun started ", world->size(), " ranks");
    CPI_CHECK(world->size() % opt.cp_size == 0, "--attn-cp-size ", opt.cp_size, " does not divide the ", world->size(),
              " mpirun ranks");
    run_rank(*world, opt, fn);
    return;
  }
  CPI_FAIL("unknown --comm '", opt.comm, "' (expected local or mpi)");
}

}  // namespace cpinfer
