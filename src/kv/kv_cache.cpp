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
  if (backend.device() != Device::CPU) clear();
  pools_.resize(1);
  for (Pool& p : pools_) {
    p.refs.assign(size_t(shape.n_blocks), 0);
    for (int b = shape.n_blocks - 1; b >= 0; --b) p.free.push_back(b);
  }
}

const KvCache::Pool& KvCache::pool(int rank) const {
  CPI_CHECK(rank >= 0 && rank < int(pools_.size()), "KV blocks of rank ", rank, " on a cache of ", pools_.size(),
            sharded() ? " ranks" : " rank (replicated: blocks are rank 0's)");
  return pools_[size_t(rank)];
}

int32_t KvCache::take_block(Pool& p) {
  const int32_t b = p.free.back();
  p.free.pop_back();
  p.refs[size_t(b)] = 1;
  return b;
}

void KvCache::clear() {
  for (int l = 0; l < shape_.n_layers; ++l) {
    const KvLayer kv = layer(l);
    backend_.fill_zero(kv.k);
    backend_.fill_zero(kv.v);
  }
}

KvLayer KvCache::layer(int l) const {
  KvLayer kv;
  kv.k = k_[l].tensor(shape_.dtype, {shape_.n_blocks, shape_.block_size, shape_.n_kv_heads, shape_.head_dim});
  kv.v = v_[l].tensor(shape_.dtype, {shape_.n_blocks, shape_.block_size, shape_.n_kv_heads, shape_.head_dim});
  return kv;
}

int KvCache::add_sequence() {
  Seq fresh{true, 0, std::vector<std::vector<int32_t>>(pools_.size()), {}, {}};
  if (sharded()) {
    fresh.owned.assign(size_t(shard_size_), 0);
    fresh.ranges.resize(size_t(shard_size_));
  }
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (!seqs_[i].live) {
      seqs_[i] = std::move(fresh);
      return static_cast<int>(i);
    }
  }
  seqs_.push_back(std::move(fresh));
  return static_cast<int>(seqs_.size() - 1);
}

void KvCache::free_sequence(int seq) {
  CPI_CHECK(has_sequence(seq), "free of unknown KV sequence ", seq);
  for (size_t r = 0; r < pools_.size(); ++r) {
    const std::vector<int32_t>& pages = seqs_[seq].pages[r];
    for (auto it = pages.rbegin(); it != pages.rend(); ++it) release(*it, int(r));
  }
  seqs_[seq] = Seq{};
}

bool KvCache::has_sequence(int seq) const { return seq >= 0 && seq < int(seqs_.size()) && seqs_[seq].live; }

int KvCache::shard_bound(int more) const {
  return more <= 0 ? 0 : (more + shard_size_ - 1) / shard_size_ + shard_interleave_ - 1;
}

int KvCache::need_on(const Seq& s, int n_tokens, int rank) const {
  const int owned = s.owned[size_t(rank)];
  const int held = static_cast<int>(s.pages[size_t(rank)].size());
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
  return std::max(0, want - static_cast<int>(s.pages[0].size()));
}

int KvCache::n_free_blocks() const {
  int fewest = shape_.n_blocks;
  for (const Pool& p : pools_) fewest = std::min(fewest, static_cast<int>(p.free.size()));
  return fewest;
}

bool KvCache::can_reserve(int seq, int n_tokens) const {
  if (!sharded()) return blocks_needed(seq, n_tokens) <= n_free_blocks();
  for (int r = 0; r < shard_size_; ++r)
    if (need_on(seqs_.at(seq), n_tokens, r) > n_free_blocks_on(r)) return false;
  return true;
}

void KvCache::reserve(int seq, int n_tokens) {
  CPI_CHECK(has_sequence(seq), "reserve on unknown KV sequence ", seq);
  Seq& s = seqs_[seq];
  // Sharded: every rank's share, checked before anything is taken: all ranks fail or succeed
  // together.
  std::vector<int> needs(pools_.size());
  for (int r = 0; r < int(pools_.size()); ++r) {
    needs[size_t(r)] = sharded() ? need_on(s, n_tokens, r) : blocks_needed(seq, n_tokens);
    const int free = n_free_blocks_on(r);
    CPI_CHECK(needs[size_t(r)] <= free, "KV cache full", sharded() ? " on CP rank " + std::to_string(r) : "", ": ",
              n_tokens, " tokens need ", needs[size_t(r)], " more blocks of ", shape_.block_size, ", only ", free,
              " free (raise --kv-cache-tokens)");
  }
  for (size_t r = 0; r < pools_.size(); ++r)
    for (int i = 0; i < needs[r]; ++i) s.pages[r].push_back(take_block(pools_[r]));
}

int KvCache::room_tokens(int seq, int free_blocks) const {
  const Seq& s = seqs_.at(seq);
  const int64_t bs = shape_.block_size;
  if (!sharded())
    return static_cast<int>(std::max<int64_t>(0, (int64_t(s.pages[0].size()) + free_blocks) * bs - s.length));
  int64_t room = INT32_MAX;
  for (int r = 0; r < shard_size_; ++r) {
    const int64_t owned = s.owned[size_t(r)];
    const int64_t held = int64_t(s.pages[size_t(r)].size());
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

void KvCache::share(int seq, int32_t block, int rank) {
  CPI_CHECK(has_sequence(seq), "share into unknown KV sequence ", seq);
  CPI_CHECK(ref_count(block, rank) > 0, "share of KV block ", block, " that is not in use");
  Seq& s = seqs_[seq];
  std::vector<int32_t>& pages = s.pages[size_t(rank)];
  if (sharded()) {
    CPI_CHECK(s.length == 0, "a sharded KV sequence adopts a shared prefix before anything else (sequence ", seq, ")");
  } else {
    CPI_CHECK(s.length == int(pages.size()) * shape_.block_size, "a shared KV block must follow full blocks (sequence ",
              seq, ")");
    s.length = int(pages.size() + 1) * shape_.block_size;
  }
  pages.push_back(block);
  ++pool(rank).refs[size_t(block)];
}

void KvCache::copy_tail(int seq, int rank, int32_t src, int n_rows) {
  CPI_CHECK(sharded() && has_sequence(seq) && seqs_[seq].length == 0,
            "copy_tail: only while a sharded KV sequence adopts a prefix");
  CPI_CHECK(ref_count(src, rank) > 0, "copy_tail from KV block ", src, " that is not in use");
  CPI_CHECK(n_rows > 0 && n_rows < shape_.block_size, "copy_tail of ", n_rows, " rows");
  Pool& p = pool(rank);
  CPI_CHECK(!p.free.empty(), "KV cache full on CP rank ", rank, ": no block for a cached prefix's last page");
  const int32_t dst = take_block(p);
  seqs_[seq].pages[size_t(rank)].push_back(dst);
  if (rank != shard_rank_) return;
  const size_t row_bytes = size_t(shape_.n_kv_heads) * shape_.head_dim * dtype_size(shape_.dtype);
  const size_t page_bytes = row_bytes * shape_.block_size;
  for (int l = 0; l < shape_.n_layers; ++l)
    for (Buffer* b : {&k_[size_t(l)], &v_[size_t(l)]}) {
      char* base = static_cast<char*>(b->data());
      backend_.copy(base + size_t(dst) * page_bytes, base + size_t(src) * page_bytes, size_t(n_rows) * row_bytes);
    }
}

void KvCache::adopt(int seq, int rank, int n) {
  CPI_CHECK(sharded() && has_sequence(seq), "adopt: only on a sharded KV cache");
  Seq& s = seqs_[seq];
  add_owned(seq, rank, s.length, n);
  CPI_CHECK(s.owned[size_t(rank)] <= int(s.pages[size_t(rank)].size()) * shape_.block_size, "KV shard of sequence ",
            seq, " on rank ", rank, " adopts positions beyond its pages");
  s.length += n;
}

void KvCache::retain(int32_t block, int rank) {
  CPI_CHECK(ref_count(block, rank) > 0, "retain of KV block ", block, " that is not in use");
  ++pool(rank).refs[size_t(block)];
}

void KvCache::release(int32_t block, int rank) {
  CPI_CHECK(ref_count(block, rank) > 0, "release of KV block ", block, " that is not in use");
  Pool& p = pool(rank);
  if (--p.refs[size_t(block)] == 0) p.free.push_back(block);
}

int KvCache::ref_count(int32_t block, int rank) const {
  CPI_CHECK(block >= 0 && block < shape_.n_blocks, "KV block ", block, " out of range [0, ", shape_.n_blocks, ")");
  return pool(rank).refs[size_t(block)];
}

void KvCache::set_length(int seq, int n) {
  CPI_CHECK(has_sequence(seq), "unknown KV sequence ", seq);
  const int capacity = int(blocks(seq).size()) * shape_.block_size;
  CPI_CHECK(n >= 0 && local_positions(seq) <= capacity && (sharded() || n <= capacity), "KV length ", n,
            " beyond the reserved blocks");
  seqs_[seq].length = n;
}

void KvCache::enable_shard(int rank, int size, int interleave) {
  CPI_CHECK(size >= 1 && rank >= 0 && rank < size && interleave >= 1, "bad KV shard: rank ", rank, " of ", size,
            ", interleave ", interleave);
  CPI_CHECK(seqs_.empty(), "enable_shard on a cache that already has sequences");
  shard_rank_ = rank;
  shard_size_ = size;
  shard_interleave_ = interleave;
  pools_.resize(size_t(size), pools_.front());
}

int KvCache::local_positions(int seq) const { return sharded() ? owned(seq, shard_rank_) : seqs_.at(seq).length; }

int KvCache::owned(int seq, int rank) const {
  const Seq& s = seqs_.at(seq);
  return rank < int(s.owned.size()) ? s.owned[size_t(rank)] : 0;
}

const std::vector<std::array<int32_t, 2>>& KvCache::owner_ranges(int seq, int rank) const {
  CPI_CHECK(sharded() && rank >= 0 && rank < shard_size_, "owner_ranges: not a rank of a sharded KV cache");
  return seqs_.at(seq).ranges[size_t(rank)];
}

void KvCache::add_owned(int seq, int rank, int pos_begin, int n) {
  CPI_CHECK(sharded() && has_sequence(seq) && rank >= 0 && rank < shard_size_ && n >= 0, "add_owned: bad call");
  Seq& s = seqs_[seq];
  s.owned[size_t(rank)] += n;
  if (n == 0) return;
  CPI_CHECK(rank != shard_rank_ || s.owned[size_t(rank)] <= int(blocks(seq).size()) * shape_.block_size,
            "KV shard of sequence ", seq, " holds ", s.owned[size_t(rank)], " positions beyond its reserved blocks");
  auto& ranges = s.ranges[size_t(rank)];
  if (!ranges.empty() && ranges.back()[0] + ranges.back()[1] == pos_begin)
    ranges.back()[1] += n;
  else
    ranges.push_back({pos_begin, n});
}

int32_t KvCache::local_slot(int seq, int local_idx) const {
  const auto& blocks = this->blocks(seq);
  int b = local_idx / shape_.block_size;
  CPI_CHECK(b < int(blocks.size()), "local position ", local_idx, " not reserved in KV sequence ", seq);
  return blocks[b] * shape_.block_size + local_idx % shape_.block_size;
}

int32_t KvCache::slot(int seq, int pos) const {
  const auto& blocks = this->blocks(seq);
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

std::vector<CachedPage> KvCache::cached_pages(int seq, int n_pages) const {
  const Seq& s = seqs_.at(seq);
  const int bs = shape_.block_size;
  CPI_CHECK(n_pages >= 0 && int64_t(n_pages) * bs <= s.length, "cached_pages: ", n_pages, " pages of a KV sequence of ",
            s.length, " positions");
  std::vector<CachedPage> out(static_cast<size_t>(n_pages));
  if (!sharded()) {
    for (int g = 0; g < n_pages; ++g) out[size_t(g)].refs = {s.pages[0].at(size_t(g))};
    return out;
  }
  std::vector<int32_t> owner(size_t(n_pages) * bs, -1);
  for (int r = 0; r < shard_size_; ++r)
    for (const auto& [begin, n] : s.ranges[size_t(r)])
      for (int32_t p = begin; p < std::min<int32_t>(begin + n, int32_t(owner.size())); ++p) owner[size_t(p)] = r;
  std::vector<int> count(size_t(shard_size_), 0);  // each rank's positions before the page
  for (int g = 0; g < n_pages; ++g) {
    CachedPage& page = out[size_t(g)];
    page.tag.assign(owner.begin() + int64_t(g) * bs, owner.begin() + int64_t(g + 1) * bs);
    std::vector<int> after = count;
    for (int32_t r : page.tag) {
      CPI_CHECK(r >= 0, "KV sequence ", seq, ": a position below its length has no owner");
      ++after[size_t(r)];
    }
    for (int r = 0; r < shard_size_; ++r) {
      const std::vector<int32_t>& pages = s.pages[size_t(r)];
      const int end = after[size_t(r)] / bs + (after[size_t(r)] % bs ? 1 : 0);
      CPI_CHECK(end <= int(pages.size()), "KV sequence ", seq, ": rank ", r, " holds fewer pages than positions");
      for (int j = count[size_t(r)] / bs; j < end; ++j) page.refs.push_back(page_ref(r, pages[size_t(j)]));
    }
    count = std::move(after);
  }
  return out;
}

KvCache::Adoption KvCache::adoption(std::span<const CachedPage* const> path) const {
  Adoption a;
  const int bs = shape_.block_size;
  a.n_tokens = int(path.size()) * bs;
  if (!sharded()) {
    for (const CachedPage* page : path) {
      CPI_CHECK(page->tag.empty() && page->refs.size() == 1, "a replicated KV cache adopts one block per page");
      a.shares.push_back({0, page->refs[0]});
    }
    return a;
  }
  a.owned.assign(size_t(shard_size_), 0);
  std::vector<int32_t> tail(size_t(shard_size_), -1);  // each rank's partly filled block so far
  for (const CachedPage* page : path) {
    CPI_CHECK(int(page->tag.size()) == bs, "a cached page of another KV layout (", page->tag.size(), " owners for ", bs,
              " positions)");
    std::vector<int> after = a.owned;
    for (int32_t r : page->tag) {
      CPI_CHECK(r >= 0 && r < shard_size_, "a cached page owned by rank ", r, " of ", shard_size_);
      if (!a.runs.empty() && a.runs.back()[0] == r)
        ++a.runs.back()[1];
      else
        a.runs.push_back({r, 1});
      ++after[size_t(r)];
    }
    size_t i = 0;  // refs are grouped by rank in rank order
    for (int r = 0; r < shard_size_; ++r) {
      const int n_full = after[size_t(r)] / bs - a.owned[size_t(r)] / bs;
      const int n_refs = n_full + (after[size_t(r)] % bs ? 1 : 0);
      for (int k = 0; k < n_refs; ++k, ++i) {
        CPI_CHECK(i < page->refs.size() && ref_rank(page->refs[i]) == r,
                  "a cached page's blocks do not match its owners");
        if (k < n_full)
          a.shares.push_back({r, ref_block(page->refs[i])});
        else
          tail[size_t(r)] = ref_block(page->refs[i]);
      }
      if (after[size_t(r)] % bs == 0) tail[size_t(r)] = -1;
    }
    CPI_CHECK(i == page->refs.size(), "a cached page's blocks do not match its owners");
    a.owned = std::move(after);
  }
  for (int r = 0; r < shard_size_; ++r)
    if (a.owned[size_t(r)] % bs) a.tails.push_back({r, tail[size_t(r)], a.owned[size_t(r)] % bs});
  return a;
}

int KvCache::blocks_to_adopt(const Adoption& a, int n_tokens) const {
  const int bs = shape_.block_size;
  auto pages = [bs](int64_t n) { return static_cast<int>((n + bs - 1) / bs); };
  if (!sharded()) return std::max(0, pages(n_tokens) - int(a.shares.size()));
  int most = 0;
  for (int r = 0; r < shard_size_; ++r) {
    const int owned = a.owned[size_t(r)];
    // The copied tail, then what growing from a.n_tokens to n_tokens may add.
    const int tail = owned % bs ? 1 : 0;
    most = std::max(most, tail + std::max(0, pages(owned + shard_bound(n_tokens - a.n_tokens)) - pages(owned)));
  }
  return most;
}

}  // namespace cpinfer
