#include "model/decoder.h"

#include "parallel/exchange.h"

namespace cpinfer {

namespace {
// The heads this rank computes: all of them, or its share of the attention-TP group.
AttnHeadShard head_shard(const ModelConfig& cfg, const ParallelCtx& par) {
  return attn_head_shard(cfg.num_attention_heads, cfg.num_key_value_heads,
                         TpShard{par.attn_tp_rank(), par.attn_tp_size()});
}
AttentionShape attention_shape(const ModelConfig& cfg, const DecoderSpec& spec, const ParallelCtx& par) {
  const AttnHeadShard heads = head_shard(cfg, par);
  AttentionShape s;
  s.hidden = cfg.hidden_size;
  s.n_heads = heads.q_count;
  s.n_kv_heads = heads.kv_count;
  s.head_dim = cfg.head_dim;
  s.eps = static_cast<float>(cfg.rms_norm_eps);
  s.qk_norm = spec.qk_norm;
  return s;
}
MoeShape moe_shape(const ModelConfig& cfg) {
  return MoeShape{cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob};
}
}  // namespace

DecoderLM::DecoderLM(const ModelConfig& cfg, const DecoderSpec& spec, ModelWeights weights, Backend& backend,
                     ParallelCtx par, const ModelOptions& opt)
    : cfg_(cfg),
      spec_(spec),
      w_(std::move(weights)),
      be_(backend),
      par_(par),
      opt_(opt),
      prof_(backend, opt_),
      scratch_(backend, kNumSlots),
      attn_(attention_shape(cfg, spec, par), cfg.rope_params(), backend, par_, opt_, prof_),
      moe_(moe_shape(cfg), backend, par_, opt_, prof_),
      mlp_(backend, prof_),
      graphs_(backend, opt_) {
  CPI_CHECK(static_cast<int>(w_.layers.size()) == static_cast<int>(cfg_.num_hidden_layers), "weights hold ",
            w_.layers.size(), " layers, config.json says ", cfg_.num_hidden_layers);
  if (par_.cp && par_.world) {
    CPI_CHECK(par_.world->size() % par_.cp->size() == 0, "attn_cp_size ", par_.cp->size(),
              " does not divide the world size ", par_.world->size());
  }
  CPI_CHECK(par_.cp_size() * par_.attn_tp_size() == par_.world_size(), "attention CP size ", par_.cp_size(),
            " x TP size ", par_.attn_tp_size(), " != world size ", par_.world_size());
  // The weights must be this rank's heads (load_weights / random_weights with the same TpShard).
  const AttnHeadShard heads = head_shard(cfg_, par_);
  for (const LayerWeights& L : w_.layers)
    CPI_CHECK(L.q_proj.weight.dim(0) == heads.q_count * cfg_.head_dim &&
                  L.k_proj.weight.dim(0) == heads.kv_count * cfg_.head_dim,
              "weights hold ", L.q_proj.weight.dim(0) / cfg_.head_dim, " q / ", L.k_proj.weight.dim(0) / cfg_.head_dim,
              " kv heads per layer, attention TP rank ", par_.attn_tp_rank(), " of ", par_.attn_tp_size(), " computes ",
              heads.q_count, " / ", heads.kv_count, ": load them with its TpShard");
  // Device communicators order their collectives on this back-end's stream: no host waits.
  if (void* stream = be_.native_stream()) {
    if (par_.world) par_.world->bind_stream(stream);
    if (par_.cp) par_.cp->bind_stream(stream);
    if (par_.attn_tp) par_.attn_tp->bind_stream(stream);
  }
}

DecoderLM::~DecoderLM() = default;

KvCacheShape DecoderLM::kv_shape(int n_blocks, int block_size) const {
  KvCacheShape s;
  s.n_layers = static_cast<int>(cfg_.num_hidden_layers);
  s.n_kv_heads = static_cast<int>(head_shard(cfg_, par_).kv_count);  // this rank's kv heads
  s.head_dim = static_cast<int>(cfg_.head_dim);
  s.block_size = block_size;
  s.n_blocks = n_blocks;
  s.dtype = be_.act_dtype();
  return s;
}

Tensor DecoderLM::forward_logits(const ForwardPlan& plan, KvCache& cache) {
  if (graphs_.applies(plan, par_.world_size()))
    return graphs_.run(plan, [&](const ForwardPlan& p, const StepInputs& in) { return run_layers(p, cache, &in); });
  return run_layers(plan, cache, nullptr);
}

Tensor DecoderLM::run_layers(const ForwardPlan& plan, KvCache& cache, const StepInputs* in) {
  const int64_t T = plan.n_local();
  const int64_t H = cfg_.hidden_size;
  const int64_t V = cfg_.vocab_size;
  const DType ad = be_.act_dtype();
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  prof_.start();

  // Metadata goes to the device once per forward; every layer reuses it.
  Tensor ids = in ? in->ids : scratch_.upload_i32(kIds, plan.tokens, {std::max<int64_t>(T, 1)}).slice(0, T);
  attn_.plan(plan, in ? &in->attn : nullptr);
  Tensor x = scratch_.rows(kX, ad, T, H);  // residual stream
  Tensor h = scratch_.rows(kH, ad, T, H);  // normed input of the next sub-layer
  if (T > 0) {
    be_.embedding(w_.embed, ids, x);
    be_.rms_norm(x, w_.layers[0].input_norm, eps, h);
  }
  prof_.mark(&ForwardProfile::other_s);

  const int n_layers = static_cast<int>(cfg_.num_hidden_layers);
  for (int l = 0; l < n_layers; ++l) {
    const LayerWeights& L = w_.layers[size_t(l)];
    Tensor o =
        attn_.run(AttentionWeights{&L.q_proj, &L.k_proj, &L.v_proj, &L.o_proj, L.q_norm, L.k_norm}, cache.layer(l), h);
    const Tensor* next_norm = l + 1 < n_layers ? &w_.layers[size_t(l) + 1].input_norm : nullptr;
    Tensor m = scratch_.rows(kM, ad, T, H);
    if (L.moe && moe_.runs_between_norms()) {
      // The MoE block with the adds and norms on both sides: a back-end may run them inside the
      // router and the experts' weighted sum (one kernel fewer each in a decode step).
      if (T > 0)
        moe_.run_between_norms(MoeWeights{&L.router, &L.experts}, x, o, L.post_attn_norm, next_norm, eps, h, m);
      continue;
    }
    if (T > 0) {
      be_.add_rms_norm(x, o, L.post_attn_norm, eps, h);
      prof_.mark(&ForwardProfile::other_s);
    }
    if (L.moe) {
      moe_.run(MoeWeights{&L.router, &L.experts}, plan, h, m);
    } else {
      mlp_.run(MlpWeights{&L.mlp_gate, &L.mlp_up, &L.mlp_down}, h, m, opt_.elide_comm ? nullptr : par_.attn_tp);
    }
    if (T > 0) {
      if (next_norm) {
        be_.add_rms_norm(x, m, *next_norm, eps, h);
      } else {
        be_.add(x, m);
      }
    }
    prof_.mark(&ForwardProfile::other_s);
  }

  // Logits only for the rows that need them; each rank computes its own rows, then they are
  // gathered over the CP group (the last token of a zigzag-split prompt lives on CP rank 0).
  const int64_t R = static_cast<int64_t>(plan.logit_rows_local.size());
  const int64_t R_all = static_cast<int64_t>(plan.logit_rows_all.size());
  Tensor logits = scratch_.rows(kLogits, DType::F32, R, V);
  if (R > 0) {
    Tensor idx = in ? in->logit_idx : scratch_.upload_i32(kLogitIdx, plan.logit_rows_local, {R});
    Tensor sel = scratch_.get(kSel, ad, {R, H});
    Tensor sel_norm = scratch_.get(kSelNorm, ad, {R, H});
    be_.gather_rows(x, idx, sel);
    be_.rms_norm(sel, w_.final_norm, eps, sel_norm);
    be_.linear(sel_norm, w_.lm_head, logits);
  }
  prof_.mark(&ForwardProfile::dense_gemm_s);
  if (par_.cp_size() == 1) return logits;
  Tensor all = scratch_.rows(kLogitsAll, DType::F32, R_all, V);
  sync_for(be_, *par_.cp);
  if (!opt_.elide_comm) gather_rows(*par_.cp, logits, all, plan.logit_rows_per_rank);
  return all;
}

// The host waits here, after the last collective was queued. Queued collectives report their
// failures now (a timeout aborted them and the streams ran on).
void DecoderLM::finish_forward() {
  be_.sync();
  if (par_.world) par_.world->wait_all();
  if (par_.cp && par_.cp != par_.world) par_.cp->wait_all();
  if (par_.attn_tp && par_.attn_tp != par_.world) par_.attn_tp->wait_all();
  prof_.mark(&ForwardProfile::comm_s);
}

std::vector<float> DecoderLM::forward(const ForwardPlan& plan, KvCache& cache) {
  Tensor logits = forward_logits(plan, cache);
  std::vector<float> out(static_cast<size_t>(logits.numel()));
  if (!out.empty()) be_.download(out.data(), logits.data, out.size() * sizeof(float));
  finish_forward();
  return out;
}

std::vector<int32_t> DecoderLM::forward_sample(const ForwardPlan& plan, KvCache& cache,
                                               const std::vector<SampleRow>& rows) {
  CPI_CHECK(rows.size() == plan.logit_rows_all.size(), "forward_sample: ", rows.size(), " sampling rows for ",
            plan.logit_rows_all.size(), " logit rows");
  Tensor logits = forward_logits(plan, cache);
  std::vector<int32_t> out(rows.size());
  if (!rows.empty()) {
    Tensor ids = scratch_.get(kSampled, DType::I32, {int64_t(rows.size())});
    be_.sample(logits, rows, ids);
    be_.download(out.data(), ids.data, out.size() * sizeof(int32_t));
  }
  finish_forward();
  return out;
}

ModelFamily decoder_family(std::string architecture, const DecoderSpec& spec) {
  ModelFamily f;
  f.architecture = std::move(architecture);
  f.weight_map = [spec](const ModelConfig& cfg, ModelWeights& w, ExpertRange share, TpShard tp) {
    return decoder_weight_map(cfg, spec, w, share, tp);
  };
  f.make = [spec](const ModelConfig& cfg, ModelWeights w, Backend& be, ParallelCtx par, const ModelOptions& opt) {
    return std::unique_ptr<CausalLM>(std::make_unique<DecoderLM>(cfg, spec, std::move(w), be, par, opt));
  };
  return f;
}

}  // namespace cpinfer
