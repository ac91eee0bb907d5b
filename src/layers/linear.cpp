#include "layers/linear.h"

#include <cstring>

#include "core/check.h"
#include "parallel/exchange.h"

namespace cpinfer {

namespace {
std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

std::vector<int64_t> LinearShard::local_shape(const std::vector<int64_t>& full) const {
  if (split == Split::None) return full;
  CPI_CHECK(full.size() == 2, "a split linear weight must be 2-D, got ", shape_str(full));
  const size_t d = split == Split::Rows ? 0 : 1;
  CPI_CHECK(first >= 0 && count >= 0 && first + count <= full[d], "shard ", describe(full), " is outside the weight");
  std::vector<int64_t> s = full;
  s[d] = count;
  return s;
}

std::string LinearShard::describe(const std::vector<int64_t>& full) const {
  if (split == Split::None) return "all of " + shape_str(full);
  return std::string(split == Split::Rows ? "rows [" : "columns [") + std::to_string(first) + ", " +
         std::to_string(first + count) + ") of " + shape_str(full);
}

AttnHeadShard attn_head_shard(int64_t n_heads, int64_t n_kv_heads, TpShard tp) {
  const int64_t T = tp.size;
  CPI_CHECK(T >= 1 && tp.rank >= 0 && tp.rank < T, "attention TP rank ", tp.rank, " outside a group of ", T);
  CPI_CHECK(n_heads >= 1 && n_kv_heads >= 1 && n_heads % n_kv_heads == 0, "attention with ", n_heads, " q heads and ",
            n_kv_heads, " kv heads: the q heads must be a multiple of the kv heads");
  CPI_CHECK(n_heads % T == 0, "attention tensor parallelism over ", T, " ranks (--tp-size / --attn-cp-size) needs ",
            "num_attention_heads divisible by ", T, "; the model has ", n_heads, " q heads (", n_kv_heads,
            " kv heads)");
  if (T > n_kv_heads) {
    CPI_CHECK(T % n_kv_heads == 0, "attention tensor parallelism over ", T, " ranks: with more ranks than kv heads (",
              n_kv_heads, ") each kv head is replicated, which needs the TP size to be a multiple of ", n_kv_heads);
  } else {
    CPI_CHECK(n_kv_heads % T == 0, "attention tensor parallelism over ", T, " ranks needs num_key_value_heads ",
              "divisible by ", T, "; the model has ", n_kv_heads, " kv heads (", n_heads, " q heads)");
  }
  AttnHeadShard s;
  s.q_count = n_heads / T;
  s.q_first = tp.rank * s.q_count;
  if (T > n_kv_heads) {
    s.kv_replicas = static_cast<int>(T / n_kv_heads);
    s.kv_count = 1;
    s.kv_first = tp.rank / s.kv_replicas;
  } else {
    s.kv_count = n_kv_heads / T;
    s.kv_first = tp.rank * s.kv_count;
  }
  // The rank's q heads read exactly its kv heads (GQA groups do not straddle ranks).
  const int64_t group = n_heads / n_kv_heads;
  CPI_CHECK(s.q_first / group == s.kv_first && (s.q_first + s.q_count - 1) / group == s.kv_first + s.kv_count - 1,
            "attention TP: q heads of rank ", tp.rank, " do not map onto its kv heads");
  return s;
}

LinearShard shard_rows(int64_t first, int64_t count, int64_t granule) {
  return LinearShard{LinearShard::Split::Rows, first * granule, count * granule};
}
LinearShard shard_cols(int64_t first, int64_t count, int64_t granule) {
  return LinearShard{LinearShard::Split::Cols, first * granule, count * granule};
}

int64_t even_part(int64_t n, TpShard tp, const std::string& what) {
  CPI_CHECK(n % tp.size == 0, what, " is ", n, ", which ", tp.size, " attention TP ranks cannot split evenly");
  return n / tp.size;
}

const void* slice_host(const LinearShard& s, const void* full, int64_t n, int64_t k, size_t elem_bytes,
                       std::vector<uint8_t>& copy) {
  const auto* src = static_cast<const uint8_t*>(full);
  if (s.split == LinearShard::Split::None) return full;
  (void)s.local_shape({n, k});  // range check
  const size_t row_bytes = size_t(k) * elem_bytes;
  if (s.split == LinearShard::Split::Rows) return src + size_t(s.first) * row_bytes;
  const size_t part = size_t(s.count) * elem_bytes;
  copy.resize(size_t(n) * part);
  for (int64_t r = 0; r < n; ++r)
    std::memcpy(copy.data() + size_t(r) * part, src + size_t(r) * row_bytes + size_t(s.first) * elem_bytes, part);
  return copy.data();
}

void check_fp8_slice(const LinearShard& s, int64_t n, int64_t k, const std::string& name) {
  if (s.split == LinearShard::Split::None) return;
  const int64_t dim = s.split == LinearShard::Split::Rows ? n : k;
  const bool aligned = s.first % kFp8Block == 0 && (s.count % kFp8Block == 0 || s.first + s.count == dim);
  CPI_CHECK(aligned, "FP8 weight '", name, "' cannot be split for attention tensor parallelism: this rank's ",
            s.describe({n, k}), " does not fall on the ", kFp8Block, "x", kFp8Block,
            " scale blocks (a block shared by two ranks has one scale). Use a TP size whose slices are multiples of ",
            kFp8Block, " (e.g. heads of head_dim 128), or --fp8-weights bf16 to dequantize at load");
}

std::vector<float> slice_fp8_scales(const LinearShard& s, const std::vector<float>& full, int64_t n, int64_t k,
                                    const std::string& name) {
  const int64_t sn = ceil_div(n, kFp8Block), sk = ceil_div(k, kFp8Block);
  CPI_CHECK(int64_t(full.size()) == sn * sk, "FP8 scales of '", name, "': ", full.size(), " values for ", sn, "x", sk,
            " blocks");
  if (s.split == LinearShard::Split::None) return full;
  check_fp8_slice(s, n, k, name);
  const int64_t b0 = s.first / kFp8Block, nb = ceil_div(s.count, kFp8Block);
  std::vector<float> out;
  if (s.split == LinearShard::Split::Rows) {
    out.assign(full.begin() + b0 * sk, full.begin() + (b0 + nb) * sk);
  } else {
    out.reserve(size_t(sn * nb));
    for (int64_t r = 0; r < sn; ++r) out.insert(out.end(), full.begin() + r * sk + b0, full.begin() + r * sk + b0 + nb);
  }
  return out;
}

void RowParallelLinear::partial(Backend& be, const Tensor& x, Tensor y) const {
  if (x.rows() > 0) be.linear(x, weight, y);
}

void RowParallelLinear::reduce(Backend& be, Tensor y, Communicator* group) {
  if (group == nullptr || group->size() == 1 || y.numel() == 0) return;
  sync_for(be, *group);
  group->all_reduce_sum(y.data, size_t(y.numel()), y.dtype);
}

}  // namespace cpinfer
