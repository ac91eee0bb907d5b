// Sparse MoE block (router softmax, top-k, expert GEMMs) with its expert-parallel strategy:
// - Replicated: every rank holds all experts and handles its own rows (no communication).
// - Sharded: each rank holds a contiguous range of experts (ExpertShard); the CP group's rows are
//   gathered, each rank applies its experts to all of them, and the partial sums are reduced back
//   to the rows' owners (reduce-scatter; an all-reduce when the world holds several CP groups: they
//   are attention-TP peers, which hold the same rows after o_proj's all-reduce). Optionally
//   pipelined in chunks (ModelOptions::moe_chunks).
#pragma once
#include <cstdint>

#include "layers/linear.h"
#include "layers/scratch.h"
#include "ops/backend.h"
#include "parallel/context.h"
#include "parallel/plan.h"

namespace cpinfer {

struct MoeWeights {
  const Tensor* router = nullptr;        // [E, H]
  const ExpertShard* experts = nullptr;  // this rank's share
};

struct MoeShape {
  int64_t hidden = 0;
  int n_experts = 0, top_k = 0;
  bool norm_topk_prob = false;
};

class MoE {
 public:
  MoE(const MoeShape& shape, Backend& be, const ParallelCtx& par, const ModelOptions& opt, Profiler& prof);

  // out [T, H] = the MoE of this rank's rows h [T, H] (all ranks of the world call it together).
  void run(const MoeWeights& w, const ForwardPlan& plan, const Tensor& h, Tensor out);

  // Whether run_between_norms applies: each rank runs all of its rows' experts (no communication).
  bool runs_between_norms() const { return par_.world_size() == 1 || par_.replicate_experts; }
  // The block with the norms around it, on this rank's rows: residual += x; h = rms_norm(residual) ·
  // norm_w; the experts of h into out; residual += out and, with next_norm_w, h = rms_norm(residual) ·
  // next_norm_w. The back-end may run each add + norm inside the router and the experts' weighted
  // sum (out is then not written). Only where runs_between_norms().
  void run_between_norms(const MoeWeights& w, Tensor residual, const Tensor& x, const Tensor& norm_w,
                         const Tensor* next_norm_w, float eps, Tensor h, Tensor out);

 private:
  enum Slot { kRouterLogits, kTopIds, kTopW, kHAll, kPartial, kNumSlots };
  // out = Σ over each row's top-k experts held here; rows, out [n, H].
  void experts(const MoeWeights& w, const Tensor& rows, Tensor out);
  void pipelined(const MoeWeights& w, const ForwardPlan& plan, const Tensor& h, Tensor out, int k);
  int chunks() const;

  MoeShape shape_;
  Backend& be_;
  const ParallelCtx& par_;
  const ModelOptions& opt_;
  Profiler& prof_;
  Scratch scratch_;
};

// Dense SwiGLU MLP: out = down(silu(gate(h)) ⊙ up(h)); h, out [T, H]. With attention TP gate and
// up are column-parallel and down row-parallel: each rank computes I / T of the width and the
// partial outputs are summed over the TP group.
struct MlpWeights {
  const ColumnParallelLinear *gate = nullptr, *up = nullptr;  // [I, H] (local: [I / T, H])
  const RowParallelLinear* down = nullptr;                    // [H, I] (local: [H, I / T])
};

class Mlp {
 public:
  Mlp(Backend& be, Profiler& prof) : be_(be), prof_(prof), scratch_(be, kNumSlots) {}
  // group: the attention-TP group the width is split over (nullptr: whole weights); every rank of
  // it calls run with the same rows.
  void run(const MlpWeights& w, const Tensor& h, Tensor out, Communicator* group = nullptr);

 private:
  enum Slot { kGate, kUp, kNumSlots };
  Backend& be_;
  Profiler& prof_;
  Scratch scratch_;
};

}  // namespace cpinfer
