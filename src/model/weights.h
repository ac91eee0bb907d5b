// The model's weights, mapped from a checkpoint and validated against the config.
// Names follow Hugging Face Qwen3(-MoE): model.embed_tokens, model.layers.N.{input_layernorm,
// post_attention_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm, mlp.gate (router),
// mlp.experts.E.{gate,up,down}_proj or fused mlp.experts.{gate_up_proj,down_proj},
// mlp.{gate,up,down}_proj (dense)}, model.norm, lm_head.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "core/tensor.h"
#include "layers/linear.h"
#include "loader/config.h"
#include "loader/safetensors.h"
#include "ops/backend.h"

namespace cpinfer {

struct LayerWeights {
  Tensor input_norm, post_attn_norm;  // [H]
  // [Hq*D, H], [Hkv*D, H], [Hkv*D, H], [H, Hq*D] in the checkpoint (float or FP8); with attention TP
  // this rank's heads only: q/k/v column-parallel (its heads' rows), o row-parallel (their columns).
  ColumnParallelLinear q_proj, k_proj, v_proj;
  RowParallelLinear o_proj;
  Tensor q_norm, k_norm;  // [D]
  bool moe = false;
  Tensor router;        // [E, H]   (moe)
  ExpertShard experts;  // (moe) only this rank's share
  // Dense MLP: [I, H], [I, H], [H, I] (float or FP8); with attention TP gate/up column-parallel
  // (I / T rows each), down row-parallel (the same I / T columns).
  ColumnParallelLinear mlp_gate, mlp_up;
  RowParallelLinear mlp_down;
};

struct ExpertRange {
  int32_t first = 0, count = 0;
};

// Expert-parallel share of rank `rank` of `world`: contiguous ranges, the remainder going one
// each to the first ranks. Any world >= 1; with world > n_experts the last ranks get count 0.
ExpertRange expert_range(int n_experts, int rank, int world);

struct ModelWeights {
  Tensor embed;       // [V, H]
  Tensor final_norm;  // [H]
  Tensor lm_head;     // [V, H] (= embed when tie_word_embeddings)
  std::vector<LayerWeights> layers;
  size_t bytes = 0;           // bytes of weights this rank holds
  std::vector<Buffer> owned;  // device copies (empty on the CPU back-end: views into the mmap)
};

// Maps every weight of `cfg` from `ckpt`, checking names, dtypes (BF16/F16/F32) and shapes; a
// failure throws cpinfer::Error naming the tensor, its file and expected vs actual shape.
// CPU back-end: zero-copy views into the checkpoint's mmap (the caller keeps `ckpt` alive); a
// tensor whose bytes are not aligned to its element size is copied instead. Other back-ends:
// one allocation + upload per tensor (per expert range for fused experts). Only the experts of
// expert_range(E, rank, world) are touched. With an attention-TP group (tp.size > 1) the attention
// projections and dense MLP weights are this rank's slices only (layers/linear.h). `progress` is
// called after each tensor.
ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& cfg, Backend& backend, int rank, int world,
                          const std::function<void(size_t done_bytes, size_t total_bytes)>& progress = {},
                          TpShard tp = {});

}  // namespace cpinfer
