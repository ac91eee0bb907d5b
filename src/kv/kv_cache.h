// Paged KV cache: every layer holds K and V pools of fixed-size blocks; a sequence owns a list of
// blocks (its page table) and position p lives in block blocks[p / block_size] at p % block_size.
#pragma once
#include <array>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "kv/radix_cache.h"
#include "ops/backend.h"

namespace cpinfer {

struct KvCacheShape {
  int n_layers = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
  int block_size = 16;
  int n_blocks = 0;
  DType dtype = DType::F32;
  size_t bytes() const {
    return size_t(2) * n_layers * n_blocks * block_size * n_kv_heads * head_dim * dtype_size(dtype);
  }
};

class KvCache {
 public:
  KvCache(Backend& backend, const KvCacheShape& shape);

  const KvCacheShape& shape() const { return shape_; }
  int block_size() const { return shape_.block_size; }
  KvLayer layer(int l) const;
  // Every layer's K and V zeroed, so that a position read before it is written holds 0, not what the
  // memory held before (host memory reused from the heap can hold NaN bit patterns): bench decode's
  // synthetic contexts read pages nobody wrote.
  void clear();

  // Sequences: ids are small integers reused after free_sequence().
  int add_sequence();
  void free_sequence(int seq);
  bool has_sequence(int seq) const;
  // Grows the page table of `seq` to hold n_tokens positions. Throws (and allocates nothing)
  // when the free blocks do not suffice.
  void reserve(int seq, int n_tokens);
  // Whether reserve(seq, n_tokens) would succeed now.
  bool can_reserve(int seq, int n_tokens) const;
  int blocks_needed(int seq, int n_tokens) const;
  // Number of positions whose K/V are written (the caller advances it after a forward).
  int length(int seq) const { return seqs_.at(seq).length; }
  void set_length(int seq, int n);
  const std::vector<int32_t>& blocks(int seq) const { return seqs_.at(seq).pages.at(size_t(own_pool())); }
  int32_t slot(int seq, int pos) const;

  // Shared blocks (the prefix cache). Every block has a reference count: one per sequence that
  // lists it and one per retain(); it returns to the free list when the count drops to 0.
  // share() appends an in-use block to the page table of `seq` (whose blocks so far must all be
  // full: callers share a whole-page prefix before reserving the rest); the sequence then holds a
  // reference, and must not write positions inside the block (they are someone else's too).
  // `rank`: the CP rank whose blocks are meant (sharded; 0 otherwise). On a sharded cache a shared
  // prefix is adopted by a new sequence (length 0) in three steps, every rank doing all of them for
  // every rank (see adoption()): share() the rank's full pages, copy_tail() its last partial page,
  // adopt() the ownership runs, which sets the length.
  void share(int seq, int32_t block, int rank = 0);
  void retain(int32_t block, int rank = 0);
  void release(int32_t block, int rank = 0);
  int ref_count(int32_t block, int rank = 0) const;
  // Sharded: a fresh block of `rank` appended to the pages of `seq`, holding a copy of the first
  // n_rows positions of block `src` (every layer's K and V; only on the rank that owns them).
  void copy_tail(int seq, int rank, int32_t src, int n_rows);
  // Sharded: positions [length, length + n) of `seq` belong to `rank` and are in its pages already;
  // the length grows by n.
  void adopt(int seq, int rank, int n);

  // The prefix cache's view. A ref names one block of one rank: rank * n_blocks() + block.
  int32_t page_ref(int rank, int32_t block) const { return rank * shape_.n_blocks + block; }
  int ref_rank(int32_t ref) const { return ref / shape_.n_blocks; }
  int32_t ref_block(int32_t ref) const { return ref % shape_.n_blocks; }
  // The first n_pages pages of `seq` (page g: positions [g * block_size, (g + 1) * block_size)) as the
  // prefix cache keeps them. Replicated: no tag, the page's block. Sharded: the tag is the owner
  // rank of each position of the page, and the refs, rank by rank, the blocks of the rank whose last
  // position lies in the page (full, in page order), then the block partly filled at the page's
  // end (if the rank's count of positions up to the page's end is not a multiple of block_size).
  std::vector<CachedPage> cached_pages(int seq, int n_pages) const;
  // What a new sequence does to adopt the prefix `path` (pages from cached_pages(), in order).
  struct Adoption {
    std::vector<std::array<int32_t, 2>> shares;  // (rank, block): full pages, in order per rank
    std::vector<std::array<int32_t, 3>> tails;   // (rank, src block, rows): sharded, copied
    std::vector<std::array<int32_t, 2>> runs;    // (rank, n): sharded, ownership in position order
    std::vector<int> owned;                      // sharded: positions of each rank
    int n_tokens = 0;
  };
  Adoption adoption(std::span<const CachedPage* const> path) const;
  // Blocks the most loaded rank needs for a new sequence that adopts `a` and then grows to
  // n_tokens in one forward (the tail copies included).
  int blocks_to_adopt(const Adoption& a, int n_tokens) const;

  int n_free_blocks() const;
  int n_free_blocks_on(int rank) const { return static_cast<int>(pool(rank).free.size()); }
  int n_blocks() const { return shape_.n_blocks; }
  double usage() const { return 1.0 - double(n_free_blocks()) / double(shape_.n_blocks); }

  // Copies the K (or V) of positions [0, length) of `seq` at layer l into host fp32
  // [length, Hkv, D]: used by tests that compare caches. Sharded: this rank's positions only, in
  // position order ([owned(seq, rank), Hkv, D]; own_ranges says which).
  std::vector<float> read(int seq, int layer, bool values) const;

  // ---- Sharded KV (--kv-shard): this cache is rank `rank` of a CP group of `size` and stores only
  // the positions that rank owns, packed in position order into the sequence's pages. length()
  // stays the sequence's global length. Every rank records the ownership of every rank
  // (add_owned after each forward), so all ranks build the same plan. reserve(seq, n) then takes
  // a bound on this rank's share of positions [length, n): ceil((n - length) / size) +
  // interleave - 1, which holds for the zigzag split and for round-robin by `interleave` positions.
  // Every rank also keeps the count of blocks every rank holds (each reserves by the same rule from
  // the ownership all ranks record), so that blocks_needed() is the most any rank needs,
  // n_free_blocks() the fewest any rank has, and a reserve that fits here fits on every rank. To
  // that end every rank keeps every rank's allocator (free list, reference counts, page lists; only
  // its own pages hold K/V here), so block ids of every rank are known everywhere and the prefix
  // cache's block operations (share, retain, release, copy_tail) replay identically on every rank.
  void enable_shard(int rank, int size, int interleave);
  bool sharded() const { return shard_size_ > 1; }
  int shard_rank() const { return shard_rank_; }
  int shard_size() const { return shard_size_; }
  int owned(int seq, int rank) const;
  // Positions [pos_begin, pos_begin + n) of `seq` now belong to `rank` (its own: stored in order).
  void add_owned(int seq, int rank, int pos_begin, int n);
  // Slot of this rank's local_idx-th position of `seq`.
  int32_t local_slot(int seq, int local_idx) const;
  // Tokens by which `seq` can grow in one forward when every rank may take at most `free_blocks`
  // more blocks (replicated: the positions those blocks and the sequence's own hold).
  int room_tokens(int seq, int free_blocks) const;
  // Blocks a new sequence of n_tokens needs (on the most loaded rank) for its first forward.
  int blocks_needed_new(int n_tokens) const;
  // Upper bound of the positions any rank stores for a sequence of n_tokens written by
  // `prefill_forwards` prefill forwards and any number of one-token decode steps (replicated:
  // n_tokens). shard_capacity_tokens is the inverse: the longest such sequence whose bound fits
  // rank_positions positions.
  static int64_t shard_positions_bound(int64_t n_tokens, int64_t prefill_forwards, int size, int interleave);
  static int64_t shard_capacity_tokens(int64_t rank_positions, int64_t prefill_forwards, int size, int interleave);
  int64_t positions_bound(int64_t n_tokens, int64_t prefill_forwards) const {
    return shard_positions_bound(n_tokens, prefill_forwards, shard_size_, shard_interleave_);
  }
  // This rank's positions of `seq` as [begin, length) runs in order.
  const std::vector<std::array<int32_t, 2>>& own_ranges(int seq) const { return owner_ranges(seq, shard_rank_); }
  // Any rank's positions of `seq` as [begin, length) runs in order (sharded).
  const std::vector<std::array<int32_t, 2>>& owner_ranges(int seq, int rank) const;

 private:
  struct Pool {                 // one rank's blocks
    std::vector<int32_t> free;  // free block ids (LIFO)
    std::vector<int32_t> refs;  // per block: references (0: in free)
  };
  struct Seq {
    bool live = false;
    int length = 0;
    std::vector<std::vector<int32_t>> pages;                  // per pool: the sequence's blocks there
    std::vector<int> owned;                                   // sharded: positions of each rank
    std::vector<std::vector<std::array<int32_t, 2>>> ranges;  // sharded: each rank's runs
  };
  int own_pool() const { return sharded() ? shard_rank_ : 0; }
  const Pool& pool(int rank) const;
  Pool& pool(int rank) { return const_cast<Pool&>(std::as_const(*this).pool(rank)); }
  int32_t take_block(Pool& p);
  int local_positions(int seq) const;                       // positions this cache stores for seq
  int shard_bound(int more) const;                          // positions a rank may take of `more` new ones
  int need_on(const Seq& s, int n_tokens, int rank) const;  // sharded: blocks rank needs to grow s
  int shard_rank_ = 0, shard_size_ = 1, shard_interleave_ = 1;
  Backend& backend_;
  KvCacheShape shape_;
  std::vector<Buffer> k_, v_;  // per layer
  std::vector<Pool> pools_;    // one (replicated), or one per CP rank (sharded)
  std::vector<Seq> seqs_;
};

}  // namespace cpinfer
