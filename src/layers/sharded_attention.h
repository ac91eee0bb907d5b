// Context-parallel attention with a sharded KV cache (--kv-shard): each rank's cache holds only the
// positions it computed (its zigzag blocks; round-robin positions of unsplit sequences and decode
// tokens), so no rank stores the whole context. A query's output is the log-sum-exp merge of:
// - the keys of this forward (every rank's new rows): pass-KV ring. Step s holds the [K; V] rows
//   of rank (me - s) mod C in a small paged scratch cache and attends the local query blocks to
//   them (diagonal blocks causal, earlier blocks whole, later ones skipped) while the same rows
//   move one rank on (all_to_allv_start with one peer each way: overlapped on a queued
//   communicator, before the attention on host ones). The ring runs only when some sequence's new
//   rows lie on several ranks: a decode batch needs none.
// - the keys of earlier forwards (spread over the shards): pass-Q. The queries of all ranks are
//   gathered, every rank attends them to its own shard, writing each destination rank's partial
//   outputs and LSE side by side into one send buffer, and one all_to_allv returns them to the rank
//   of each query, which merges the C partials: two collectives per layer (queries out, partials
//   back), both carrying new-token rows only, so their size does not grow with the context.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "layers/scratch.h"
#include "ops/backend.h"
#include "parallel/context.h"
#include "parallel/plan.h"

namespace cpinfer {

class ShardedAttention {
 public:
  ShardedAttention(Backend& be, const ParallelCtx& par, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim);

  // Once per forward (plan.kv_shard): ring steps, scratch pages and attention blocks.
  void plan(const ForwardPlan& plan);

  // q [T, Hq*D] and kv_local [2T, Hkv*D] ([K; V]) of this rank's rows; slots [T] their slots in
  // this rank's shard `kv`, where they are stored. out [T, Hq*D].
  void run(const KvLayer& kv, const Tensor& q, const Tensor& kv_local, const Tensor& slots, Tensor out);

 private:
  struct Source {                   // the rows of one rank, as held in ring step (me - rank) mod C
    Tensor slots;                   // [rows] their slots in the ring's scratch cache
    std::vector<AttnBatch> passes;  // local query blocks vs these rows, at most one per query block
  };
  enum Slot { kRingA, kRingB, kRingK, kRingV, kLse, kOut2, kLse2, kQAll, kSend, kRecv, kShardTable, kFixedSlots };
  AttnBatch make_batch(std::vector<AttnBlock> blocks, const std::vector<int32_t>& table, int32_t max_pages,
                       const Tensor& dev_table, int slot);
  void attend(const Tensor& q, const AttnBatch& b, const KvLayer& cache, Tensor out, Tensor lse, bool first);

  Backend& be_;
  const ParallelCtx& par_;
  int64_t Hq_, Hkv_, D_;
  std::unique_ptr<Scratch> scratch_;
  const ForwardPlan* plan_ = nullptr;
  int n_steps_ = 1;
  int64_t ring_pages_ = 1;          // pages of the ring's scratch cache
  std::vector<Source> sources_;     // [C]
  std::vector<AttnBatch> batch_q_;  // pass-Q, per rank r: r's queries (rows from 0) over this shard
};

}  // namespace cpinfer
