// Linear layers split over an attention tensor-parallel (TP) group, as Megatron-LM lays them out:
// - ColumnParallelLinear: rank t holds a range of the output features (rows of W [N, K]) and
//   computes those outputs of y = x·Wᵀ; no communication.
// - RowParallelLinear: rank t holds a range of the input features (columns of W) and computes a
//   partial y over them; the TP group sums the partials (all-reduce).
// Each layer knows its shard and cuts its own slice out of the full checkpoint (or random) tensor
// (slice_host, slice_fp8_scales): a row range is a contiguous, zero-copy part of the row-major
// tensor; a column range is copied. Attention splits by whole heads (AttnHeadShard), the dense MLP
// by equal ranges of its width.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "ops/backend.h"

namespace cpinfer {

// A rank's place in the attention-TP group (size 1: no TP, every layer whole).
struct TpShard {
  int rank = 0, size = 1;
};

// Which part of W [N, K] a rank holds: rows [first, first + count) (Split::Rows, column-parallel),
// columns [first, first + count) (Split::Cols, row-parallel), or all of it (Split::None).
struct LinearShard {
  enum class Split { None, Rows, Cols };
  Split split = Split::None;
  int64_t first = 0, count = 0;

  // The rank's shape of a weight whose full shape is `full` ([N, K]).
  std::vector<int64_t> local_shape(const std::vector<int64_t>& full) const;
  // "rows [0, 64) of [128, 64]": for messages.
  std::string describe(const std::vector<int64_t>& full) const;
};

// The attention heads of TP rank `tp.rank`: q heads [q_first, q_first + q_count) and the kv heads
// they read, [kv_first, kv_first + kv_count). When the group is larger than the kv head count, each
// kv head is held by kv_replicas = T / Hkv ranks (SGLang and vLLM do the same). Throws, naming the
// sizes, when the heads cannot be split: Hq % T != 0, or T <= Hkv and Hkv % T != 0, or T > Hkv and
// T % Hkv != 0.
struct AttnHeadShard {
  int64_t q_first = 0, q_count = 0, kv_first = 0, kv_count = 0;
  int kv_replicas = 1;
};
AttnHeadShard attn_head_shard(int64_t n_heads, int64_t n_kv_heads, TpShard tp);

// Rows (or columns) [first * granule, (first + count) * granule): `count` units of `granule`.
LinearShard shard_rows(int64_t first, int64_t count, int64_t granule = 1);
LinearShard shard_cols(int64_t first, int64_t count, int64_t granule = 1);
// Equal ranges of a dimension of `n` (the dense MLP's width); throws naming `what` unless
// n % tp.size == 0.
int64_t even_part(int64_t n, TpShard tp, const std::string& what);

// The shard's part of a full row-major [N, K] tensor of `elem_bytes` elements at `full`: a row
// range is a pointer into `full` (no copy); a column range is copied into `copy` and the result
// points there. Split::None returns `full`.
const void* slice_host(const LinearShard& s, const void* full, int64_t n, int64_t k, size_t elem_bytes,
                       std::vector<uint8_t>& copy);

// The FP8 block scales of the shard: `full` is [ceil(N / kFp8Block), ceil(K / kFp8Block)]
// row-major; returns the blocks of the slice, [ceil(count / kFp8Block), ...] or [..., ceil(count /
// kFp8Block)]. Throws, naming `name`, the slice and the block size, unless the slice starts on a
// block boundary and ends on one or at the end of the dimension (a block straddling two ranks has
// one scale for both halves, which neither rank can keep as its own block).
std::vector<float> slice_fp8_scales(const LinearShard& s, const std::vector<float>& full, int64_t n, int64_t k,
                                    const std::string& name);
// The same check alone (the loader asks before it reads a byte).
void check_fp8_slice(const LinearShard& s, int64_t n, int64_t k, const std::string& name);

// A linear layer's weight as this rank holds it, with its shard. `weight` is the slice (shape
// shard.local_shape(full_shape)), float or FP8 (codes + sliced block scales).
struct ParallelLinear {
  Weight weight;
  LinearShard shard;
  std::vector<int64_t> full_shape;  // [N, K] in the checkpoint
};

// y [T, count] = x [T, K] · W[first : first + count, :]ᵀ.
struct ColumnParallelLinear : ParallelLinear {
  void forward(Backend& be, const Tensor& x, Tensor y) const { be.linear(x, weight, y); }
};

// y [T, N] = Σ over the TP group of x [T, count] · W[:, first : first + count]ᵀ: partial() is this
// rank's term, reduce() the sum over `group` (nullptr or of size 1: nothing to sum). Every rank of
// the group calls reduce() with the same T. (Two calls, so that callers time the product and the
// sum apart.)
struct RowParallelLinear : ParallelLinear {
  void partial(Backend& be, const Tensor& x, Tensor y) const;
  static void reduce(Backend& be, Tensor y, Communicator* group);
};

}  // namespace cpinfer
