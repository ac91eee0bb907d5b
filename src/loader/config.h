// Hugging Face config.json for Qwen3-MoE (Qwen3MoeForCausalLM), dense Qwen3 (Qwen3ForCausalLM) and
// Llama 3 (LlamaForCausalLM: no biases, `llama3` RoPE scaling),
// in both dialects: hub / transformers 4 (`num_experts`, `rope_theta`, `rope_scaling`) and
// transformers 5 (`num_local_experts`, `rope_parameters`). Defaults follow the transformers config
// classes where a field may be absent; everything the forward pass depends on is validated.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "loader/quant.h"

#include "ops/backend.h"

namespace cpinfer {

// RoPE settings after transformers 5's standardization (legacy keys mapped into one dict).
struct RopeConfig {
  std::string type = "default";  // "default" | "linear" | "yarn" | "llama3"
  double theta = 10000.0;
  double factor = 1.0;                                   // linear, yarn
  int64_t original_max_position_embeddings = 0;          // yarn (defaults to max_position_embeddings)
  std::optional<double> attention_factor;                // yarn: explicit value, else derived from factor
  double beta_fast = 32.0;                               // yarn
  double beta_slow = 1.0;                                // yarn
  bool truncate = true;                                  // yarn: floor/ceil the correction range
  std::optional<double> mscale, mscale_all_dim;          // yarn (DeepSeek style attention factor)
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
};

struct ModelConfig {
  std::string architecture;  // "Qwen3MoeForCausalLM", "Qwen3ForCausalLM" or "LlamaForCausalLM"
  std::string model_type;    // "qwen3_moe" / "qwen3" / "llama" (informational)
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense MLP width (0 when every layer is MoE and it is absent)
  int64_t moe_intermediate_size = 0;  // expert width
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;
  int head_dim = 0;
  int num_experts = 0;  // 0 for dense models
  int num_experts_per_tok = 0;
  int decoder_sparse_step = 1;
  std::vector<int> mlp_only_layers;
  bool norm_topk_prob = false;  // transformers default when absent
  bool tie_word_embeddings = false;
  double rms_norm_eps = 1e-6;
  int64_t max_position_embeddings = 0;
  RopeConfig rope;
  std::string dtype;                   // torch_dtype / dtype, e.g. "bfloat16" ("" when absent)
  int32_t bos_token_id = -1;           // -1 when absent (first entry when the file has a list)
  std::vector<int32_t> eos_token_ids;  // generation_config.json's first, then config.json's
  QuantConfig quant;                   // quantization_config (loader/quant.h); quant.fp8 false when absent

  // True when layer `layer` uses the sparse MoE block (else the dense MLP), as transformers
  // decides: not in mlp_only_layers, experts exist, and (layer+1) % decoder_sparse_step == 0.
  bool is_moe_layer(int layer) const;
  // inv_freq [head_dim/2] and attention_factor, as transformers 5 computes them for rope.type
  // (float32 arithmetic in the same order, so values match to ~1 ulp).
  RopeParams rope_params() const;
};

// Reads DIR/config.json (required) and DIR/generation_config.json (optional: its eos_token_id
// comes first in eos_token_ids). Throws cpinfer::Error naming the file and field on any defect.
ModelConfig load_config(const std::string& dir);

// Parses config.json text; `label` names the file in errors. Exposed for tests and the fuzz target.
ModelConfig parse_config(const std::string& text, const std::string& label);

}  // namespace cpinfer
