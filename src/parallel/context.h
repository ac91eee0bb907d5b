// The communicators of one rank, handed to the model and its layers.
#pragma once
#include "comm/communicator.h"

namespace cpinfer {

// world: all W ranks, experts are sharded over it (nullptr: one rank). cp: this rank's
// context-parallel group of C ranks (== world when attn_cp_size == world size); CP groups are runs
// of consecutive ranks. attn_tp: this rank's attention tensor-parallel group, the T = W / C ranks
// with the same CP rank (rank r's group: r mod C, r mod C + C, ...; == world when C == 1, nullptr
// when T == 1); its ranks hold different heads of the same tokens (SGLang's attn_tp_size = tp_size
// / attn_cp_size). control: the same ranks as world over host memory, for decisions (sampled tokens,
// scheduling steps); it is world itself unless world moves device memory (NCCL).
struct ParallelCtx {
  Communicator* world = nullptr;
  Communicator* cp = nullptr;
  Communicator* attn_tp = nullptr;
  Communicator* control = nullptr;
  // Experts: sharded over world (each rank holds a contiguous range and the MoE reduces partial
  // sums across ranks) unless replicated, when every rank holds all of them and the MoE needs no
  // communication (--ep-size 1: more memory per rank, less traffic).
  bool replicate_experts = false;
  int world_rank() const { return world ? world->rank() : 0; }
  int world_size() const { return world ? world->size() : 1; }
  int cp_rank() const { return cp ? cp->rank() : 0; }
  int cp_size() const { return cp ? cp->size() : 1; }
  int attn_tp_rank() const { return attn_tp ? attn_tp->rank() : 0; }
  int attn_tp_size() const { return attn_tp ? attn_tp->size() : 1; }
};

}  // namespace cpinfer
