// The plan of one forward on one rank of a context-parallel (CP) group: which new tokens this rank
// computes, at which global positions, which attention blocks it runs, and where every token's
// K/V goes in the (replicated) paged cache. Every rank builds the same plan from the same inputs,
// so all ranks enter the same collectives with the same sizes (rank 0 decides the inputs).
//
// A sequence of L new tokens is split over the C ranks when CP is on, C > 1 and L >= min_tokens
// (SGLang's can_cp_split): zigzag into 2C blocks, the first L mod 2C blocks one token longer, rank r
// owns blocks r and 2C-1-r, which balances the causal work. A sequence that is not split (short
// prompt, decode step) goes whole to the least-loaded rank, so short work is spread, not repeated.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kv/kv_cache.h"
#include "ops/backend.h"

namespace cpinfer {

enum class LogitsWanted : uint8_t { None, Last, All };

struct SeqWork {
  int kv_seq = 0;                   // KV cache sequence (already reserved for n_cached + tokens)
  int n_cached = 0;                 // positions already in the cache
  std::span<const int32_t> tokens;  // new tokens
  LogitsWanted logits = LogitsWanted::Last;
};

struct CpOptions {
  int cp_size = 1;
  bool enable_prefill_cp = false;
  int min_tokens = 0;  // 0: 2 * cp_size
  // Sharded KV (--kv-shard): a rank's cache keeps only the positions it computes. Sequences that
  // are not zigzag-split are then spread round-robin, kv_interleave positions per rank (decode:
  // the token at position p goes to rank (p / kv_interleave) mod cp_size).
  bool kv_shard = false;
  int kv_interleave = 1;
};

struct TokenBlock {
  int32_t seq = 0;        // index into the SeqWork list
  int32_t pos_begin = 0;  // global position of the first token
  int32_t len = 0;
  int32_t src = 0;  // index of the first token in SeqWork::tokens
};

struct LogitRow {
  int32_t seq = 0;
  int32_t pos = 0;  // global position
};

struct ForwardPlan {
  int cp_rank = 0;
  int cp_size = 1;
  std::vector<std::vector<TokenBlock>> rank_blocks;  // [cp_size] blocks of each rank, local row order
  std::vector<int64_t> rows_per_rank;                // [cp_size]
  std::vector<int32_t> slots_all;                    // K/V slots of every rank's rows, rank-major

  // This rank's rows.
  std::vector<int32_t> tokens;       // [T_local]
  std::vector<int32_t> positions;    // [T_local]
  std::vector<AttnBlock> attn;       // one per local block; AttnBlock::seq = SeqWork index
  std::vector<int32_t> block_table;  // [n_seqs, max_blocks]
  int32_t max_blocks = 0;

  std::vector<int32_t> logit_rows_local;  // local rows whose logits are wanted
  std::vector<LogitRow> logit_rows_all;   // every rank's logit rows, rank-major (gather order)
  std::vector<int64_t> logit_rows_per_rank;

  // Sharded KV: slots_all holds this rank's slots (in its own shard) and -1 for other ranks' rows.
  bool kv_shard = false;
  int page_size = 16;                 // the cache's positions per block
  bool ring = false;                  // some sequence's new rows lie on several ranks
  bool any_cached = false;            // some sequence has positions from earlier forwards
  std::vector<int32_t> shard_cached;  // [n_seqs] this rank's positions of each sequence before this forward

  int64_t n_local() const { return static_cast<int64_t>(tokens.size()); }
  int64_t n_all() const { return static_cast<int64_t>(slots_all.size()); }
};

// Whether a sequence of n_new tokens is split over the CP group (SGLang: can_cp_split).
bool can_cp_split(int n_new, const CpOptions& opt);

// Zigzag split of n tokens into 2*cp blocks: returns the 2*cp+1 block boundaries.
std::vector<int32_t> zigzag_bounds(int n, int cp_size);

ForwardPlan make_plan(const std::vector<SeqWork>& work, const KvCache& cache, int cp_rank, const CpOptions& opt);

// Sharded KV: records in `cache` which rank now owns each new position of `plan` (after the forward).
void record_shard(const ForwardPlan& plan, const std::vector<SeqWork>& work, KvCache& cache);

}  // namespace cpinfer
