// Qwen3 decoder (Qwen3MoeForCausalLM and the dense Qwen3ForCausalLM), written once over the op
// interface (ops/backend.h) and the communicator interface: no back-end header here.
#pragma once
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "kv/kv_cache.h"
#include "loader/config.h"
#include "model/weights.h"
#include "ops/backend.h"
#include "parallel/plan.h"

namespace cpinfer {

// The communicators of one rank. world: all ranks, experts are sharded over it (nullptr: one
// rank). cp: this rank's context-parallel group (== world when attn_cp_size == world size).
// control: the same ranks as world over host memory, for decisions (sampled tokens, scheduling
// steps); it is world itself unless world moves device memory (NCCL).
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

// Wall time per kind of work in one forward; filled only when profiling (which synchronizes the
// device after every op group and so slows the forward down).
struct ForwardProfile {
  double attention_s = 0, moe_s = 0, dense_gemm_s = 0, comm_s = 0, other_s = 0;
  double total() const { return attention_s + moe_s + dense_gemm_s + comm_s + other_s; }
  void add(const ForwardProfile& o) {
    attention_s += o.attention_s; moe_s += o.moe_s; dense_gemm_s += o.dense_gemm_s;
    comm_s += o.comm_s; other_s += o.other_s;
  }
};

class Qwen3Model {
 public:
  Qwen3Model(const ModelConfig& cfg, ModelWeights weights, Backend& backend, ParallelCtx par = {});
  ~Qwen3Model();

  const ModelConfig& config() const { return cfg_; }
  Backend& backend() { return be_; }
  const ParallelCtx& parallel() const { return par_; }
  const ModelWeights& weights() const { return w_; }

  // Runs this rank's rows of `plan`, writes the K/V of every row of the CP group into `cache` (each
  // rank's cache ends up holding all of them) and returns the logits of plan.logit_rows_all, on
  // every rank of the CP group: [R_all, vocab] fp32, row-major. All ranks of the world must call
  // forward together with plans built from the same inputs.
  std::vector<float> forward(const ForwardPlan& plan, KvCache& cache);
  // The same forward, then one token drawn on the device for each logit row (rows[i] for
  // plan.logit_rows_all[i]; Backend::sample): only the ids come back to the host. Every rank of the
  // CP group draws the same tokens.
  std::vector<int32_t> forward_sample(const ForwardPlan& plan, KvCache& cache, const std::vector<SampleRow>& rows);

  void set_profiling(bool on) { profiling_ = on; }
  // How the K/V exchange of a CP prefill meets the attention. Overlapped: each rank stores its own
  // K/V, starts the exchange, computes every local block's diagonal attention (its own keys)
  // meanwhile, then the prefix (the other ranks' keys) and merges the two by log-sum-exp. Auto:
  // overlapped when the CP communicator is stream-ordered (NCCL), sequential otherwise (host
  // communicators finish the exchange before returning, so splitting would only add work).
  enum class KvOverlap { Auto, On, Off };
  void set_kv_overlap(KvOverlap m) { kv_overlap_ = m; }
  // Benchmarks only: skip every collective (the results are wrong; the kernels are the same), so
  // that the exposed communication time is the difference to a normal run.
  void set_elide_comm(bool on) { elide_comm_ = on; }
  // Chunks of the sharded-expert MoE pipeline (gather of chunk c+1 and reduce of chunk c-1 overlap
  // the experts of chunk c). 0: the default, 1 (no pipelining; see moe_chunks() for why); tests and
  // `bench prefill --moe-chunks` set others.
  void set_moe_chunks(int k) { moe_chunks_ = k; }
  const ForwardProfile& last_profile() const { return profile_; }

  // Shape of the KV cache this model needs (dtype = back-end activation dtype).
  KvCacheShape kv_shape(int n_blocks, int block_size) const;

 private:
  struct Workspace;
  // Runs the layers and returns the logits of plan.logit_rows_all on the device ([R_all, vocab]
  // F32), gathered over the CP group; finish_forward() then waits for the device and the queued
  // collectives.
  Tensor forward_logits(const ForwardPlan& plan, KvCache& cache);
  void finish_forward();
  void attention_layer(int l, const ForwardPlan& plan, KvCache& cache);
  void mlp_layer(int l, const ForwardPlan& plan);
  void moe(int l, const ForwardPlan& plan, const Tensor& h, Tensor out);
  // out = Σ over each row's top-k experts held here (router, top-k, expert GEMMs); rows, out [n, H].
  void experts(const LayerWeights& L, const Tensor& rows, Tensor out);
  void moe_pipelined(int l, const ForwardPlan& plan, const Tensor& h, Tensor out, int k);
  int moe_chunks(const ForwardPlan& plan) const;
  void mark(double& bucket);
  bool overlap_kv() const;
  // Host communicators read the device buffers themselves: the work queued so far must be done.
  void sync_for(Communicator* comm);

  ModelConfig cfg_;
  ModelWeights w_;
  Backend& be_;
  ParallelCtx par_;
  RopeParams rope_;
  std::unique_ptr<Workspace> ws_;
  bool profiling_ = false;
  KvOverlap kv_overlap_ = KvOverlap::Auto;
  bool elide_comm_ = false;
  int moe_chunks_ = 0;
  ForwardProfile profile_;
  double mark_t_ = 0;
};

}  // namespace cpinfer
