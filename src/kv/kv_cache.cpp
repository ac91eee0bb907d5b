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
      seqs_[i] = Seq{true, 0, {}, {}, {}};
      return static_cast<int>(i);
    }
  }
  seqs_.push_back(Seq{true, 0, {}, {}, {}});
  return static_cast<int>(seqs_.size() - 1);
}

void KvCache::free_sequence(int seq) {
  CPI_CHECK(has_sequence(seq), "free of unknown KV sequence ", seq);
  for (auto it = seqs_[seq].blocks.rbegin(); it != seqs_[seq].blocks.rend(); ++it) release(*it);
  seqs_[seq] = Seq{};
}

bool KvCache::has_sequence(int seq) const { return seq >= 0 && seq < int(seqs_.size()) && seqs_[seq].live; }

int KvCache::blocks_needed(int seq, int n_tokens) const {
  if (sharded()) {
    const int more = std::max(0, n_tokens - seqs_.at(seq).length);
    const int bound = more == 0 ? 0 : (more + shard_size_ - 1) / shard_size_ + shard_interleave_ - 1;
    n_tokens = local_positions(seq) + bound;
  }
  int want = (n_tokens + shape_.block_size - 1) / shape_.block_size;
  return std::max(0, want - static_cast<int>(seqs_.at(seq).blocks.size()));
}

bool KvCache::can_reserve(int seq, int n_tokens) const { return blocks_needed(seq, n_tokens) <= n_free_blocks(); }

void KvCache::reserve(int seq, int n_tokens) {
  CPI_CHECK(has_sequence(seq), "reserve on unknown KV sequence ", seq);
  int need = blocks_needed(seq, n_tokens);
  CPI_CHECK(need <= n_free_blocks(), "KV cache full: ", n_tokens, " tokens need ", need, " more blocks of ",
            shape_.block_size, ", only ", n_free_blocks(), " free (raise --kv-cache-tokens)");
  for (int i = 0; i < need; ++i) {
    seqs_[seq].blocks.push_back(free_.back());
    refs_[free_.back()] = 1;
    free_.pop_back();
  }
}

void KvCache::share(int seq, int32_t block) {
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
