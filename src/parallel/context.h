// The communicators of one rank, handed to the model and its layers.
#pragma once
#include "comm/communicator.h"

namespace cpinfer {

// world: all ranks, experts are sharded over it (nullptr: one rank). cp: this rank's
// context-parallel group (== world when attn_cp_size == world size). control: the same ranks as
// world over host memory, for decisions (sampled tokens, scheduling steps); it is world itself
// unless world moves device memory (NCCL).
struct ParallelCtx {
  Communicator* world = nullptr;
  Communicator* cp = nullptr;
  Communicator* control = nullptr;
  // Experts: sharded over world (each rank holds a contiguous range and the MoE reduces partial
  // sums across ranks) unless replicated, when every rank holds all of them and the MoE needs no
  // communication (--ep-size 1: more memory per rank, less traffic).
  bool replicate_experts = false;
  int world_rank() const { return world ? world->rank() : 0; }
  int world_size() const { return world ? world->size() : 1; }
  int cp_rank() const { return cp ? cp->rank() : 0; }
  int cp_size() const { return cp ? cp->size() : 1; }
};

}  // namespace cpinfer
