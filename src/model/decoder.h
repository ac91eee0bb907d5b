// A pre-norm decoder-only transformer as a composition of layers: embedding, per layer
// RMSNorm → Attention → residual + RMSNorm → dense MLP or MoE, final norm and LM head on the rows
// whose logits are wanted (gathered over the CP group). Qwen3-MoE, dense Qwen3 and Llama 3 are this
// class with a different DecoderSpec and weight map (model/registry.cpp). The layers own their
// parallel strategies; this file only wires them.
#pragma once
#include <memory>
#include <vector>

#include "layers/attention.h"
#include "layers/moe.h"
#include "model/causal_lm.h"
#include "model/decode_graph.h"
#include "model/registry.h"
#include "model/weight_map.h"
#include "model/weights.h"

namespace cpinfer {

class DecoderLM : public CausalLM {
 public:
  DecoderLM(const ModelConfig& cfg, const DecoderSpec& spec, ModelWeights weights, Backend& backend,
            ParallelCtx par = {}, const ModelOptions& opt = {});
  ~DecoderLM() override;

  const ModelConfig& config() const override { return cfg_; }
  Backend& backend() override { return be_; }
  const ParallelCtx& parallel() const override { return par_; }
  ModelOptions& options() override { return opt_; }
  const ForwardProfile& last_profile() const override { return prof_.profile(); }
  size_t weight_bytes() const override { return w_.bytes; }
  DType weight_dtype() const override {
    return !w_.layers.empty() && w_.layers.front().q_proj.weight.fp8() ? DType::F8E4M3 : w_.embed.dtype;
  }
  const ModelWeights& weights() const { return w_; }
  const DecodeGraphs* decode_graphs() const override { return &graphs_; }

  KvCacheShape kv_shape(int n_blocks, int block_size) const override;
  std::vector<float> forward(const ForwardPlan& plan, KvCache& cache) override;
  std::vector<int32_t> forward_sample(const ForwardPlan& plan, KvCache& cache,
                                      const std::vector<SampleRow>& rows) override;

 private:
  enum Slot { kIds, kX, kH, kM, kLogitIdx, kSel, kSelNorm, kLogits, kLogitsAll, kSampled, kNumSlots };
  // Runs the layers and returns the logits of plan.logit_rows_all on the device ([R_all, vocab]
  // F32), gathered over the CP group; finish_forward() then waits for the device and the queued
  // collectives.
  Tensor forward_logits(const ForwardPlan& plan, KvCache& cache);
  // The layers of forward_logits; with `in` the per-step inputs are on the device already (a
  // decode graph's buffers) and nothing is uploaded.
  Tensor run_layers(const ForwardPlan& plan, KvCache& cache, const StepInputs* in);
  void finish_forward();

  ModelConfig cfg_;
  DecoderSpec spec_;
  ModelWeights w_;
  Backend& be_;
  ParallelCtx par_;
  ModelOptions opt_;
  Profiler prof_;
  Scratch scratch_;
  Attention attn_;
  MoE moe_;
  Mlp mlp_;
  DecodeGraphs graphs_;
};

// The registry entry of a decoder family: its weight map and a DecoderLM with `spec`.
ModelFamily decoder_family(std::string architecture, const DecoderSpec& spec);

}  // namespace cpinfer
