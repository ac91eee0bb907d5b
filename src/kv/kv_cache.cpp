#include "kv/kv_cache.h"

#include <algorithm>

namespace cpinfer {

KvCache::KvCache(Backend& backend, const KvCacheShape& shape) : backend_(backend), shape_(shape) {
  CPI_CHECK(shape.n_layers > 0 && shape.n_kv_heads > 0 && shape.head_dim > 0, "bad KV cache shape");
  CPI_CHECK(shape.block_size > 0 && shape.n_blocks > 0, "KV cache needs block_size > 0 and n_blocks > 0, got ",
            shape.block_size, " and ", shape.n_blocks);
  size_t layer_bytes = shape.bytes() / 2 / shape.n_layers;
  for (int l = 0; l < shape.n_layers; ++l) {
    k_.emplace_back(backend, layer_bytes);
    v_.emplace_back(backend, layer_bytes);
  }
  // A device cache starts zeroed, so a slot never written holds a finite value: attention kernels
  // that read whole pages and mask the scores (cuDNN's) multiply such slots of V by 0. Host memory
  // is left to the OS (fresh pages are zero, and touching them all would commit the whole cache).
  if (backend.device() != Device::CPU)
    for (int l = 0; l < shape.n_layers; ++l) {
      const KvLayer kv = layer(l);
      backend.fill_zero(kv.k);
      backend.fill_zero(kv.v);
    }
  refs_.assign(shape.n_blocks, 0);
  free_.reserve(shape.n_blocks);
  for (int b = shape.n_blocks - 1; b >= 0; --b) free_.push_back(b);
}

KvLayer KvCache::layer(int l) const {
  KvLayer kv;
  kv.k = k_[l].tensor(shape_.dtype, {shape_.n_blocks, shape_.block_size, shape_.n_kv_heads, shape_.head_dim});
  kv.v = v_[l].tensor(shape_.dtype, {shape_.n_blocks, shape_.block_size, shape_.n_kv_heads, shape_.head_dim});
  return kv;
}

int KvCache::add_sequence() {
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (!seqs_[i].live) {
      seqs_[i] = Seq{true, 0, {}, {}, {}, {}};
      return static_cast<int>(i);
    }
  }
  seqs_.push_back(Seq{true, 0, {}, {}, {}, {}});
  return static_cast<int>(seqs_.size() - 1);
}

void KvCache::free_sequence(int seq) {
  CPI_CHECK(has_sequence(seq), "free of unknown KV sequence ", seq);
  for (auto it = seqs_[seq].blocks.rbegin(); it != seqs_[seq].blocks.rend(); ++it) release(*it);
  for (size_t r = 0; r < seqs_[seq].held.size(); ++r) rank_used_[r] -= seqs_[seq].held[r];
  seqs_[seq] = Seq{};
}

bool KvCache::has_sequence(int seq) const { return seq >= 0 && seq < int(seqs_.size()) && seqs_[seq].live; }

int KvCache::shard_bound(int more) const {
  return more <= 0 ? 0 : (more + shard_size_ - 1) / shard_size_ + shard_interleave_ - 1;
}

int KvCache::need_on(const Seq& s, int n_tokens, int rank) const {
  const int owned = rank < int(s.owned.size()) ? s.owned[size_t(rank)] : 0;
  const int held = rank < int(s.held.size()) ? s.held[size_t(rank)] : 0;
  const int want = (owned + shard_bound(n_tokens - s.length) + shape_.block_size - 1) / shape_.block_size;
  return std::max(0, want - held);
}

int KvCache::blocks_needed(int seq, int n_tokens) const {
  const Seq& s = seqs_.at(seq);
  if (sharded()) {
    int most = 0;
    for (int r = 0; r < shard_size_; ++r) most = std::max(most, need_on(s, n_tokens, r));
    return most;
  }
  int want = (n_tokens + shape_.block_size - 1) / shape_.block_size;
  return std::max(0, want - static_cast<int>(s.blocks.size()));
}

int KvCache::n_free_blocks() const {
  if (!sharded()) return static_cast<int>(free_.size());
  int fewest = shape_.n_blocks;
  for (int used : rank_used_) fewest = std::min(fewest, shape_.n_blocks - used);
  return fewest;
}

bool KvCache::can_reserve(int seq, int n_tokens) const {
  if (!sharded()) return blocks_needed(seq, n_tokens) <= n_free_blocks();
  for (int r = 0; r < shard_size_; ++r)
    if (need_on(seqs_.at(seq), n_tokens, r) > shape_.n_blocks - rank_used_[size_t(r)]) return false;
  return true;
}

void KvCache::reserve(int seq, int n_tokens) {
  CPI_CHECK(has_sequence(seq), "reserve on unknown KV sequence ", seq);
  Seq& s = seqs_[seq];
  int need = 0;
  if (sharded()) {
    // Every rank's share, checked before anything is taken: all ranks fail or succeed together.
    std::vector<int> needs(static_cast<size_t>(shard_size_));
    for (int r = 0; r < shard_size_; ++r) {
      needs[size_t(r)] = need_on(s, n_tokens, r);
      const int free = shape_.n_blocks - rank_used_[size_t(r)];
      CPI_CHECK(needs[size_t(r)] <= free, "KV cache full on CP rank ", r, ": ", n_tokens, " tokens need ",
                needs[size_t(r)], " more blocks of ", shape_.block_size, ", only ", free,
                " free (raise --kv-cache-tokens)");
    }
    s.held.resize(size_t(shard_size_), 0);
    for (int r = 0; r < shard_size_; ++r) {
      s.held[size_t(r)] += needs[size_t(r)];
      rank_used_[size_t(r)] += needs[size_t(r)];
    }
    need = needs[size_t(shard_rank_)];
  } else {
    need = blocks_needed(seq, n_tokens);
  }
  CPI_CHECK(need <= int(free_.size()), "KV cache full: ", n_tokens, " tokens need ", need, " more blocks of ",
            shape_.block_size, ", only ", free_.size(), " free (raise --kv-cache-tokens)");
  for (int i = 0; i < need; ++i) {
    s.blocks.push_back(free_.back());
    refs_[free_.back()] = 1;
    free_.pop_back();
  }
}

int KvCache::room_tokens(int seq, int free_blocks) const {
  const Seq& s = seqs_.at(seq);
  const int64_t bs = shape_.block_size;
  if (!sharded()) return static_cast<int>(std::max<int64_t>(0, (int64_t(s.blocks.size()) + free_blocks) * bs - s.length));
  int64_t room = INT32_MAX;
  for (int r = 0; r < shard_size_; ++r) {
    const int64_t owned = r < int(s.owned.size()) ? s.owned[size_t(r)] : 0;
    const int64_t held = r < int(s.held.size()) ? s.held[size_t(r)] : 0;
    // shard_bound(more) = ceil(more / size) + interleave - 1 must fit the rank's free positions.
    const int64_t positions = (held + free_blocks) * bs - owned - (shard_interleave_ - 1);
    room = std::min(room, std::max<int64_t>(0, positions) * shard_size_);
  }
  return static_cast<int>(room);
}

int KvCache::blocks_needed_new(int n_tokens) const {
  const int positions = sharded() ? shard_bound(n_tokens) : n_tokens;
  return (positions + shape_.block_size - 1) / shape_.block_size;
}

// A prefill forward gives a rank at most max(2, interleave) positions beyond its proportional
// share (a zigzag split: two blocks of at most ceil(n / 2C); a run spread by position: at most
// one interleave more); the decode tokens are one run spread by position (one interleave more);
// a reserve adds at most interleave - 1 to what the rank will own.
int64_t KvCache::shard_positions_bound(int64_t n_tokens, int64_t prefill_forwards, int size, int interleave) {
  if (size <= 1) return n_tokens;
  return (n_tokens + size - 1) / size + std::max<int64_t>(1, prefill_forwards) * std::max(2, interleave) +
         2 * int64_t{interleave};
}

int64_t KvCache::shard_capacity_tokens(int64_t rank_positions, int64_t prefill_forwards, int size, int interleave) {
  if (size <= 1) return rank_positions;
  const int64_t slack = shard_positions_bound(0, prefill_forwards, size, interleave);
  return std::max<int64_t>(0, (rank_positions - slack) * size);
}

void KvCache::share(int seq, int32_t block) {
  CPI_CHECK(!sharded(), "a sharded KV cache shares no blocks");
  CPI_CHECK(has_sequence(seq), "share into unknown KV sequence ", seq);
  CPI_CHECK(ref_count(block) > 0, "share of KV block ", block, " that is not in use");
  Seq& s = seqs_[seq];
  CPI_CHECK(s.length == int(s.blocks.size()) * shape_.block_size,
            "a shared KV block must follow full blocks (sequence ", seq, ")");
  s.blocks.push_back(block);
  s.length = int(s.blocks.size()) * shape_.block_size;
  ++refs_[block];
}

void KvCache::retain(int32_t block) {
  CPI_CHECK(!sharded(), "a sharded KV cache shares no blocks");
  CPI_CHECK(ref_count(block) > 0, "retain of KV block ", block, " that is not in use");
  ++refs_[block];
}

void KvCache::release(int32_t block) {
  CPI_CHECK(ref_count(block) > 0, "release of KV block ", block, " that is not in use");
  if (--refs_[block] == 0) free_.push_back(block);
}

int KvCache::ref_count(int32_t block) const {
  CPI_CHECK(block >= 0 && block < shape_.n_blocks, "KV block ", block, " out of range [0, ", shape_.n_blocks, ")");
  return refs_[block];
}

void KvCache::set_length(int seq, int n) {
  CPI_CHECK(has_sequence(seq), "unknown KV sequence ", seq);
  CPI_CHECK(n >= 0 && local_positions(seq) <= int(seqs_[seq].blocks.size()) * shape_.block_size &&
                (sharded() || n <= int(seqs_[seq].blocks.size()) * shape_.block_size),
            "KV length ", n, " beyond the reserved blocks");
  seqs_[seq].length = n;
}

void KvCache::enable_shard(int rank, int size, int interleave) {
  CPI_CHECK(size >= 1 && rank >= 0 && rank < size && interleave >= 1, "bad KV shard: rank ", rank, " of ", size,
            ", interleave ", interleave);
  CPI_CHECK(seqs_.empty(), "enable_shard on a cache that already has sequences");
  shard_rank_ = rank;
  shard_size_ = size;
  shard_interleave_ = interleave;
  rank_used_.assign(size_t(size), 0);
}

int KvCache::local_positions(int seq) const { return sharded() ? owned(seq, shard_rank_) : seqs_.at(seq).length; }

int KvCache::owned(int seq, int rank) const {
  const Seq& s = seqs_.at(seq);
  return rank < int(s.owned.size()) ? s.owned[size_t(rank)] : 0;
}

void KvCache::add_owned(int seq, int rank, int pos_begin, int n) {
  CPI_CHECK(sharded() && has_sequence(seq) && rank >= 0 && rank < shard_size_ && n >= 0, "add_owned: bad call");
  Seq& s = seqs_[seq];
  s.owned.resize(size_t(shard_size_), 0);
  s.owned[size_t(rank)] += n;
  if (rank != shard_rank_ || n == 0) return;
  CPI_CHECK(s.owned[size_t(rank)] <= int(s.blocks.size()) * shape_.block_size, "KV shard of sequence ", seq,
            " holds ", s.owned[size_t(rank)], " positions beyond its reserved blocks");
  if (!s.own_ranges.empty() && s.own_ranges.back()[0] + s.own_ranges.back()[1] == pos_begin)
    s.own_ranges.back()[1] += n;
  else
    s.own_ranges.push_back({pos_begin, n});
}

int32_t KvCache::local_slot(int seq, int local_idx) const {
  const auto& blocks = seqs_.at(seq).blocks;
  int b = local_idx / shape_.block_size;
  CPI_CHECK(b < int(blocks.size()), "local position ", local_idx, " not reserved in KV sequence ", seq);
  return blocks[b] * shape_.block_size + local_idx % shape_.block_size;
}

int32_t KvCache::slot(int seq, int pos) const {
  const auto& blocks = seqs_.at(seq).blocks;
  int b = pos / shape_.block_size;
  CPI_CHECK(b < int(blocks.size()), "position ", pos, " not reserved in KV sequence ", seq);
  return blocks[b] * shape_.block_size + pos % shape_.block_size;
}

std::vector<float> KvCache::read(int seq, int layer, bool values) const {
  int n = local_positions(seq);
  size_t row = size_t(shape_.n_kv_heads) * shape_.head_dim;
  size_t row_bytes = row * dtype_size(shape_.dtype);
  std::vector<uint8_t> raw(n * row_bytes);
  const Buffer& buf = values ? v_[layer] : k_[layer];
  for (int p = 0; p < n; ++p) {
    size_t off = size_t(sharded() ? local_slot(seq, p) : slot(seq, p)) * row_bytes;
    backend_.download(raw.data() + p * row_bytes, static_cast<const char*>(buf.data()) + off, row_bytes);
  }
  std::vector<float> out(n * row);
  to_f32(raw.data(), shape_.dtype, out.data(), out.size());
  return out;
}

}  // namespace cpinfer
