#include "model/weight_map.h"

#include <cmath>

namespace cpinfer {

namespace {
std::string why(const char* a, int64_t va, const char* b = nullptr, int64_t vb = 0) {
  std::string s = std::string(a) + "=" + std::to_string(va);
  if (b) s += ", " + std::string(b) + "=" + std::to_string(vb);
  return s;
}
}  // namespace

WeightMap decoder_weight_map(const ModelConfig& cfg, const DecoderSpec& spec, ModelWeights& w, ExpertRange share,
                             TpShard tp) {
  const int64_t V = cfg.vocab_size, H = cfg.hidden_size, D = cfg.head_dim;
  const int64_t Hq = cfg.num_attention_heads, Hkv = cfg.num_key_value_heads;
  const int64_t I = cfg.intermediate_size, Im = cfg.moe_intermediate_size, E = cfg.num_experts;
  const float s_h = 1.0f / std::sqrt(float(H));
  const std::string hs = why("hidden_size", H), hd = why("head_dim", D), vh = why("vocab_size", V, "hidden_size", H);
  const std::string q_why = why("num_attention_heads*head_dim", Hq * D, "hidden_size", H);
  const std::string kv_why = why("num_key_value_heads*head_dim", Hkv * D, "hidden_size", H);
  const std::string router_why = why("num_experts", E, "hidden_size", H);
  const std::string mlp_why = why("intermediate_size", I, "hidden_size", H);

  WeightMap m;
  w.layers.assign(static_cast<size_t>(cfg.num_hidden_layers), LayerWeights{});
  auto add = [&](std::string name, std::vector<int64_t> shape, const std::string& why_s, Tensor* dst, uint64_t id,
                 float scale, float mean = 0.0f) {
    m.tensors.push_back({std::move(name), std::move(shape), why_s, dst, id, scale, mean, "", nullptr, {}});
  };
  // A parallel linear layer: it keeps its shard and full shape; the entry names the full tensor.
  auto add_linear = [&](std::string name, std::vector<int64_t> shape, const std::string& why_s, ParallelLinear* dst,
                        LinearShard shard, uint64_t id, float scale) {
    dst->shard = shard;
    dst->full_shape = shape;
    add(std::move(name), std::move(shape), why_s, &dst->weight, id, scale);
    m.tensors.back().scale_dst = &dst->weight.scale;
    m.tensors.back().shard = shard;
  };
  // Attention TP: this rank's heads (q/k/v rows, o columns); whole layers when tp.size == 1.
  const bool split = tp.size > 1;
  const AttnHeadShard heads = attn_head_shard(Hq, Hkv, tp);
  const LinearShard q_rows = split ? shard_rows(heads.q_first, heads.q_count, D) : LinearShard{};
  const LinearShard kv_rows = split ? shard_rows(heads.kv_first, heads.kv_count, D) : LinearShard{};
  const LinearShard o_cols = split ? shard_cols(heads.q_first, heads.q_count, D) : LinearShard{};
  LinearShard mlp_rows, mlp_cols;
  if (split) {
    bool any_dense = false;
    for (int l = 0; l < cfg.num_hidden_layers; ++l) any_dense |= !(spec.moe && cfg.is_moe_layer(l));
    if (any_dense) {
      const int64_t part = even_part(I, tp, "the dense MLP's intermediate_size");
      mlp_rows = shard_rows(tp.rank, 1, part);
      mlp_cols = shard_cols(tp.rank, 1, part);
    }
  }
  // Random tensor ids: 1..3 global, per layer 100 + 16 * layer + kind, experts 1e6 + (layer * E + e) * 3.
  add("model.embed_tokens.weight", {V, H}, vh, &w.embed, 1, 1.0f);
  add("model.norm.weight", {H}, hs, &w.final_norm, 2, 0.05f, 1.0f);
  m.tie_lm_head = cfg.tie_word_embeddings;
  if (!m.tie_lm_head) {
    add("lm_head.weight", {V, H}, vh, &w.lm_head, 3, s_h);
    m.tensors.back().missing_hint = "tie_word_embeddings is false in config.json";
  }
  for (int l = 0; l < cfg.num_hidden_layers; ++l) {
    LayerWeights& L = w.layers[static_cast<size_t>(l)];
    const std::string p = "model.layers." + std::to_string(l) + ".";
    const uint64_t lid = 100 + 16 * uint64_t(l);
    add(p + "input_layernorm.weight", {H}, hs, &L.input_norm, lid + 0, 0.05f, 1.0f);
    add(p + "post_attention_layernorm.weight", {H}, hs, &L.post_attn_norm, lid + 1, 0.05f, 1.0f);
    add_linear(p + "self_attn.q_proj.weight", {Hq * D, H}, q_why, &L.q_proj, q_rows, lid + 2, s_h);
    add_linear(p + "self_attn.k_proj.weight", {Hkv * D, H}, kv_why, &L.k_proj, kv_rows, lid + 3, s_h);
    add_linear(p + "self_attn.v_proj.weight", {Hkv * D, H}, kv_why, &L.v_proj, kv_rows, lid + 4, s_h);
    add_linear(p + "self_attn.o_proj.weight", {H, Hq * D}, q_why, &L.o_proj, o_cols, lid + 5,
               1.0f / std::sqrt(float(Hq * D)));
    if (spec.qk_norm) {
      add(p + "self_attn.q_norm.weight", {D}, hd, &L.q_norm, lid + 6, 0.05f, 1.0f);
      add(p + "self_attn.k_norm.weight", {D}, hd, &L.k_norm, lid + 7, 0.05f, 1.0f);
    }
    L.moe = spec.moe && cfg.is_moe_layer(l);
    if (!L.moe) {
      add_linear(p + "mlp.gate_proj.weight", {I, H}, mlp_why, &L.mlp_gate, mlp_rows, lid + 9, s_h);
      add_linear(p + "mlp.up_proj.weight", {I, H}, mlp_why, &L.mlp_up, mlp_rows, lid + 10, s_h);
      add_linear(p + "mlp.down_proj.weight", {H, I}, mlp_why, &L.mlp_down, mlp_cols, lid + 11,
                 1.0f / std::sqrt(float(I)));
      continue;
    }
    add(p + "mlp.gate.weight", {E, H}, router_why, &L.router, lid + 8, s_h);
    ExpertShard& S = L.experts;
    S.n_experts = static_cast<int32_t>(E);
    S.first = share.first;
    S.count = share.count;
    S.gate.resize(static_cast<size_t>(share.count));
    S.up.resize(static_cast<size_t>(share.count));
    S.down.resize(static_cast<size_t>(share.count));
    m.experts.push_back({p + "mlp.experts.", &S, E, Im, H, 1000000 + uint64_t(l) * uint64_t(E) * 3, m.tensors.size()});
  }
  return m;
}

}  // namespace cpinfer
