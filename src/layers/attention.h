// Causal self-attention of one decoder layer (q/k/v projections, optional per-head q/k RMSNorm,
// RoPE, paged KV store, attention, o projection) with its context-parallel strategy chosen once per
// forward from the plan and the options:
// - OneRank: no CP group; the rank's tokens attend over its own cache.
// - CpReplicatedKv: every rank gathers every rank's K‖V (one all-gather, parallel/exchange.h),
//   stores all of them, then attends (SGLang's cp_allgather_and_save_kv_cache).
// - CpReplicatedKvOverlap: the same exchange started asynchronously while each local block attends
//   to its own keys (the diagonal), then to the other ranks' keys, merged by LSE (parallel/merge.h).
// - CpShardedKv: each rank stores only the K/V of its own rows (layers/sharded_attention.h: pass-KV
//   ring over the new rows, pass-Q over the shards of earlier forwards, merged by LSE).
// Orthogonal to the strategy, attention tensor parallelism (ParallelCtx::attn_tp, T ranks): the
// rank computes only its heads (AttentionShape holds the local head counts, layers/linear.h
// attn_head_shard), its cache holds only its kv heads, and o_proj is row-parallel: the partial
// outputs are summed over the TP group, after which every TP peer holds the same rows.
#pragma once
#include <cstdint>
#include <memory>

#include "layers/linear.h"
#include "layers/scratch.h"
#include "layers/sharded_attention.h"
#include "ops/backend.h"
#include "parallel/context.h"
#include "parallel/plan.h"

namespace cpinfer {

// This rank's slices (its heads): [Hq*D, H], [Hkv*D, H], [Hkv*D, H], [H, Hq*D] in local heads.
struct AttentionWeights {
  const ColumnParallelLinear *q_proj = nullptr, *k_proj = nullptr, *v_proj = nullptr;
  const RowParallelLinear* o_proj = nullptr;
  Tensor q_norm, k_norm;  // [D]; undefined when the family has no q/k norm
};

// n_heads, n_kv_heads: the heads this rank computes (all of them without attention TP).
struct AttentionShape {
  int64_t hidden = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float eps = 1e-6f;  // q/k RMSNorm
  bool qk_norm = false;
};

// A forward's attention metadata already on the device, laid out as Attention::plan would upload
// it (a captured decode graph reads it from fixed buffers that each replay refills).
struct AttnInputs {
  Tensor positions;       // [T] I32
  Tensor slots;           // [n_all] I32
  Tensor block_table;     // [n_seqs, max_blocks] I32
  Tensor blocks;          // [n_blocks, kAttnBlockFields] I32
  int32_t key_bound = 0;  // AttnBatch::key_bound
};

class Attention {
 public:
  enum class Strategy { OneRank, CpReplicatedKv, CpReplicatedKvOverlap, CpShardedKv };

  Attention(const AttentionShape& shape, RopeParams rope, Backend& be, const ParallelCtx& par, const ModelOptions& opt,
            Profiler& prof);

  // Once per forward: positions, K/V slots and the attention blocks of `plan` go to the device
  // (every layer reuses them) and the strategy is fixed. With `dev` (one rank only) they are there
  // already and nothing is uploaded.
  void plan(const ForwardPlan& plan, const AttnInputs* dev = nullptr);
  Strategy strategy() const { return strategy_; }

  // Returns o_proj(attention(h)) [T, H] (scratch of this object, valid until the next run), summed
  // over the attention-TP group; h [T, H] is the normed hidden state of this rank's rows (the same
  // on every TP peer); K/V of the CP group (this rank's kv heads) go into `kv`.
  Tensor run(const AttentionWeights& w, const KvLayer& kv, const Tensor& h);

 private:
  enum Slot {
    kPos,
    kSlots,
    kBlockTable,
    kBlocks,
    kBlocksDiag,
    kBlocksPrefix,
    kQ,
    kKvLocal,
    kKvAll,
    kOut,
    kLse,
    kOut2,
    kLse2,
    kO,
    kNumSlots
  };
  void set_batch(AttnBatch& b, std::vector<AttnBlock> blocks, const Tensor& table, Slot slot,
                 const Tensor* dev_blocks = nullptr);
  void gathered(const KvLayer& kv, const Tensor& q, const Tensor& kv_local, Tensor out, bool overlap);

  AttentionShape shape_;
  RopeParams rope_;
  Backend& be_;
  const ParallelCtx& par_;
  const ModelOptions& opt_;
  Profiler& prof_;
  Scratch scratch_;
  Strategy strategy_ = Strategy::OneRank;
  const ForwardPlan* plan_ = nullptr;
  Tensor pos_, slots_;                         // [T] local positions, [n_all] slots of every rank's rows
  AttnBatch batch_;                            // every block over all its keys
  AttnBatch batch_diag_, batch_prefix_;        // overlapped exchange: own keys, then the other ranks'
  std::unique_ptr<ShardedAttention> sharded_;  // CpShardedKv
};

}  // namespace cpinfer
