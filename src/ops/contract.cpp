#include "ops/contract.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

namespace cpinfer::contract {

namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }
bool is_index(DType t) { return t == DType::I32 || t == DType::I64; }

bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i)
    if (a.shape[i] != b.shape[i]) return false;
  return true;
}

void float_tensor(const Tensor& t, const char* op, const char* name) {
  CPI_CHECK(t.defined(), op, ": tensor '", name, "' is undefined");
  for (int i = 0; i < t.ndim; ++i)
    CPI_CHECK(t.shape[i] >= 0, op, ": tensor '", name, "' has a negative dimension ", t.shape_str());
  CPI_CHECK(is_float(t.dtype), op, ": tensor '", name, "' has dtype ", dtype_name(t.dtype), ", expected a float type");
}

// A weight of a linear layer or expert: a float tensor without scales, or F8E4M3 [N, K] codes with
// F32 scales [ceil(N / kFp8Block), ceil(K / kFp8Block)].
void weight_tensor(const Weight& w, const char* op, const char* name) {
  if (w.dtype != DType::F8E4M3) {
    float_tensor(w, op, name);
    CPI_CHECK(!w.scale.defined(), op, ": weight '", name, "' is ", dtype_name(w.dtype),
              " but has FP8 block scales (only F8_E4M3 weights take them)");
    return;
  }
  CPI_CHECK(w.ndim == 2 && w.dim(0) >= 0 && w.dim(1) >= 0, op, ": FP8 weight '", name, "' ", w.shape_str(),
            " must be [N, K]");
  const int64_t sn = (w.dim(0) + kFp8Block - 1) / kFp8Block, sk = (w.dim(1) + kFp8Block - 1) / kFp8Block;
  const Tensor& s = w.scale;
  CPI_CHECK(s.defined() && s.dtype == DType::F32 && s.ndim == 2 && s.dim(0) == sn && s.dim(1) == sk, op,
            ": FP8 weight '", name, "' ", w.shape_str(), " needs F32 block scales [", sn, ", ", sk, "] (one per ",
            kFp8Block, "x", kFp8Block, " block), got ",
            s.defined() ? s.shape_str() + " " + std::string(dtype_name(s.dtype)) : std::string("none"));
}

void shapes_equal(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  CPI_CHECK(same_shape(a, b), op, ": '", an, "' ", a.shape_str(), " and '", bn, "' ", b.shape_str(),
            " must have the same shape");
}

void dtypes_equal(const Tensor& a, const Tensor& b, const char* op, const char* an, const char* bn) {
  CPI_CHECK(a.dtype == b.dtype, op, ": '", an, "' is ", dtype_name(a.dtype), " but '", bn, "' is ",
            dtype_name(b.dtype));
}

void cache_layer(const KvLayer& cache, const char* op) {
  float_tensor(cache.k, op, "cache.k");
  float_tensor(cache.v, op, "cache.v");
  CPI_CHECK(cache.k.ndim == 4, op, ": cache.k ", cache.k.shape_str(), " must be [n_blocks, block_size, Hkv, D]");
  shapes_equal(cache.k, cache.v, op, "cache.k", "cache.v");
  CPI_CHECK(cache.k.dim(1) > 0, op, ": cache block size must be positive, got ", cache.k.shape_str());
}

}  // namespace

void qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                  const Tensor& positions, const RopeParams& rope) {
  const char* op = "qk_norm_rope";
  CPI_CHECK(q.ndim == 3 && k.ndim == 3 && q.dim(0) == k.dim(0) && q.dim(2) == k.dim(2), op, ": q ", q.shape_str(),
            " and k ", k.shape_str(), " must be [T, Hq, D] and [T, Hkv, D]");
  CPI_CHECK(is_float(q.dtype) && q.dtype == k.dtype, op, ": q and k must share one float dtype, got ",
            dtype_name(q.dtype), " and ", dtype_name(k.dtype));
  const int64_t d = q.dim(2);
  CPI_CHECK(d % 2 == 0, op, ": head_dim ", d, " must be even for rotate_half RoPE");
  CPI_CHECK(static_cast<int64_t>(rope.inv_freq.size()) == d / 2, op, ": rope.inv_freq has ", rope.inv_freq.size(),
            " entries, head_dim ", d, " needs ", d / 2);
  CPI_CHECK(q_norm_w.defined() == k_norm_w.defined(), op, ": give both q/k norm weights or neither");
  if (q_norm_w.defined()) {
    CPI_CHECK(q_norm_w.numel() == d && k_norm_w.numel() == d, op, ": norm weights ", q_norm_w.shape_str(), " / ",
              k_norm_w.shape_str(), " must have head_dim = ", d, " elements");
    CPI_CHECK(is_float(q_norm_w.dtype) && is_float(k_norm_w.dtype), op, ": norm weights must be float");
  }
  CPI_CHECK(std::isfinite(eps) && eps >= 0.0f, op, ": eps must be finite and >= 0, got ", eps);
  CPI_CHECK((positions.dtype == DType::I32 || positions.dtype == DType::I64) && positions.ndim == 1 &&
                positions.dim(0) == q.dim(0),
            op, ": positions ", positions.shape_str(), " ", dtype_name(positions.dtype), " must be [T = ", q.dim(0),
            "] I32 (I64 where the back-end reads them on the host)");
}

void embedding(const Tensor& table, const Tensor& ids, const Tensor& out) {
  const char* op = "embedding";
  float_tensor(table, op, "table");
  float_tensor(out, op, "out");
  CPI_CHECK(ids.defined() && is_index(ids.dtype) && ids.ndim == 1, op, ": ids ", ids.shape_str(), " ",
            dtype_name(ids.dtype), " must be [T] I32");
  CPI_CHECK(table.ndim == 2 && out.ndim == 2 && out.dim(0) == ids.dim(0) && out.dim(1) == table.dim(1), op, ": table ",
            table.shape_str(), ", ids ", ids.shape_str(), " and out ", out.shape_str(),
            " do not match (want table [V, H], ids [T], out [T, H])");
}

void linear(const Tensor& a, const Weight& w, const Tensor& out) {
  const char* op = "linear";
  float_tensor(a, op, "a");
  weight_tensor(w, op, "w");
  float_tensor(out, op, "out");
  CPI_CHECK(a.ndim >= 1 && out.ndim >= 1 && w.ndim == 2 && a.cols() == w.dim(1) && out.rows() == a.rows() &&
                out.cols() == w.dim(0),
            op, ": a ", a.shape_str(), ", w ", w.shape_str(), " and out ", out.shape_str(),
            " do not match (want a [M, K], w [N, K], out [M, N])");
}

void silu_mul(const Tensor& gate, const Tensor& up, const Tensor& out) {
  const char* op = "silu_mul";
  float_tensor(gate, op, "gate");
  float_tensor(up, op, "up");
  float_tensor(out, op, "out");
  shapes_equal(gate, up, op, "gate", "up");
  shapes_equal(gate, out, op, "gate", "out");
  dtypes_equal(gate, up, op, "gate", "up");
  dtypes_equal(gate, out, op, "gate", "out");
}

void add(const Tensor& a, const Tensor& b) {
  const char* op = "add";
  float_tensor(a, op, "a");
  float_tensor(b, op, "b");
  shapes_equal(a, b, op, "a", "b");
  dtypes_equal(a, b, op, "a", "b");
}

void sample(const Tensor& logits, const std::vector<SampleRow>& rows, const Tensor& ids) {
  const char* op = "sample";
  CPI_CHECK(
      logits.defined() && logits.dtype == DType::F32 && logits.ndim == 2 && logits.dim(0) >= 0 && logits.dim(1) >= 0,
      op, ": logits ", logits.shape_str(), " ", dtype_name(logits.dtype), " must be [R, V] F32");
  const int64_t r_count = logits.dim(0), v = logits.dim(1);
  CPI_CHECK(static_cast<int64_t>(rows.size()) == r_count, op, ": ", rows.size(), " SampleRows for ", r_count,
            " rows of logits ", logits.shape_str());
  CPI_CHECK(ids.defined() && ids.dtype == DType::I32 && ids.numel() == r_count, op, ": ids ", ids.shape_str(), " ",
            dtype_name(ids.dtype), " must be I32 with R = ", r_count, " entries");
  CPI_CHECK(r_count == 0 || v > 0, op, ": logits ", logits.shape_str(), " has an empty vocabulary");
  for (size_t i = 0; i < rows.size(); ++i) sample_row(rows[i], i, op);
}

void sample_row(const SampleRow& r, size_t row_index, const char* op) {
  CPI_CHECK(!std::isnan(r.temperature) && r.temperature < std::numeric_limits<float>::infinity(), op, ": row ",
            row_index, ": temperature must be finite, got ", r.temperature);
  CPI_CHECK(!std::isnan(r.top_p) && r.top_p > 0.0f, op, ": row ", row_index, ": top_p must be > 0 (>= 1: off), got ",
            r.top_p);
  CPI_CHECK(!std::isnan(r.min_p) && r.min_p <= 1.0f, op, ": row ", row_index, ": min_p must be <= 1 (<= 0: off), got ",
            r.min_p);
}

void rms_norm(const char* op, const Tensor& x, const Tensor& w, float eps, const Tensor& out, const Tensor* residual) {
  float_tensor(x, op, "x");
  float_tensor(w, op, "w");
  float_tensor(out, op, "out");
  shapes_equal(x, out, op, "x", "out");
  dtypes_equal(x, out, op, "x", "out");
  CPI_CHECK(x.ndim >= 1 && w.numel() == x.cols(), op, ": weight 'w' ", w.shape_str(), " must have ",
            x.ndim >= 1 ? x.cols() : 0, " elements (the last dim of x ", x.shape_str(), ")");
  CPI_CHECK(std::isfinite(eps) && eps >= 0.0f, op, ": eps must be finite and >= 0, got ", eps);
  if (residual) {
    float_tensor(*residual, op, "residual");
    shapes_equal(*residual, x, op, "residual", "x");
    dtypes_equal(*residual, x, op, "residual", "x");
  }
}

void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, const KvLayer& cache) {
  const char* op = "kv_store";
  float_tensor(k, op, "k");
  float_tensor(v, op, "v");
  cache_layer(cache, op);
  CPI_CHECK(k.ndim == 3, op, ": k ", k.shape_str(), " must be [T, Hkv, D]");
  shapes_equal(k, v, op, "k", "v");
  dtypes_equal(k, v, op, "k", "v");
  CPI_CHECK(k.dim(1) == cache.k.dim(2) && k.dim(2) == cache.k.dim(3), op, ": k ", k.shape_str(),
            " must be [T, Hkv, D] with the cache's Hkv and D (cache ", cache.k.shape_str(), ")");
  CPI_CHECK(slots.defined() && is_index(slots.dtype) && slots.ndim == 1 && slots.dim(0) == k.dim(0), op, ": slots ",
            slots.shape_str(), " ", dtype_name(slots.dtype), " must be [T = ", k.dim(0), "] I32 (one slot per token)");
}

void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, const Tensor& out,
               const Tensor& lse, bool check_table_entries) {
  const char* op = "attention";
  float_tensor(q, op, "q");
  float_tensor(out, op, "out");
  CPI_CHECK(q.ndim == 3, op, ": q ", q.shape_str(), " must be [T, Hq, D]");
  shapes_equal(q, out, op, "q", "out");
  dtypes_equal(q, out, op, "q", "out");
  cache_layer(cache, op);
  const int64_t T = q.dim(0), Hq = q.dim(1), D = q.dim(2);
  const int64_t n_cache_blocks = cache.k.dim(0), bs = cache.k.dim(1), Hkv = cache.k.dim(2);
  CPI_CHECK(cache.k.dim(3) == D, op, ": cache head_dim ", cache.k.dim(3), " (", cache.k.shape_str(),
            ") differs from q's ", D, " (", q.shape_str(), ")");
  CPI_CHECK(Hkv > 0 && Hq % Hkv == 0, op, ": q heads ", Hq, " must be a multiple of cache kv heads ", Hkv);
  CPI_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  if (lse.defined())
    CPI_CHECK(lse.dtype == DType::F32 && lse.ndim == 2 && lse.dim(0) == T && lse.dim(1) == Hq, op, ": lse ",
              lse.shape_str(), " ", dtype_name(lse.dtype), " must be [", T, ", ", Hq, "] F32");

  const int32_t mbps = batch.max_blocks_per_seq;
  int64_t n_seqs = 0;
  if (!batch.block_table.empty()) {
    CPI_CHECK(mbps > 0 && batch.block_table.size() % static_cast<size_t>(mbps) == 0, op, ": block table of ",
              batch.block_table.size(), " entries is not n_seqs x max_blocks_per_seq (", mbps, ")");
    n_seqs = static_cast<int64_t>(batch.block_table.size()) / mbps;
  }
  std::vector<uint8_t> covered(static_cast<size_t>(T), 0);
  for (size_t bi = 0; bi < batch.blocks.size(); ++bi) {
    const AttnBlock& b = batch.blocks[bi];
    CPI_CHECK(b.q_begin >= 0 && b.q_len >= 0 && int64_t{b.q_begin} + b.q_len <= T && b.pos_begin >= 0, op, ": block ",
              bi, " (q_begin ", b.q_begin, ", q_len ", b.q_len, ", pos_begin ", b.pos_begin, ") does not fit q with ",
              T, " rows");
    CPI_CHECK(b.kv_begin >= 0 && b.kv_begin <= b.kv_end, op, ": block ", bi, " has the key range [", b.kv_begin, ", ",
              b.kv_end, "); want 0 <= kv_begin <= kv_end");
    if (b.q_len == 0) continue;
    CPI_CHECK(b.seq >= 0 && b.seq < n_seqs, op, ": block ", bi, " names sequence ", b.seq, " but the block table has ",
              n_seqs, " rows");
    // Only the pages of the keys the block reads must be in the table.
    const int64_t kv_len = std::min<int64_t>(b.kv_end, int64_t{b.pos_begin} + b.q_len);
    const int64_t n_pages = (kv_len + bs - 1) / bs;
    CPI_CHECK(n_pages <= mbps, op, ": block ", bi, " needs ", kv_len, " cached positions = ", n_pages,
              " cache blocks of ", bs, " but the block table has ", mbps, " per sequence");
    if (check_table_entries) {
      for (int64_t p = b.kv_begin / bs; p < n_pages; ++p) {
        const int32_t cb = batch.block_table[static_cast<size_t>(b.seq * int64_t{mbps} + p)];
        CPI_CHECK(cb >= 0 && cb < n_cache_blocks, op, ": block_table[", b.seq, ", ", p, "] = ", cb,
                  " is not a cache block in [0, ", n_cache_blocks, ")");
      }
    }
    for (int32_t i = 0; i < b.q_len; ++i) {
      uint8_t& c = covered[static_cast<size_t>(b.q_begin + i)];
      CPI_CHECK(!c, op, ": query row ", b.q_begin + i, " belongs to two blocks (block ", bi, " overlaps another)");
      c = 1;
    }
  }
}

void attention_merge(const Tensor& out, const Tensor& lse, const Tensor& out2, const Tensor& lse2) {
  const char* op = "attention_merge";
  float_tensor(out, op, "out");
  float_tensor(out2, op, "out2");
  CPI_CHECK(out.ndim == 3, op, ": out ", out.shape_str(), " must be [T, Hq, D]");
  shapes_equal(out, out2, op, "out", "out2");
  dtypes_equal(out, out2, op, "out", "out2");
  CPI_CHECK(lse.defined() && lse2.defined() && lse.dtype == DType::F32 && lse2.dtype == DType::F32, op,
            ": lse and lse2 must be F32");
  CPI_CHECK(lse.ndim == 2 && lse.dim(0) == out.dim(0) && lse.dim(1) == out.dim(1), op, ": lse ", lse.shape_str(),
            " must be [", out.dim(0), ", ", out.dim(1), "] to match out ", out.shape_str());
  shapes_equal(lse, lse2, op, "lse", "lse2");
}

void moe_route(const Tensor& logits, int top_k, const Tensor& ids, const Tensor& weights) {
  const char* op = "moe_route";
  float_tensor(logits, op, "logits");
  CPI_CHECK(logits.ndim == 2, op, ": logits ", logits.shape_str(), " must be [T, E]");
  const int64_t T = logits.dim(0), E = logits.dim(1);
  CPI_CHECK(top_k >= 1 && top_k <= E, op, ": top_k = ", top_k, " must be in [1, ", E, "] (the number of experts)");
  CPI_CHECK(ids.defined() && ids.dtype == DType::I32 && ids.ndim == 2 && ids.dim(0) == T && ids.dim(1) == top_k, op,
            ": ids ", ids.shape_str(), " ", dtype_name(ids.dtype), " must be [", T, ", ", top_k, "] I32");
  CPI_CHECK(weights.defined() && weights.dtype == DType::F32 && weights.ndim == 2 && weights.dim(0) == T &&
                weights.dim(1) == top_k,
            op, ": weights ", weights.shape_str(), " ", dtype_name(weights.dtype), " must be [", T, ", ", top_k,
            "] F32");
}

void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                 const Tensor& out) {
  const char* op = "moe_experts";
  float_tensor(x, op, "x");
  float_tensor(out, op, "out");
  CPI_CHECK(x.ndim == 2, op, ": x ", x.shape_str(), " must be [T, H]");
  shapes_equal(x, out, op, "x", "out");
  const int64_t T = x.dim(0), H = x.dim(1);
  CPI_CHECK(ids.defined() && ids.dtype == DType::I32 && ids.ndim == 2 && ids.dim(0) == T, op, ": ids ", ids.shape_str(),
            " ", dtype_name(ids.dtype), " must be [", T, ", K] I32");
  CPI_CHECK(weights.defined() && weights.dtype == DType::F32 && same_shape(ids, weights), op, ": weights ",
            weights.shape_str(), " ", dtype_name(weights.dtype), " must be ", ids.shape_str(), " F32 like ids");
  CPI_CHECK(shard.n_experts > 0 && shard.first >= 0 && shard.count >= 0 && shard.first + shard.count <= shard.n_experts,
            op, ": expert shard [", shard.first, ", ", shard.first + shard.count, ") is not inside [0, ",
            shard.n_experts, ")");
  CPI_CHECK(shard.gate.size() == size_t(shard.count) && shard.up.size() == size_t(shard.count) &&
                shard.down.size() == size_t(shard.count),
            op, ": the shard holds ", shard.count, " experts but has ", shard.gate.size(), " gate, ", shard.up.size(),
            " up and ", shard.down.size(), " down matrices");
  const int64_t I = shard.count > 0 && shard.gate[0].ndim == 2 ? shard.gate[0].dim(0) : 0;
  for (int32_t e = 0; e < shard.count; ++e) {
    const Weight &g = shard.gate[size_t(e)], &u = shard.up[size_t(e)], &d = shard.down[size_t(e)];
    weight_tensor(g, op, "gate");
    weight_tensor(u, op, "up");
    weight_tensor(d, op, "down");
    CPI_CHECK(g.ndim == 2 && g.dim(0) == I && g.dim(1) == H && u.ndim == 2 && u.dim(0) == I && u.dim(1) == H &&
                  d.ndim == 2 && d.dim(0) == H && d.dim(1) == I,
              op, ": expert ", shard.first + e, " has gate ", g.shape_str(), ", up ", u.shape_str(), ", down ",
              d.shape_str(), "; expected [", I, ", ", H, "], [", I, ", ", H, "], [", H, ", ", I, "]");
  }
}

namespace {
void rows_op(const char* op, const Tensor& src, const Tensor& idx, const Tensor& out, const Tensor& indexed) {
  CPI_CHECK(src.defined() && out.defined(), op, ": src and out must be defined");
  bool same_row = src.ndim >= 1 && src.ndim == out.ndim;
  for (int i = 1; same_row && i < src.ndim; ++i) same_row = src.dim(i) == out.dim(i);
  CPI_CHECK(same_row, op, ": src ", src.shape_str(), " and out ", out.shape_str(),
            " must be [rows, ...] with one row shape");
  dtypes_equal(src, out, op, "src", "out");
  CPI_CHECK(idx.defined() && is_index(idx.dtype) && idx.ndim == 1 && idx.dim(0) == indexed.dim(0), op, ": idx ",
            idx.shape_str(), " ", dtype_name(idx.dtype), " must be [", indexed.dim(0), "] I32, one index per row");
}
}  // namespace

Tensor as_rows(const Tensor& t) {
  int64_t per_row = 1;
  for (int i = 1; i < t.ndim; ++i) per_row *= t.dim(i);
  return Tensor(t.data, t.dtype, {t.dim(0), per_row}, t.device);
}

void gather_rows(const Tensor& src, const Tensor& idx, const Tensor& out) {
  rows_op("gather_rows", src, idx, out, out);
}

void scatter_rows(const Tensor& src, const Tensor& idx, const Tensor& out) {
  rows_op("scatter_rows", src, idx, out, src);
}

void convert(const Tensor& src, const Tensor& dst) {
  const char* op = "convert";
  CPI_CHECK(src.defined() && dst.defined(), op, ": src and dst must be defined");
  CPI_CHECK(src.numel() == dst.numel(), op, ": src ", src.shape_str(), " and dst ", dst.shape_str(),
            " have different element counts");
  CPI_CHECK(src.dtype == dst.dtype || (is_float(src.dtype) && is_float(dst.dtype)), op, ": cannot convert ",
            dtype_name(src.dtype), " to ", dtype_name(dst.dtype), " (only between F32, F16 and BF16)");
}

}  // namespace cpinfer::contract
