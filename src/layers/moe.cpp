#include "layers/moe.h"

#include "parallel/exchange.h"

namespace cpinfer {

MoE::MoE(const MoeShape& shape, Backend& be, const ParallelCtx& par, const ModelOptions& opt, Profiler& prof)
    : shape_(shape), be_(be), par_(par), opt_(opt), prof_(prof), scratch_(be, kNumSlots) {}

void MoE::experts(const MoeWeights& w, const Tensor& rows, Tensor out) {
  const int64_t n = rows.rows(), E = shape_.n_experts, K = shape_.top_k;
  if (n == 0) return;
  Tensor logits = scratch_.get(kRouterLogits, DType::F32, {n, E});
  Tensor ids = scratch_.get(kTopIds, DType::I32, {n, K});
  Tensor wts = scratch_.get(kTopW, DType::F32, {n, K});
  be_.moe_gate(rows, *w.router, static_cast<int>(K), shape_.norm_topk_prob, logits, ids, wts);
  be_.moe_experts(rows, ids, wts, *w.experts, out);
}

void MoE::run_between_norms(const MoeWeights& w, Tensor residual, const Tensor& x, const Tensor& norm_w,
                            const Tensor* next_norm_w, float eps, Tensor h, Tensor out) {
  CPI_CHECK(runs_between_norms(), "MoE::run_between_norms with experts sharded over ", par_.world_size(), " ranks");
  const int64_t n = h.rows(), E = shape_.n_experts, K = shape_.top_k;
  if (n == 0) return;
  Tensor logits = scratch_.get(kRouterLogits, DType::F32, {n, E});
  Tensor ids = scratch_.get(kTopIds, DType::I32, {n, K});
  Tensor wts = scratch_.get(kTopW, DType::F32, {n, K});
  be_.add_rms_norm_moe_gate(residual, x, norm_w, eps, h, *w.router, static_cast<int>(K), shape_.norm_topk_prob, logits,
                            ids, wts);
  if (next_norm_w) {
    be_.moe_experts_add_rms_norm(h, ids, wts, *w.experts, out, residual, *next_norm_w, eps, h);
  } else {
    be_.moe_experts(h, ids, wts, *w.experts, out);
    be_.add(residual, out);
  }
  prof_.mark(&ForwardProfile::moe_s);
}

int MoE::chunks() const {
  // Off unless asked for: on 2 x H200 (Qwen3-30B-A3B shape, wgmma grouped GEMMs) 1, 2, 3, 4 and 6
  // chunks gave the same TTFT within 2% at 32K and 128K (docs/benchmarks.md): the expert GEMMs keep
  // every SM busy, so the NCCL kernels gain little by running beside them.
  return opt_.moe_chunks > 0 ? opt_.moe_chunks : 1;
}

void MoE::run(const MoeWeights& w, const ForwardPlan& plan, const Tensor& h, Tensor out) {
  const int64_t H = shape_.hidden;
  const DType ad = be_.act_dtype();
  const int world = par_.world_size(), cp = par_.cp_size();
  const int64_t T = plan.n_local();

  const bool sharded = world > 1 && !par_.replicate_experts;
  if (sharded && cp == world && cp > 1) {
    const int k = chunks();
    if (k > 1) return pipelined(w, plan, h, out, k);
  }
  Tensor rows = h;
  int64_t n_rows = T;
  if (sharded && cp > 1) {
    n_rows = plan.n_all();
    Tensor h_all = scratch_.rows(kHAll, ad, n_rows, H);
    sync_for(be_, *par_.cp);
    prof_.mark(&ForwardProfile::other_s);
    if (!opt_.elide_comm) gather_rows(*par_.cp, h, h_all, plan.rows_per_rank);
    prof_.mark(&ForwardProfile::comm_s);
    rows = h_all;
  }
  Tensor partial = sharded ? scratch_.rows(kPartial, ad, n_rows, H) : out;
  experts(w, rows, partial);
  prof_.mark(&ForwardProfile::moe_s);
  if (!sharded) return;

  sync_for(be_, *par_.world);
  const int64_t offset = cp > 1 ? first_row_of(plan.rows_per_rank, par_.cp_rank()) : 0;
  if (opt_.elide_comm) {
    if (T > 0) be_.copy(out.data, partial.slice(offset, T).data, out.nbytes());
  } else if (cp == world) {
    reduce_rows(*par_.world, partial, out, plan.rows_per_rank);
  } else {
    // Several CP groups: every group holds the same rows, so a world-wide sum is complete.
    par_.world->all_reduce_sum(partial.data, size_t(n_rows * H), ad);
    if (T > 0) be_.copy(out.data, partial.slice(offset, T).data, out.nbytes());
  }
  prof_.mark(&ForwardProfile::comm_s);
}

// Sharded experts with the CP group's rows in k chunks (every rank splits its rows the same way):
// chunk c+1 is gathered while the experts run on chunk c, and chunk c's partial sums are
// reduce-scattered while the experts run on chunk c+1, so only the first gather and the last
// reduce stay on the critical path. h_all and the partial sums are laid out chunk-major (chunk c:
// rank 0's part, rank 1's part, ...), so each collective moves one contiguous region.
void MoE::pipelined(const MoeWeights& w, const ForwardPlan& plan, const Tensor& h, Tensor out, int k) {
  const int64_t H = shape_.hidden;
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
  Tensor h_all = scratch_.get(kHAll, ad, {std::max<int64_t>(n_all, 1), H});
  Tensor partial = scratch_.get(kPartial, ad, {std::max<int64_t>(n_all, 1), H});
  auto gather = [&](int c) -> Communicator::Ticket {
    if (opt_.elide_comm) return 0;
    return gather_rows_start(comm, h.slice(first[c][me], part[c][me]),
                             h_all.slice(region[c], region[c + 1] - region[c]), part[c]);
  };
  sync_for(be_, comm);
  prof_.mark(&ForwardProfile::other_s);
  std::vector<Communicator::Ticket> reduced(k, 0);
  Communicator::Ticket next = gather(0);
  for (int c = 0; c < k; ++c) {
    const Communicator::Ticket current = next;
    if (c + 1 < k) next = gather(c + 1);
    comm.join(current);
    const int64_t n = region[c + 1] - region[c];
    experts(w, h_all.slice(region[c], n), partial.slice(region[c], n));
    sync_for(be_, comm);
    std::vector<size_t> counts(cp);
    for (int r = 0; r < cp; ++r) counts[r] = size_t(part[c][r] * H);
    Tensor mine = out.slice(first[c][me], part[c][me]);
    if (opt_.elide_comm) {
      const int64_t off = region[c] + first_row_of(part[c], me);
      if (part[c][me] > 0) be_.copy(mine.data, partial.slice(off, part[c][me]).data, mine.nbytes());
    } else {
      reduced[c] = comm.reduce_scatterv_sum_start(partial.slice(region[c], n).data, mine.data, counts, ad);
    }
  }
  for (Communicator::Ticket t : reduced) comm.join(t);
  prof_.mark(&ForwardProfile::moe_s);
}

void Mlp::run(const MlpWeights& w, const Tensor& h, Tensor out, Communicator* group) {
  const int64_t T = h.rows();
  if (T == 0) return;
  const int64_t I = w.gate->weight.dim(0);
  const DType ad = be_.act_dtype();
  Tensor g = scratch_.get(kGate, ad, {T, I});
  Tensor u = scratch_.get(kUp, ad, {T, I});
  w.gate->forward(be_, h, g);
  w.up->forward(be_, h, u);
  be_.silu_mul(g, u, g);
  w.down->partial(be_, g, out);
  prof_.mark(&ForwardProfile::dense_gemm_s);
  if (group != nullptr && group->size() > 1) {
    RowParallelLinear::reduce(be_, out, group);
    prof_.mark(&ForwardProfile::comm_s);
  }
}

}  // namespace cpinfer
