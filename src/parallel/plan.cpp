#include "parallel/plan.h"

#include <algorithm>

namespace cpinfer {

bool can_cp_split(int n_new, const CpOptions& opt) {
  if (!opt.enable_prefill_cp || opt.cp_size <= 1) return false;
  int min_tokens = opt.min_tokens > 0 ? opt.min_tokens : 2 * opt.cp_size;
  return n_new >= std::max(min_tokens, 2 * opt.cp_size);
}

std::vector<int32_t> zigzag_bounds(int n, int cp_size) {
  int n_blocks = 2 * cp_size;
  std::vector<int32_t> bounds(n_blocks + 1, 0);
  int base = n / n_blocks, extra = n % n_blocks;
  for (int b = 0; b < n_blocks; ++b) bounds[b + 1] = bounds[b] + base + (b < extra ? 1 : 0);
  return bounds;
}

ForwardPlan make_plan(const std::vector<SeqWork>& work, const KvCache& cache, int cp_rank, const CpOptions& opt) {
  const int cp = std::max(1, opt.cp_size);
  CPI_CHECK(cp_rank >= 0 && cp_rank < cp, "cp rank ", cp_rank, " outside a group of ", cp);
  ForwardPlan plan;
  plan.cp_rank = cp_rank;
  plan.cp_size = cp;
  plan.rank_blocks.assign(cp, {});
  std::vector<int64_t> load(cp, 0);  // causal work estimate per rank, for placing unsplit sequences

  for (int s = 0; s < static_cast<int>(work.size()); ++s) {
    const SeqWork& w = work[s];
    int n = static_cast<int>(w.tokens.size());
    CPI_CHECK(n > 0, "sequence ", s, " has no new tokens");
    CPI_CHECK(cache.length(w.kv_seq) == w.n_cached, "KV sequence ", w.kv_seq, " holds ", cache.length(w.kv_seq),
              " positions, the plan expects ", w.n_cached);
    if (can_cp_split(n, opt)) {
      auto bounds = zigzag_bounds(n, cp);
      for (int r = 0; r < cp; ++r) {
        for (int b : {r, 2 * cp - 1 - r}) {
          TokenBlock blk{s, w.n_cached + bounds[b], bounds[b + 1] - bounds[b], bounds[b]};
          if (blk.len == 0) continue;
          plan.rank_blocks[r].push_back(blk);
          load[r] += int64_t(blk.len) * (blk.pos_begin + blk.len);
        }
      }
    } else if (opt.kv_shard && cp > 1) {
      // Round-robin by kv_interleave positions, so that every shard grows at the same rate.
      const int I = std::max(1, opt.kv_interleave);
      for (int i = 0; i < n;) {
        const int pos = w.n_cached + i;
        const int r = (pos / I) % cp;
        const int len = std::min(n - i, I - pos % I);
        plan.rank_blocks[r].push_back(TokenBlock{s, pos, len, i});
        load[r] += int64_t(len) * (pos + len);
        i += len;
      }
    } else {
      int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
      plan.rank_blocks[r].push_back(TokenBlock{s, w.n_cached, n, 0});
      load[r] += int64_t(n) * (w.n_cached + n);
    }
  }

  // Page tables of the batch (row = SeqWork index).
  int max_blocks = 1;
  for (const auto& w : work) max_blocks = std::max<int>(max_blocks, cache.blocks(w.kv_seq).size());
  plan.max_blocks = max_blocks;
  plan.block_table.assign(work.size() * max_blocks, 0);
  for (size_t s = 0; s < work.size(); ++s) {
    const auto& blocks = cache.blocks(work[s].kv_seq);
    std::copy(blocks.begin(), blocks.end(), plan.block_table.begin() + s * max_blocks);
  }

  plan.kv_shard = opt.kv_shard && cp > 1;
  plan.page_size = cache.block_size();
  if (plan.kv_shard) {
    CPI_CHECK(cache.sharded() && cache.shard_rank() == cp_rank, "sharded-KV plan needs the cache of CP rank ", cp_rank);
    for (size_t s = 0; s < work.size(); ++s) {
      plan.shard_cached.push_back(cache.owned(work[s].kv_seq, cp_rank));
      plan.any_cached = plan.any_cached || work[s].n_cached > 0;
      int n_ranks = 0;
      for (int r = 0; r < cp; ++r)
        n_ranks += std::any_of(plan.rank_blocks[r].begin(), plan.rank_blocks[r].end(),
                               [&](const TokenBlock& b) { return b.seq == int(s); });
      plan.ring = plan.ring || n_ranks > 1;
    }
  }
  std::vector<int32_t> local_next = plan.shard_cached;  // next packed index of each sequence
  plan.rows_per_rank.assign(cp, 0);
  plan.logit_rows_per_rank.assign(cp, 0);
  for (int r = 0; r < cp; ++r) {
    int64_t row = 0;
    for (const TokenBlock& blk : plan.rank_blocks[r]) {
      const SeqWork& w = work[blk.seq];
      int seq_end = w.n_cached + static_cast<int>(w.tokens.size());
      for (int i = 0; i < blk.len; ++i) {
        int pos = blk.pos_begin + i;
        if (!plan.kv_shard)
          plan.slots_all.push_back(cache.slot(w.kv_seq, pos));
        else
          plan.slots_all.push_back(r == cp_rank ? cache.local_slot(w.kv_seq, local_next[size_t(blk.seq)]++) : -1);
        bool want = w.logits == LogitsWanted::All || (w.logits == LogitsWanted::Last && pos == seq_end - 1);
        if (want) {
          plan.logit_rows_all.push_back(LogitRow{blk.seq, pos});
          ++plan.logit_rows_per_rank[r];
          if (r == cp_rank) plan.logit_rows_local.push_back(static_cast<int32_t>(row + i));
        }
        if (r == cp_rank) {
          plan.tokens.push_back(w.tokens[blk.src + i]);
          plan.positions.push_back(pos);
        }
      }
      if (r == cp_rank) {
        AttnBlock a;
        a.q_begin = static_cast<int32_t>(row);
        a.q_len = blk.len;
        a.pos_begin = blk.pos_begin;
        a.seq = blk.seq;
        plan.attn.push_back(a);
      }
      row += blk.len;
    }
    plan.rows_per_rank[r] = row;
  }
  return plan;
}

void record_shard(const ForwardPlan& plan, const std::vector<SeqWork>& work, KvCache& cache) {
  if (!plan.kv_shard) return;
  for (int r = 0; r < plan.cp_size; ++r)
    for (const TokenBlock& b : plan.rank_blocks[size_t(r)])
      cache.add_owned(work[size_t(b.seq)].kv_seq, r, b.pos_begin, b.len);
}

}  // namespace cpinfer
