// Qwen3 families: Qwen3MoeForCausalLM (sparse MoE layers where config.json's decoder_sparse_step /
// mlp_only_layers say so) and the dense Qwen3ForCausalLM. Both are the pre-norm decoder
// (model/decoder.h) with per-head q/k RMSNorm before RoPE.
#pragma once
#include <vector>

#include "model/registry.h"

namespace cpinfer {

std::vector<ModelFamily> qwen3_families();

}  // namespace cpinfer
