#include "model/qwen3.h"

#include <chrono>
#include <cmath>
#include <numeric>

namespace cpinfer {

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

// Scratch tensors of one forward, grown on demand and reused across forwards.
struct Qwen3Model::Workspace {
  enum Slot {
    kIds, kPos, kSlots, kBlocks, kBlockTable, kX, kH, kQ, kKvLocal, kKvAll, kAttnOut, kO, kM,
    kGate, kUp, kRouterLogits, kTopIds, kTopW, kHAll, kPartial, kLogitIdx, kSel, kSelNorm, kLogits,
    kLogitsAll, kBlocksDiag, kBlocksPrefix, kLse, kAttnOut2, kLse2, kSampled, kNumSlots
  };
  explicit Workspace(Backend& be) : be(be), bufs(kNumSlots) {}
  Tensor get(Slot s, DType t, std::initializer_list<int64_t> dims) {
    Tensor probe(nullptr, t, dims, be.device());
    size_t bytes = std::max<size_t>(probe.nbytes(), 16);
    if (bufs[s].bytes() < bytes) bufs[s] = Buffer(be, bytes + bytes / 4);
    return bufs[s].tensor(t, dims);
  }
  Tensor upload_i32(Slot s, const std::vector<int32_t>& v, std::initializer_list<int64_t> dims) {
    Tensor t = get(s, DType::I32, dims);
    if (!v.empty()) be.upload(t.data, v.data(), v.size() * sizeof(int32_t));
    return t;
  }
  // Fills the metadata of `blocks` (block table shared by the forward's batches) and uploads it.
  void set_batch(AttnBatch& b, std::vector<AttnBlock> blocks, const ForwardPlan& plan, const Tensor& table, Slot s) {
    b.blocks = std::move(blocks);
    b.block_table = plan.block_table;
    b.max_blocks_per_seq = plan.max_blocks;
    b.max_q_len = 0;
    b.max_kv_len = 0;
    for (const AttnBlock& a : b.blocks) {
      b.max_q_len = std::max(b.max_q_len, a.q_len);
      b.max_kv_len = std::max(b.max_kv_len, a.pos_begin + a.q_len);
    }
    b.dev_blocks = upload_i32(s, flatten_attn_blocks(b.blocks),
                              {std::max<int64_t>(int64_t(b.blocks.size()), 1), kAttnBlockFields});
    b.dev_block_table = table;
  }
  Backend& be;
  std::vector<Buffer> bufs;
  // Per-forward state shared by the layer functions.
  Tensor ids, pos, slots, x, h;
  AttnBatch batch;                   // every block over all its keys
  AttnBatch batch_diag, batch_prefix;  // overlapped exchange: own keys, then the other ranks'
};


Qwen3Model::Qwen3Model(const ModelConfig& cfg, ModelWeights weights, Backend& backend, ParallelCtx par,
                       const ModelOptions& opt)
    : cfg_(cfg), w_(std::move(weights)), be_(backend), par_(par), rope_(cfg.rope_params()), opt_(opt),
      ws_(std::make_unique<Workspace>(backend)) {
  CPI_CHECK(static_cast<int>(w_.layers.size()) == static_cast<int>(cfg_.num_hidden_layers),
            "weights hold ", w_.layers.size(), " layers, config.json says ", cfg_.num_hidden_layers);
  if (par_.cp && par_.world) {
    CPI_CHECK(par_.world->size() % par_.cp->size() == 0, "attn_cp_size ", par_.cp->size(),
              " does not divide the world size ", par_.world->size());
  }
  // Device communicators order their collectives on this back-end's stream: no host waits.
  if (void* stream = be_.native_stream()) {
    if (par_.world) par_.world->bind_stream(stream);
    if (par_.cp) par_.cp->bind_stream(stream);
  }
}

Qwen3Model::~Qwen3Model() = default;

KvCacheShape Qwen3Model::kv_shape(int n_blocks, int block_size) const {
  KvCacheShape s;
  s.n_layers = static_cast<int>(cfg_.num_hidden_layers);
  s.n_kv_heads = static_cast<int>(cfg_.num_key_value_heads);
  s.head_dim = static_cast<int>(cfg_.head_dim);
  s.block_size = block_size;
  s.n_blocks = n_blocks;
  s.dtype = be_.act_dtype();
  return s;
}

void Qwen3Model::mark(double& bucket) {
  if (!opt_.profiling) return;
  be_.sync();
  double t = now_s();
  bucket += t - mark_t_;
  mark_t_ = t;
}

Tensor Qwen3Model::forward_logits(const ForwardPlan& plan, KvCache& cache) {
  const int64_t T = plan.n_local();
  const int64_t H = cfg_.hidden_size;
  const int64_t V = cfg_.vocab_size;
  const int cp = par_.cp_size();
  CPI_CHECK(plan.cp_size == cp, "plan made for a CP group of ", plan.cp_size, ", this rank's group has ", cp);
  CPI_CHECK(plan.cp_rank == par_.cp_rank(), "plan made for CP rank ", plan.cp_rank);
  Workspace& ws = *ws_;
  const DType ad = be_.act_dtype();
  profile_ = {};
  if (opt_.profiling) {
    be_.sync();
    mark_t_ = now_s();
  }

  // Metadata goes to the device once per forward; every layer reuses it.
  ws.ids = ws.upload_i32(Workspace::kIds, plan.tokens, {std::max<int64_t>(T, 1)}).slice(0, T);
  ws.pos = ws.upload_i32(Workspace::kPos, plan.positions, {std::max<int64_t>(T, 1)}).slice(0, T);
  ws.slots = ws.upload_i32(Workspace::kSlots, plan.slots_all, {std::max<int64_t>(plan.n_all(), 1)}).slice(0, plan.n_all());
  int64_t n_seq_rows = plan.max_blocks ? int64_t(plan.block_table.size()) / plan.max_blocks : 0;
  Tensor table = ws.upload_i32(Workspace::kBlockTable, plan.block_table,
                               {std::max<int64_t>(n_seq_rows, 1), std::max(plan.max_blocks, 1)});
  ws.set_batch(ws.batch, plan.attn, plan, table, Workspace::kBlocks);
  if (cp > 1 && overlap_kv()) {
    std::vector<AttnBlock> diag = plan.attn, prefix = plan.attn;
    for (AttnBlock& a : diag) a.kv_begin = a.pos_begin;
    for (AttnBlock& a : prefix) a.kv_end = a.pos_begin;  // empty for a block at position 0: out 0, lse -inf
    ws.set_batch(ws.batch_diag, std::move(diag), plan, table, Workspace::kBlocksDiag);
    ws.set_batch(ws.batch_prefix, std::move(prefix), plan, table, Workspace::kBlocksPrefix);
  }

  ws.x = ws.get(Workspace::kX, ad, {std::max<int64_t>(T, 1), H}).slice(0, T);
  ws.h = ws.get(Workspace::kH, ad, {std::max<int64_t>(T, 1), H}).slice(0, T);
  const float eps = static_cast<float>(cfg_.rms_norm_eps);
  if (T > 0) {
    be_.embedding(w_.embed, ws.ids, ws.x);
    be_.rms_norm(ws.x, w_.layers[0].input_norm, eps, ws.h);
  }
  mark(profile_.other_s);

  const int n_layers = static_cast<int>(cfg_.num_hidden_layers);
  for (int l = 0; l < n_layers; ++l) {
    attention_layer(l, plan, cache);
    mlp_layer(l, plan);
    Tensor m = ws.get(Workspace::kM, ad, {std::max<int64_t>(T, 1), H}).slice(0, T);
    if (T > 0) {
      if (l + 1 < n_layers) {
        be_.add_rms_norm(ws.x, m, w_.layers[l + 1].input_norm, eps, ws.h);
      } else {
        be_.add(ws.x, m);
      }
    }
    mark(profile_.other_s);
  }

  // Logits only for the rows that need them; each rank computes its own rows, then they are
  // gathered over the CP group (the last token of a zigzag-split prompt lives on CP rank 0).
  const int64_t R = static_cast<int64_t>(plan.logit_rows_local.size());
  const int64_t R_all = static_cast<int64_t>(plan.logit_rows_all.size());
  Tensor logits = ws.get(Workspace::kLogits, DType::F32, {std::max<int64_t>(R, 1), V}).slice(0, R);
  if (R > 0) {
    Tensor idx = ws.upload_i32(Workspace::kLogitIdx, plan.logit_rows_local, {R});
    Tensor sel = ws.get(Workspace::kSel, ad, {R, H});
    Tensor sel_norm = ws.get(Workspace::kSelNorm, ad, {R, H});
    be_.gather_rows(ws.x, idx, sel);
    be_.rms_norm(sel, w_.final_norm, eps, sel_norm);
    be_.linear(sel_norm, w_.lm_head, logits);
  }
  mark(profile_.dense_gemm_s);
  if (cp == 1) return logits;
  Tensor all = ws.get(Workspace::kLogitsAll, DType::F32, {std::max<int64_t>(R_all, 1), V}).slice(0, R_all);
  std::vector<size_t> bytes(cp);
  for (int r = 0; r < cp; ++r) bytes[r] = size_t(plan.logit_rows_per_rank[r] * V) * sizeof(float);
  sync_for(par_.cp);
  if (!opt_.elide_comm) par_.cp->all_gatherv(logits.data, bytes[par_.cp_rank()], all.data, bytes);
  return all;
}

// The host waits here, after the last collective was queued. Queued collectives report their
// failures now (a timeout aborted them and the streams ran on).
void Qwen3Model::finish_forward() {
  be_.sync();
  if (par_.world) par_.world->wait_all();
  if (par_.cp && par_.cp != par_.world) par_.cp->wait_all();
  mark(profile_.comm_s);
}

std::vector<float> Qwen3Model::forward(const ForwardPlan& plan, KvCache& cache) {
  Tensor logits = forward_logits(plan, cache);
  std::vector<float> out(static_cast<size_t>(logits.numel()));
  if (!out.empty()) be_.download(out.data(), logits.data, out.size() * sizeof(float));
  finish_forward();
  return out;
}

std::vector<int32_t> Qwen3Model::forward_sample(const ForwardPlan& plan, KvCache& cache,
                                                const std::vector<SampleRow>& rows) {
  CPI_CHECK(rows.size() == plan.logit_rows_all.size(), "forward_sample: ", rows.size(), " sampling rows for ",
            plan.logit_rows_all.size(), " logit rows");
  Tensor logits = forward_logits(plan, cache);
  std::vector<int32_t> out(rows.size());
  if (!rows.empty()) {
    Tensor ids = ws_->get(Workspace::kSampled, DType::I32, {int64_t(rows.size())});
    be_.sample(logits, rows, ids);
    be_.download(out.data(), ids.data, out.size() * sizeof(int32_t));
  }
  finish_forward();
  return out;
}

bool Qwen3Model::overlap_kv() const {
  if (par_.cp_size() == 1) return false;
  if (opt_.kv_overlap == KvOverlap::Auto) return par_.cp->queued();
  return opt_.kv_overlap == KvOverlap::On;
}

void Qwen3Model::sync_for(Communicator* comm) {
  if (!comm->queued()) be_.sync();
}

void Qwen3Model::attention_layer(int l, const ForwardPlan& plan, KvCache& cache) {
  Workspace& ws = *ws_;
  const LayerWeights& L = w_.layers[l];
  const int64_t T = plan.n_local();
  const int64_t H = cfg_.hidden_size, Hq = cfg_.num_attention_heads, Hkv = cfg_.num_key_value_heads,
                D = cfg_.head_dim;
  const DType ad = be_.act_dtype();
  const int cp = par_.cp_size();
  const KvLayer kv = cache.layer(l);

  // K and V of the local rows sit back to back in one buffer ([K rows; V rows]) so that a single
  // collective exchanges both.
  Tensor kv_local = ws.get(Workspace::kKvLocal, ad, {std::max<int64_t>(2 * T, 1), Hkv * D}).slice(0, 2 * T);
  Tensor k = kv_local.slice(0, T), v = kv_local.slice(T, T);
  Tensor q = ws.get(Workspace::kQ, ad, {std::max<int64_t>(T, 1), Hq * D}).slice(0, T);
  if (T > 0) {
    be_.linear(ws.h, L.q_proj, q);
    be_.linear(ws.h, L.k_proj, k);
    be_.linear(ws.h, L.v_proj, v);
    mark(profile_.dense_gemm_s);
    be_.qk_norm_rope(q.view({T, Hq, D}), k.view({T, Hkv, D}), L.q_norm, L.k_norm,
                     static_cast<float>(cfg_.rms_norm_eps), ws.pos, rope_);
    mark(profile_.other_s);
  }

  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Tensor attn_out = ws.get(Workspace::kAttnOut, ad, {std::max<int64_t>(T, 1), Hq * D}).slice(0, T);
  if (cp == 1) {
    if (T > 0) be_.kv_store(k.view({T, Hkv, D}), v.view({T, Hkv, D}), ws.slots, kv);
    mark(profile_.other_s);
    if (T > 0) be_.attention(q.view({T, Hq, D}), ws.batch, kv, scale, attn_out.view({T, Hq, D}), Tensor{});
  } else {
    // Every rank receives every rank's [K; V] and writes all of them into its own cache.
    const bool overlap = overlap_kv();
    const int me = par_.cp_rank();
    int64_t my_slot_row = 0;
    for (int r = 0; r < me; ++r) my_slot_row += plan.rows_per_rank[r];
    const int64_t n_all = plan.n_all();
    Tensor kv_all = ws.get(Workspace::kKvAll, ad, {std::max<int64_t>(2 * n_all, 1), Hkv * D});
    const size_t row_bytes = kv_all.row_bytes();
    std::vector<size_t> bytes(cp);
    for (int r = 0; r < cp; ++r) bytes[r] = size_t(2 * plan.rows_per_rank[r]) * row_bytes;
    Tensor lse = ws.get(Workspace::kLse, DType::F32, {std::max<int64_t>(T, 1), Hq}).slice(0, T);
    if (overlap) {
      // Own keys first (straight from the projections), then the exchange runs on the
      // communicator's stream while the diagonal blocks attend to them.
      if (T > 0) be_.kv_store(k.view({T, Hkv, D}), v.view({T, Hkv, D}), ws.slots.slice(my_slot_row, T), kv);
      sync_for(par_.cp);
      mark(profile_.other_s);
      Communicator::Ticket t = 0;
      if (!opt_.elide_comm) t = par_.cp->all_gatherv_start(kv_local.data, bytes[me], kv_all.data, bytes);
      if (T > 0) be_.attention(q.view({T, Hq, D}), ws.batch_diag, kv, scale, attn_out.view({T, Hq, D}), lse);
      par_.cp->join(t);
      mark(profile_.attention_s);
    } else {
      sync_for(par_.cp);
      mark(profile_.other_s);
      if (!opt_.elide_comm) par_.cp->all_gatherv(kv_local.data, bytes[me], kv_all.data, bytes);
      mark(profile_.comm_s);
    }
    int64_t row = 0, slot_row = 0;
    for (int r = 0; r < cp; ++r) {
      const int64_t n = plan.rows_per_rank[r];
      if (n > 0 && !(overlap && r == me)) {
        Tensor seg = kv_all.slice(row, 2 * n);
        be_.kv_store(seg.slice(0, n).view({n, Hkv, D}), seg.slice(n, n).view({n, Hkv, D}),
                     ws.slots.slice(slot_row, n), kv);
      }
      row += 2 * n;
      slot_row += n;
    }
    mark(profile_.other_s);
    if (T > 0 && overlap) {
      Tensor out2 = ws.get(Workspace::kAttnOut2, ad, {T, Hq * D});
      Tensor lse2 = ws.get(Workspace::kLse2, DType::F32, {T, Hq});
      be_.attention(q.view({T, Hq, D}), ws.batch_prefix, kv, scale, out2.view({T, Hq, D}), lse2);
      be_.attention_merge(attn_out.view({T, Hq, D}), lse, out2.view({T, Hq, D}), lse2);
    } else if (T > 0) {
      be_.attention(q.view({T, Hq, D}), ws.batch, kv, scale, attn_out.view({T, Hq, D}), Tensor{});
    }
  }
  if (T > 0) {
    mark(profile_.attention_s);
    Tensor o = ws.get(Workspace::kO, ad, {T, H});
    be_.linear(attn_out, L.o_proj, o);
    mark(profile_.dense_gemm_s);
    be_.add_rms_norm(ws.x, o, L.post_attn_norm, static_cast<float>(cfg_.rms_norm_eps), ws.h);
    mark(profile_.other_s);
  }
}

void Qwen3Model::mlp_layer(int l, const ForwardPlan& plan) {
  Workspace& ws = *ws_;
  const LayerWeights& L = w_.layers[l];
  const int64_t T = plan.n_local();
  const int64_t H = cfg_.hidden_size;
  const DType ad = be_.act_dtype();
  Tensor m = ws.get(Workspace::kM, ad, {std::max<int64_t>(T, 1), H}).slice(0, T);
  if (L.moe) {
    moe(l, plan, ws.h, m);
    return;
  }
  if (T == 0) return;
  const int64_t I = L.mlp_gate.dim(0);
  Tensor g = ws.get(Workspace::kGate, ad, {T, I});
  Tensor u = ws.get(Workspace::kUp, ad, {T, I});
  be_.linear(ws.h, L.mlp_gate, g);
  be_.linear(ws.h, L.mlp_up, u);
  be_.silu_mul(g, u, g);
  be_.linear(g, L.mlp_down, m);
  mark(profile_.dense_gemm_s);
}

void Qwen3Model::experts(const LayerWeights& L, const Tensor& rows, Tensor out) {
  const int64_t n = rows.rows(), E = cfg_.num_experts, K = cfg_.num_experts_per_tok;
  if (n == 0) return;
  Tensor logits = ws_->get(Workspace::kRouterLogits, DType::F32, {n, E});
  Tensor ids = ws_->get(Workspace::kTopIds, DType::I32, {n, K});
  Tensor wts = ws_->get(Workspace::kTopW, DType::F32, {n, K});
  be_.linear(rows, L.router, logits);
  be_.moe_route(logits, static_cast<int>(K), cfg_.norm_topk_prob, ids, wts);
  be_.fill_zero(out);
  be_.moe_experts(rows, ids, wts, L.experts, out);
}

void Qwen3Model::moe(int l, const ForwardPlan& plan, const Tensor& h, Tensor out) {
  Workspace& ws = *ws_;
  const LayerWeights& L = w_.layers[l];
  const int64_t H = cfg_.hidden_size;
  const DType ad = be_.act_dtype();
  const int world = par_.world_size(), cp = par_.cp_size();
  const int64_t T = plan.n_local();

  // Sharded experts: each rank applies its experts to the tokens of the whole CP group, then the
  // partial sums are reduced back to the ranks that own the rows. Replicated experts: every rank
  // handles its own rows alone.
  const bool sharded = world > 1 && !par_.replicate_experts;
  if (sharded && cp == world && cp > 1) {
    const int k = moe_chunks(plan);
    if (k > 1) return moe_pipelined(l, plan, h, out, k);
  }
  Tensor rows = h;
  int64_t n_rows = T;
  if (sharded && cp > 1) {
    n_rows = plan.n_all();
    Tensor h_all = ws.get(Workspace::kHAll, ad, {std::max<int64_t>(n_rows, 1), H}).slice(0, n_rows);
    std::vector<size_t> bytes(cp);
    for (int r = 0; r < cp; ++r) bytes[r] = size_t(plan.rows_per_rank[r]) * h.row_bytes();
    sync_for(par_.cp);
    mark(profile_.other_s);
    if (!opt_.elide_comm) par_.cp->all_gatherv(h.data, bytes[par_.cp_rank()], h_all.data, bytes);
    mark(profile_.comm_s);
    rows = h_all;
  }
  Tensor partial = sharded ? ws.get(Workspace::kPartial, ad, {std::max<int64_t>(n_rows, 1), H}).slice(0, n_rows)
                           : out;
  experts(L, rows, partial);
  mark(profile_.moe_s);
  if (!sharded) return;

  sync_for(par_.world);
  int64_t offset = 0;
  if (cp > 1) {
    for (int r = 0; r < par_.cp_rank(); ++r) offset += plan.rows_per_rank[r];
  }
  if (opt_.elide_comm) {
    if (T > 0) be_.copy(out.data, partial.slice(offset, T).data, out.nbytes());
  } else if (cp == world) {
    std::vector<size_t> counts(cp);
    for (int r = 0; r < cp; ++r) counts[r] = size_t(plan.rows_per_rank[r] * H);
    par_.world->reduce_scatterv_sum(partial.data, out.data, counts, ad);
  } else {
    // Several CP groups: every group holds the same rows, so a world-wide sum is complete.
    par_.world->all_reduce_sum(partial.data, size_t(n_rows * H), ad);
    if (T > 0) be_.copy(out.data, partial.slice(offset, T).data, out.nbytes());
  }
  mark(profile_.comm_s);
}

int Qwen3Model::moe_chunks(const ForwardPlan&) const {
  // Off unless asked for: on 2 x H200 (Qwen3-30B-A3B shape, wgmma grouped GEMMs) 1, 2, 3, 4 and 6
  // chunks gave the same TTFT within 2% at 32K and 128K (docs/benchmarks.md): the expert GEMMs keep
  // every SM busy, so the NCCL kernels gain little by running beside them.
  return opt_.moe_chunks > 0 ? opt_.moe_chunks : 1;
}

// Sharded experts with the CP group's rows in k chunks (every rank splits its rows the same way):
// chunk c+1 is gathered while the experts run on chunk c, and chunk c's partial sums are
// reduce-scattered while the experts run on chunk c+1, so only the first gather and the last
// reduce stay on the critical path. h_all and the partial sums are laid out chunk-major (chunk c:
// rank 0's part, rank 1's part, ...), so each collective moves one contiguous region.
void Qwen3Model::moe_pipelined(int l, const ForwardPlan& plan, const Tensor& h, Tensor out, int k) {
  Workspace& ws = *ws_;
  const LayerWeights& L = w_.layers[l];
  const int64_t H = cfg_.hidden_size;
  const DType ad = be_.act_dtype();
  const int cp = par_.cp_size(), me = par_.cp_rank();
  Communicator& comm = *par_.cp;
  const int64_t n_all = plan.n_all();
  // part[c][r]: rows of rank r in chunk c; first[c][r]: its first local row.
  std::vector<std::vector<int64_t>> part(k, std::vector<int64_t>(cp)), first(k, std::vector<int64_t>(cp));
  std::vector<int64_t> region(k + 1, 0);
  for (int r = 0; r < cp; ++r) {
    int64_t begin = 0;
    for (int c = 0; c < k; ++c) {
      part[c][r] = plan.rows_per_rank[r] / k + (c < plan.rows_per_rank[r] % k ? 1 : 0);
      first[c][r] = begin;
      begin += part[c][r];
    }
  }
  for (int c = 0; c < k; ++c) {
    region[c + 1] = region[c];
    for (int r = 0; r < cp; ++r) region[c + 1] += part[c][r];
  }
  Tensor h_all = ws.get(Workspace::kHAll, ad, {std::max<int64_t>(n_all, 1), H});
  Tensor partial = ws.get(Workspace::kPartial, ad, {std::max<int64_t>(n_all, 1), H});
  auto gather = [&](int c) -> Communicator::Ticket {
    std::vector<size_t> bytes(cp);
    for (int r = 0; r < cp; ++r) bytes[r] = size_t(part[c][r]) * h.row_bytes();
    if (opt_.elide_comm) return 0;
    return comm.all_gatherv_start(h.slice(first[c][me], part[c][me]).data, bytes[me],
                                  h_all.slice(region[c], region[c + 1] - region[c]).data, bytes);
  };
  sync_for(par_.cp);
  mark(profile_.other_s);
  std::vector<Communicator::Ticket> reduced(k, 0);
  Communicator::Ticket next = gather(0);
  for (int c = 0; c < k; ++c) {
    const Communicator::Ticket current = next;
    if (c + 1 < k) next = gather(c + 1);
    comm.join(current);
    const int64_t n = region[c + 1] - region[c];
    experts(L, h_all.slice(region[c], n), partial.slice(region[c], n));
    sync_for(par_.cp);
    std::vector<size_t> counts(cp);
    for (int r = 0; r < cp; ++r) counts[r] = size_t(part[c][r] * H);
    Tensor mine = out.slice(first[c][me], part[c][me]);
    if (opt_.elide_comm) {
      int64_t off = region[c];
      for (int r = 0; r < me; ++r) off += part[c][r];
      if (part[c][me] > 0) be_.copy(mine.data, partial.slice(off, part[c][me]).data, mine.nbytes());
    } else {
      reduced[c] = comm.reduce_scatterv_sum_start(partial.slice(region[c], n).data, mine.data, counts, ad);
    }
  }
  for (Communicator::Ticket t : reduced) comm.join(t);
  mark(profile_.moe_s);
}

}  // namespace cpinfer
