#include "layers/sharded_attention.h"

#include <algorithm>
#include <cmath>

#include "parallel/exchange.h"
#include "parallel/merge.h"

namespace cpinfer {

ShardedAttention::ShardedAttention(Backend& be, const ParallelCtx& par, int64_t n_heads, int64_t n_kv_heads,
                                   int64_t head_dim)
    : be_(be), par_(par), Hq_(n_heads), Hkv_(n_kv_heads), D_(head_dim) {}

AttnBatch ShardedAttention::make_batch(std::vector<AttnBlock> blocks, const std::vector<int32_t>& table,
                                       int32_t max_pages, const Tensor& dev_table, int slot) {
  AttnBatch b;
  b.blocks = std::move(blocks);
  b.block_table = table;
  b.max_blocks_per_seq = max_pages;
  for (const AttnBlock& a : b.blocks) {
    b.max_q_len = std::max(b.max_q_len, a.q_len);
    b.max_kv_len = std::max(b.max_kv_len, std::min(a.kv_end, a.pos_begin + a.q_len));
  }
  b.dev_blocks = scratch_->upload_i32(slot, flatten_attn_blocks(b.blocks),
                                      {std::max<int64_t>(int64_t(b.blocks.size()), 1), kAttnBlockFields});
  b.dev_block_table = dev_table;
  return b;
}

void ShardedAttention::plan(const ForwardPlan& plan) {
  plan_ = &plan;
  const int C = plan.cp_size, me = plan.cp_rank;
  const int64_t n_seqs = plan.max_blocks ? int64_t(plan.block_table.size()) / plan.max_blocks : 0;
  const int bs = plan.page_size;
  n_steps_ = plan.ring ? C : 1;

  // Ring pages: each source's rows sit in the scratch cache at their global positions' pages.
  int32_t max_pages = 1;
  for (int r = 0; r < C; ++r)
    for (const TokenBlock& b : plan.rank_blocks[size_t(r)])
      max_pages = std::max(max_pages, (b.pos_begin + b.len + bs - 1) / bs);
  std::vector<std::vector<int32_t>> tables(static_cast<size_t>(C)), slots(static_cast<size_t>(C));
  std::vector<std::vector<std::vector<AttnBlock>>> passes(static_cast<size_t>(C));
  ring_pages_ = 1;
  for (int src = 0; src < C; ++src) {
    std::vector<int32_t>& table = tables[size_t(src)];
    table.assign(size_t(std::max<int64_t>(n_seqs, 1) * max_pages), -1);
    int32_t next_page = 0;
    std::vector<int> ordinal(size_t(std::max<int64_t>(n_seqs, 1)), 0);
    for (const TokenBlock& sb : plan.rank_blocks[size_t(src)]) {
      for (int p = sb.pos_begin; p < sb.pos_begin + sb.len; ++p) {
        int32_t& page = table[size_t(sb.seq) * max_pages + p / bs];
        if (page < 0) page = next_page++;
        slots[size_t(src)].push_back(page * bs + p % bs);
      }
      const int k = ordinal[size_t(sb.seq)]++;
      auto& pass = passes[size_t(src)];
      if (int(pass.size()) <= k) {
        // attention_merge merges every row: a query block without keys in a pass gets an empty range
        // (out 0, lse -inf), which leaves its merged output as it was.
        pass.resize(size_t(k) + 1, plan.attn);
        for (AttnBlock& a : pass[size_t(k)]) a.kv_begin = a.kv_end = 0;
      }
      for (size_t i = 0; i < plan.attn.size(); ++i) {
        const AttnBlock& qb = plan.attn[i];
        if (qb.seq != sb.seq) continue;
        // The first pass over its own rows writes every local query row (the others merge into it).
        const bool init = src == me && k == 0;
        if (!init && sb.pos_begin > qb.pos_begin + qb.q_len - 1) continue;  // keys after every query
        pass[size_t(k)][i].kv_begin = sb.pos_begin;
        pass[size_t(k)][i].kv_end = sb.pos_begin + sb.len;
      }
    }
    for (int32_t& page : table) page = std::max(page, 0);  // unread pages: any valid block
    ring_pages_ = std::max<int64_t>(ring_pages_, next_page);
  }

  int n_slots = kFixedSlots + 3 * C;
  for (const auto& p : passes) n_slots += int(p.size());
  scratch_ = std::make_unique<Scratch>(be_, n_slots);  // the plan's tensors live until the next plan
  // A device kernel that reads whole pages and masks the scores multiplies unwritten slots by 0:
  // they must hold finite values, so a fresh ring cache starts zeroed (the layers then leave
  // finite K/V behind). Host kernels read only the key range.
  if (be_.device() != Device::CPU) {
    be_.fill_zero(scratch_->get(kRingK, be_.act_dtype(), {ring_pages_, bs, Hkv_, D_}));
    be_.fill_zero(scratch_->get(kRingV, be_.act_dtype(), {ring_pages_, bs, Hkv_, D_}));
  }
  int slot = kFixedSlots;
  sources_.assign(size_t(C), {});
  for (int src = 0; src < C; ++src) {
    Source& s = sources_[size_t(src)];
    const auto& sl = slots[size_t(src)];
    s.slots = scratch_->upload_i32(slot++, sl, {std::max<int64_t>(int64_t(sl.size()), 1)}).slice(0, int64_t(sl.size()));
    Tensor table = scratch_->upload_i32(slot++, tables[size_t(src)], {std::max<int64_t>(n_seqs, 1), max_pages});
    for (auto& blocks : passes[size_t(src)])
      if (std::any_of(blocks.begin(), blocks.end(), [](const AttnBlock& a) { return a.kv_end > a.kv_begin; }))
        s.passes.push_back(make_batch(std::move(blocks), tables[size_t(src)], max_pages, table, slot++));
  }

  // Pass-Q, one batch per rank r: r's rows (numbered from 0 within r's part of the gathered queries)
  // over the positions this shard held before this forward (all earlier than every new query: no
  // causal cut inside).
  batch_q_.assign(size_t(C), AttnBatch{});
  if (plan.any_cached) {
    Tensor table = scratch_->upload_i32(kShardTable, plan.block_table,
                                        {std::max<int64_t>(n_seqs, 1), std::max(plan.max_blocks, 1)});
    for (int r = 0; r < C; ++r) {
      std::vector<AttnBlock> blocks;
      int32_t row = 0;
      for (const TokenBlock& b : plan.rank_blocks[size_t(r)]) {
        const int32_t cached = plan.shard_cached[size_t(b.seq)];
        blocks.push_back(AttnBlock{row, b.len, cached, b.seq, 0, cached});
        row += b.len;
      }
      batch_q_[size_t(r)] = make_batch(std::move(blocks), plan.block_table, plan.max_blocks, table, slot++);
    }
  }
}

void ShardedAttention::attend(const Tensor& q, const AttnBatch& b, const KvLayer& cache, Tensor out, Tensor lse,
                              bool first) {
  const int64_t T = q.dim(0);
  const float scale = 1.0f / std::sqrt(static_cast<float>(D_));
  if (first) {
    be_.attention(q.view({T, Hq_, D_}), b, cache, scale, out.view({T, Hq_, D_}), lse);
    return;
  }
  Tensor out2 = scratch_->get(kOut2, be_.act_dtype(), {T, Hq_ * D_});
  Tensor lse2 = scratch_->get(kLse2, DType::F32, {T, Hq_});
  be_.attention(q.view({T, Hq_, D_}), b, cache, scale, out2.view({T, Hq_, D_}), lse2);
  lse_merge(be_, out.view({T, Hq_, D_}), lse, out2.view({T, Hq_, D_}), lse2);
}

void ShardedAttention::run(const KvLayer& kv, const Tensor& q, const Tensor& kv_local, const Tensor& slots,
                           Tensor out) {
  const ForwardPlan& plan = *plan_;
  const int C = plan.cp_size, me = plan.cp_rank;
  const int64_t T = plan.n_local(), HD = Hkv_ * D_;
  const DType ad = be_.act_dtype();
  Communicator& comm = *par_.cp;
  const std::vector<int64_t>& rows = plan.rows_per_rank;
  if (T > 0)
    be_.kv_store(kv_local.slice(0, T).view({T, Hkv_, D_}), kv_local.slice(T, T).view({T, Hkv_, D_}), slots, kv);
  Tensor lse = scratch_->rows(kLse, DType::F32, T, Hq_);

  // Pass-KV ring over this forward's rows.
  int64_t max_rows = 1;
  for (int64_t n : rows) max_rows = std::max(max_rows, n);
  const int bs = plan.page_size;
  KvLayer ring;
  ring.k = scratch_->get(kRingK, ad, {ring_pages_, bs, Hkv_, D_});
  ring.v = scratch_->get(kRingV, ad, {ring_pages_, bs, Hkv_, D_});
  Tensor held = kv_local;
  bool first = true;
  for (int step = 0; step < n_steps_; ++step) {
    const int src = (me - step + C) % C;
    const int64_t n = rows[size_t(src)];
    // The rows in hand go on to the next rank while this one attends to them; the previous rank's
    // (they came from rank src - 1) arrive meanwhile.
    Communicator::Ticket ticket = 0;
    Tensor in;
    if (step + 1 < n_steps_) {
      const int next = (me + 1) % C, prev = (me - 1 + C) % C;
      const int64_t n_in = rows[size_t((src - 1 + C) % C)];
      in = scratch_->get(step % 2 ? kRingB : kRingA, ad, {2 * max_rows, HD}).slice(0, 2 * n_in);
      std::vector<size_t> send(size_t(C), 0), recv(size_t(C), 0);
      send[size_t(next)] = size_t(2 * n) * held.row_bytes();
      recv[size_t(prev)] = size_t(2 * n_in) * held.row_bytes();
      sync_for(be_, comm);
      ticket = comm.all_to_allv_start(held.data, send, in.data, recv);
    }
    const Source& s = sources_[size_t(src)];
    if (T > 0 && n > 0 && !s.passes.empty()) {
      be_.kv_store(held.slice(0, n).view({n, Hkv_, D_}), held.slice(n, n).view({n, Hkv_, D_}), s.slots, ring);
      for (const AttnBatch& b : s.passes) {
        attend(q, b, ring, out, lse, first);
        first = false;
      }
    }
    if (step + 1 == n_steps_) break;
    comm.join(ticket);
    held = in;
  }

  // Pass-Q over the positions of earlier forwards. The partials for rank r's n queries travel as
  // one segment: n rows of output, then n rows of LSE (each part padded to 256 bytes).
  if (!plan.any_cached) return;
  const int64_t n_all = plan.n_all();
  const size_t out_row = size_t(Hq_ * D_) * dtype_size(ad), lse_row = size_t(Hq_) * sizeof(float);
  auto pad = [](size_t b) { return (b + 255) / 256 * 256; };
  auto segment = [&](int64_t n) { return pad(size_t(n) * out_row) + pad(size_t(n) * lse_row); };
  // The partials of n queries at `at`: output [n, Hq, D], LSE [n, Hq].
  auto partial = [&](char* at, int64_t n) {
    return std::pair{Tensor(at, ad, {n, Hq_, D_}, be_.device()),
                     Tensor(at + pad(size_t(n) * out_row), DType::F32, {n, Hq_}, be_.device())};
  };
  Tensor q_all = scratch_->rows(kQAll, ad, n_all, Hq_ * D_);
  std::vector<size_t> send(static_cast<size_t>(C), 0), recv(static_cast<size_t>(C), segment(T));
  size_t send_bytes = 0;
  for (int r = 0; r < C; ++r) send_bytes += send[size_t(r)] = segment(rows[size_t(r)]);
  char* send_buf = static_cast<char*>(scratch_->get(kSend, DType::U8, {int64_t(std::max<size_t>(send_bytes, 1))}).data);
  char* recv_buf =
      static_cast<char*>(scratch_->get(kRecv, DType::U8, {int64_t(std::max<size_t>(segment(T) * C, 1))}).data);
  sync_for(be_, comm);
  gather_rows(comm, q, q_all, rows);
  const float scale = 1.0f / std::sqrt(float(D_));
  size_t at = 0;
  int64_t row = 0;
  for (int r = 0; r < C; ++r) {
    const int64_t n = rows[size_t(r)];
    if (n > 0) {
      auto [o, l] = partial(send_buf + at, n);
      be_.attention(q_all.slice(row, n).view({n, Hq_, D_}), batch_q_[size_t(r)], kv, scale, o, l);
    }
    at += send[size_t(r)];
    row += n;
  }
  sync_for(be_, comm);
  comm.all_to_allv(send_buf, send, recv_buf, recv);
  for (int r = 0; r < C && T > 0; ++r) {
    auto [o, l] = partial(recv_buf + size_t(r) * segment(T), T);
    lse_merge(be_, out.view({T, Hq_, D_}), lse, o, l);
  }
}

}  // namespace cpinfer
