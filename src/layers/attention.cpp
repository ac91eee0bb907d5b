#include "layers/attention.h"

#include <cmath>

#include "parallel/exchange.h"
#include "parallel/merge.h"

namespace cpinfer {

Attention::Attention(const AttentionShape& shape, RopeParams rope, Backend& be, const ParallelCtx& par,
                     const ModelOptions& opt, Profiler& prof)
    : shape_(shape), rope_(std::move(rope)), be_(be), par_(par), opt_(opt), prof_(prof), scratch_(be, kNumSlots) {}

void Attention::set_batch(AttnBatch& b, std::vector<AttnBlock> blocks, const Tensor& table, Slot slot,
                          const Tensor* dev_blocks) {
  b.blocks = std::move(blocks);
  b.block_table = plan_->block_table;
  b.max_blocks_per_seq = plan_->max_blocks;
  b.max_q_len = 0;
  b.max_kv_len = 0;
  for (const AttnBlock& a : b.blocks) {
    b.max_q_len = std::max(b.max_q_len, a.q_len);
    b.max_kv_len = std::max(b.max_kv_len, a.pos_begin + a.q_len);
  }
  b.key_bound = 0;
  b.dev_blocks = dev_blocks ? *dev_blocks
                            : scratch_.upload_i32(slot, flatten_attn_blocks(b.blocks),
                                                  {std::max<int64_t>(int64_t(b.blocks.size()), 1), kAttnBlockFields});
  b.dev_block_table = table;
}

void Attention::plan(const ForwardPlan& plan, const AttnInputs* dev) {
  plan_ = &plan;
  const int64_t T = plan.n_local();
  const int cp = par_.cp_size();
  CPI_CHECK(plan.cp_size == cp, "plan made for a CP group of ", plan.cp_size, ", this rank's group has ", cp);
  CPI_CHECK(plan.cp_rank == par_.cp_rank(), "plan made for CP rank ", plan.cp_rank);
  if (cp == 1) {
    strategy_ = Strategy::OneRank;
  } else if (plan.kv_shard) {
    strategy_ = Strategy::CpShardedKv;
  } else {
    const bool overlap = opt_.kv_overlap == KvOverlap::Auto ? par_.cp->queued() : opt_.kv_overlap == KvOverlap::On;
    strategy_ = overlap ? Strategy::CpReplicatedKvOverlap : Strategy::CpReplicatedKv;
  }
  if (dev) {
    CPI_CHECK(strategy_ == Strategy::OneRank, "Attention::plan: device-side inputs serve one rank only");
    pos_ = dev->positions;
    slots_ = dev->slots;
    set_batch(batch_, plan.attn, dev->block_table, kBlocks, &dev->blocks);
    batch_.key_bound = dev->key_bound;
    return;
  }
  pos_ = scratch_.upload_i32(kPos, plan.positions, {std::max<int64_t>(T, 1)}).slice(0, T);
  slots_ = scratch_.upload_i32(kSlots, plan.slots_all, {std::max<int64_t>(plan.n_all(), 1)}).slice(0, plan.n_all());
  const int64_t n_seq_rows = plan.max_blocks ? int64_t(plan.block_table.size()) / plan.max_blocks : 0;
  Tensor table = scratch_.upload_i32(kBlockTable, plan.block_table,
                                     {std::max<int64_t>(n_seq_rows, 1), std::max(plan.max_blocks, 1)});
  set_batch(batch_, plan.attn, table, kBlocks);
  if (strategy_ == Strategy::CpShardedKv) {
    if (!sharded_)
      sharded_ = std::make_unique<ShardedAttention>(be_, par_, shape_.n_heads, shape_.n_kv_heads, shape_.head_dim);
    sharded_->plan(plan);
  }
  if (strategy_ == Strategy::CpReplicatedKvOverlap) {
    std::vector<AttnBlock> diag, prefix;
    split_diag_prefix(plan.attn, diag, prefix);
    set_batch(batch_diag_, std::move(diag), table, kBlocksDiag);
    set_batch(batch_prefix_, std::move(prefix), table, kBlocksPrefix);
  }
}

Tensor Attention::run(const AttentionWeights& w, const KvLayer& kv, const Tensor& h) {
  CPI_CHECK(plan_ != nullptr, "Attention::run before Attention::plan");
  const int64_t T = plan_->n_local();
  const int64_t H = shape_.hidden, Hq = shape_.n_heads, Hkv = shape_.n_kv_heads, D = shape_.head_dim;
  const DType ad = be_.act_dtype();

  // K and V of the local rows sit back to back in one buffer ([K rows; V rows]) so that a single
  // collective exchanges both.
  Tensor kv_local = scratch_.rows(kKvLocal, ad, 2 * T, Hkv * D);
  Tensor k = kv_local.slice(0, T), v = kv_local.slice(T, T);
  Tensor q = scratch_.rows(kQ, ad, T, Hq * D);
  if (T > 0) {
    const Backend::LinearOut qkv[] = {{&w.q_proj->weight, q}, {&w.k_proj->weight, k}, {&w.v_proj->weight, v}};
    be_.linears(h, qkv);
    prof_.mark(&ForwardProfile::dense_gemm_s);
    const Tensor qn = shape_.qk_norm ? w.q_norm : Tensor{}, kn = shape_.qk_norm ? w.k_norm : Tensor{};
    // One rank stores its K/V right away (one op with the norm and RoPE); CP strategies exchange
    // them first.
    if (strategy_ == Strategy::OneRank)
      be_.qk_norm_rope_store(q.view({T, Hq, D}), k.view({T, Hkv, D}), v.view({T, Hkv, D}), qn, kn, shape_.eps, pos_,
                             rope_, slots_, kv);
    else
      be_.qk_norm_rope(q.view({T, Hq, D}), k.view({T, Hkv, D}), qn, kn, shape_.eps, pos_, rope_);
    prof_.mark(&ForwardProfile::other_s);
  }

  Tensor out = scratch_.rows(kOut, ad, T, Hq * D);
  if (strategy_ == Strategy::OneRank) {
    if (T > 0) {
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      be_.attention(q.view({T, Hq, D}), batch_, kv, scale, out.view({T, Hq, D}), Tensor{});
    }
  } else if (strategy_ == Strategy::CpShardedKv) {
    sharded_->run(kv, q, kv_local, slots_.slice(first_row_of(plan_->rows_per_rank, par_.cp_rank()), T), out);
  } else {
    gathered(kv, q, kv_local, out, strategy_ == Strategy::CpReplicatedKvOverlap);
  }
  if (T == 0) return scratch_.rows(kO, ad, 0, H);
  prof_.mark(&ForwardProfile::attention_s);
  Tensor o = scratch_.get(kO, ad, {T, H});
  w.o_proj->partial(be_, out, o);
  prof_.mark(&ForwardProfile::dense_gemm_s);
  if (par_.attn_tp_size() > 1 && !opt_.elide_comm) {
    RowParallelLinear::reduce(be_, o, par_.attn_tp);
    prof_.mark(&ForwardProfile::comm_s);
  }
  return o;
}

// Every rank receives every rank's [K; V] and writes all of them into its own cache.
void Attention::gathered(const KvLayer& kv, const Tensor& q, const Tensor& kv_local, Tensor out, bool overlap) {
  const ForwardPlan& plan = *plan_;
  const int64_t T = plan.n_local();
  const int64_t Hq = shape_.n_heads, Hkv = shape_.n_kv_heads, D = shape_.head_dim;
  const DType ad = be_.act_dtype();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  Communicator& comm = *par_.cp;
  const int me = par_.cp_rank();
  const int64_t n_all = plan.n_all();
  Tensor kv_all = scratch_.get(kKvAll, ad, {std::max<int64_t>(2 * n_all, 1), Hkv * D});
  Tensor lse = scratch_.rows(kLse, DType::F32, T, Hq);
  if (overlap) {
    // Own keys first (straight from the projections), then the exchange runs on the
    // communicator's stream while the diagonal blocks attend to them.
    if (T > 0)
      be_.kv_store(kv_local.slice(0, T).view({T, Hkv, D}), kv_local.slice(T, T).view({T, Hkv, D}),
                   slots_.slice(first_row_of(plan.rows_per_rank, me), T), kv);
    sync_for(be_, comm);
    prof_.mark(&ForwardProfile::other_s);
    Communicator::Ticket t = 0;
    if (!opt_.elide_comm) t = gather_rows_start(comm, kv_local, kv_all, plan.rows_per_rank, 2);
    if (T > 0) be_.attention(q.view({T, Hq, D}), batch_diag_, kv, scale, out.view({T, Hq, D}), lse);
    comm.join(t);
    prof_.mark(&ForwardProfile::attention_s);
  } else {
    sync_for(be_, comm);
    prof_.mark(&ForwardProfile::other_s);
    if (!opt_.elide_comm) gather_rows(comm, kv_local, kv_all, plan.rows_per_rank, 2);
    prof_.mark(&ForwardProfile::comm_s);
  }
  store_gathered_kv(be_, kv_all, plan.rows_per_rank, slots_, kv, Hkv, D, overlap ? me : -1);
  prof_.mark(&ForwardProfile::other_s);
  if (T > 0 && overlap) {
    Tensor out2 = scratch_.get(kOut2, ad, {T, Hq * D});
    Tensor lse2 = scratch_.get(kLse2, DType::F32, {T, Hq});
    be_.attention(q.view({T, Hq, D}), batch_prefix_, kv, scale, out2.view({T, Hq, D}), lse2);
    lse_merge(be_, out.view({T, Hq, D}), lse, out2.view({T, Hq, D}), lse2);
  } else if (T > 0) {
    be_.attention(q.view({T, Hq, D}), batch_, kv, scale, out.view({T, Hq, D}), Tensor{});
  }
}

}  // namespace cpinfer
