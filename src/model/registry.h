// Model families by config.json's `architectures[0]`: how to name their weights (one map for the
// checkpoint loader and for random weights) and how to build the model. Adding a family is one
// entry in registry.cpp (docs/adding-a-model.md).
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/causal_lm.h"
#include "model/weight_map.h"

namespace cpinfer {

struct ModelFamily {
  std::string architecture;  // e.g. "Qwen3MoeForCausalLM"
  // Fills w's structure for this rank's expert share and attention-TP shard and names every tensor.
  std::function<WeightMap(const ModelConfig&, ModelWeights& w, ExpertRange share, TpShard tp)> weight_map;
  std::function<std::unique_ptr<CausalLM>(const ModelConfig&, ModelWeights, Backend&, ParallelCtx, const ModelOptions&)>
      make;
};

// The family of `architecture`; throws cpinfer::Error listing the supported ones.
const ModelFamily& model_family(const std::string& architecture);
std::vector<std::string> supported_architectures();

// Builds the model of cfg.architecture over `weights` (from load_weights or random_weights).
std::unique_ptr<CausalLM> make_model(const ModelConfig& cfg, ModelWeights weights, Backend& backend,
                                     ParallelCtx par = {}, const ModelOptions& opt = {});

}  // namespace cpinfer
