// Random weights at any config's shape, built straight on the back-end's device: benchmarks at
// the real Qwen3-30B-A3B shape need no checkpoint on disk.
#pragma once
#include <string>

#include "model/weights.h"

namespace cpinfer {

// A config by built-in name ("qwen3-30b-a3b"; "qwen3-30b-a3b-fp8": the same with the
// quantization_config of Qwen/Qwen3-30B-A3B-FP8) or from a config.json path.
ModelConfig random_model_config(const std::string& name_or_path);

// BF16 weights with the scale of a trained model (norms ~1, projections ~1/sqrt(fan_in)); only
// this rank's experts (expert_range) are allocated. With an FP8 quantization_config the linear
// layers (attention projections, dense MLP, experts) get finite e4m3 codes and 128x128 block
// scales of the same magnitude, kept FP8 where backend.fp8_weights_supported() and given as their
// BF16-rounded values code · scale elsewhere. With an attention-TP group (tp.size > 1) the attention
// projections and dense MLP weights are this rank's slices of the same full weights.
ModelWeights random_weights(const ModelConfig& cfg, Backend& backend, int rank, int world, uint64_t seed = 0,
                            TpShard tp = {});

}  // namespace cpinfer
