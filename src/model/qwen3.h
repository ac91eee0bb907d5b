// Qwen3 decoder (Qwen3MoeForCausalLM and the dense Qwen3ForCausalLM), written once over the op
// interface (ops/backend.h) and the communicator interface: no back-end header here.
#pragma once
#include <memory>
#include <vector>

#include "model/causal_lm.h"
#include "model/weights.h"

namespace cpinfer {

class Qwen3Model : public CausalLM {
 public:
  Qwen3Model(const ModelConfig& cfg, ModelWeights weights, Backend& backend, ParallelCtx par = {},
             const ModelOptions& opt = {});
  ~Qwen3Model() override;

  const ModelConfig& config() const override { return cfg_; }
  Backend& backend() override { return be_; }
  const ParallelCtx& parallel() const override { return par_; }
  ModelOptions& options() override { return opt_; }
  const ForwardProfile& last_profile() const override { return profile_; }
  size_t weight_bytes() const override { return w_.bytes; }
  DType weight_dtype() const override { return w_.embed.dtype; }
  const ModelWeights& weights() const { return w_; }

  std::vector<float> forward(const ForwardPlan& plan, KvCache& cache) override;
  std::vector<int32_t> forward_sample(const ForwardPlan& plan, KvCache& cache,
                                      const std::vector<SampleRow>& rows) override;
  KvCacheShape kv_shape(int n_blocks, int block_size) const override;

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
  ModelOptions opt_;
  std::unique_ptr<Workspace> ws_;
  ForwardProfile profile_;
  double mark_t_ = 0;
};

}  // namespace cpinfer
