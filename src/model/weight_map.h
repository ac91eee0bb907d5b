// One description of a decoder model's weights: the checkpoint name, shape and destination of every
// tensor, and the scale random weights give it. The checkpoint loader (weights.cpp) and the random
// weights (random_weights.cpp) both walk this map, so a model family states its names once.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/weights.h"

namespace cpinfer {

// How a family's decoder layer differs from the common pre-norm Llama/Qwen block.
struct DecoderSpec {
  bool qk_norm = false;  // per-head RMSNorm of q and k before RoPE (Qwen3)
  bool moe = false;      // sparse MoE layers where ModelConfig::is_moe_layer says so (Qwen3-MoE)
};

// One tensor: `name` in the checkpoint, `shape` expected (`why`: the config fields that fix it).
// Random weights draw it from N(random_mean, random_scale) with a stream keyed by random_id, so a
// tensor's values depend only on the seed and its id.
struct WeightEntry {
  std::string name;
  std::vector<int64_t> shape;
  std::string why;
  Tensor* dst = nullptr;
  uint64_t random_id = 0;
  float random_scale = 0.0f;
  float random_mean = 0.0f;
  std::string missing_hint;  // said when the tensor is absent (e.g. why lm_head is required)
  // A linear layer's weight (dst is a Weight): where its FP8 block scales go when the back-end
  // computes with FP8 weights. nullptr: an FP8 tensor here is dequantized to BF16 at load.
  Tensor* scale_dst = nullptr;
  // The part of the tensor this rank holds (attention TP): the loader and random weights cut it out
  // of the full tensor (layers/linear.h); `shape` stays the full checkpoint shape.
  LinearShard shard;
};

// The experts of one MoE layer: this rank's share of `prefix`E.{gate,up,down}_proj.weight (per
// expert) or `prefix`{gate_up_proj,down_proj} (transformers 5 fused layout).
struct ExpertEntry {
  std::string prefix;  // "model.layers.L.mlp.experts."
  ExpertShard* dst = nullptr;
  int64_t n_experts = 0, width = 0, hidden = 0;  // E, moe_intermediate_size, hidden_size
  uint64_t random_id = 0;                        // expert e's gate/up/down: random_id + 3e + {0,1,2}
  size_t position = 0;                           // comes before tensors[position] in load order
};

struct WeightMap {
  std::vector<WeightEntry> tensors;  // in load order (the first bad tensor is the one reported)
  std::vector<ExpertEntry> experts;
  bool tie_lm_head = false;  // lm_head = embed after loading
};

// The map of a pre-norm decoder (embed_tokens, layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj,
// [self_attn.{q,k}_norm], post_attention_layernorm, mlp.{gate,up,down}_proj | mlp.gate +
// mlp.experts}, norm, lm_head) in Hugging Face naming. Resizes w.layers and sets the structural
// fields (LayerWeights::moe, ExpertShard range) for this rank's expert share and the shards of its
// parallel linear layers for its place `tp` in the attention-TP group (throws, naming the sizes,
// when the heads or the MLP width cannot be split over it).
WeightMap decoder_weight_map(const ModelConfig& cfg, const DecoderSpec& spec, ModelWeights& w, ExpertRange share,
                             TpShard tp = {});

}  // namespace cpinfer
