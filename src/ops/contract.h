// The op contract of ops/backend.h checked once, for every back-end: shapes, ranks, dtypes the
// interface allows and scalar arguments. A back-end calls the validator of an op first, then
// checks only what it alone cannot do ("supported?": e.g. a head_dim its kernels lack) and what
// needs its memory (index values on the host). Every failure throws cpinfer::Error naming the op
// and the argument.
#pragma once
#include <vector>

#include "ops/backend.h"

namespace cpinfer::contract {

// q [T, Hq, D], k [T, Hkv, D] of one float dtype; norm weights [D] float, or both undefined (RoPE
// only, no q/k norm); positions [T] I32 (I64 accepted for host-side back-ends); rope.inv_freq [D/2]; eps finite, >= 0;
// D even.
void qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                  const Tensor& positions, const RopeParams& rope);

// table [V, H] float; ids [T] I32 (I64 accepted for host-side back-ends); out [T, H] float.
void embedding(const Tensor& table, const Tensor& ids, const Tensor& out);

// a [.., K], w [N, K], out [.., N] with a's rows; a and out float; w a float tensor without scales,
// or F8E4M3 with F32 block scales [ceil(N / kFp8Block), ceil(K / kFp8Block)] (Weight).
void linear(const Tensor& a, const Weight& w, const Tensor& out);

// gate, up, out of one shape and float dtype.
void silu_mul(const Tensor& gate, const Tensor& up, const Tensor& out);

// a, b of one shape and float dtype.
void add(const Tensor& a, const Tensor& b);

// logits [R, V] F32 (V > 0 when R > 0); rows.size() == R, each row valid (sample_row); ids [R] I32.
void sample(const Tensor& logits, const std::vector<SampleRow>& rows, const Tensor& ids);
// Throws naming `op`, the row and the field when a parameter is NaN or out of range (temperature
// +inf, top_p <= 0, min_p > 1).
void sample_row(const SampleRow& r, size_t row_index, const char* op);

// x, out [.., H] of one shape and float dtype; w [H] float; eps finite, >= 0; residual (when given)
// the shape and dtype of x.
void rms_norm(const char* op, const Tensor& x, const Tensor& w, float eps, const Tensor& out,
              const Tensor* residual = nullptr);

// k, v [T, Hkv, D] of one float dtype; slots [T] I32 (I64 accepted for host-side back-ends); the
// cache's K and V [n_blocks, block_size > 0, Hkv, D] of one shape, float.
void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, const KvLayer& cache);

// q, out [T, Hq, D] of one float dtype; the cache as for kv_store with Hq a multiple of Hkv and the
// same D; lse [T, Hq] F32 when defined; scale finite. The host copy of the batch: every block inside
// q's rows, no row in two blocks, pos_begin >= 0, 0 <= kv_begin <= kv_end; a block with queries
// names a row of the block table (n_seqs x max_blocks_per_seq entries) and the pages of the keys it
// reads fit that row. With check_table_entries those entries must also name cache blocks (O(entries):
// a back-end whose kernels treat a bad entry as an empty page may skip it on large tables).
void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, const Tensor& out,
               const Tensor& lse, bool check_table_entries);

// out, out2 [T, Hq, D] of one float dtype; lse, lse2 [T, Hq] F32.
void attention_merge(const Tensor& out, const Tensor& lse, const Tensor& out2, const Tensor& lse2);

// logits [T, E] float; 1 <= top_k <= E; ids [T, top_k] I32; weights [T, top_k] F32.
void moe_route(const Tensor& logits, int top_k, const Tensor& ids, const Tensor& weights);

// x, out [T, H] float (out may be wider, e.g. F32 partial sums); ids [T, K] I32; weights [T, K] F32; the shard [first,
// first + count) inside [0, n_experts) with count gate/up/down matrices, each a weight as for linear (float, or FP8
// with block scales), gate and up [I, H], down [H, I], one width I for every expert. (Expert ids are device data: a
// back-end checks them where it reads them.)
void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                 const Tensor& out);

// gather_rows: src [N, C], idx [M], out [M, C]; scatter_rows: src [M, C], idx [M], out [N, C] (a row
// may have several dims: C stands for all but the first, the same for src and out). src and out of
// one dtype; idx I32 (I64 accepted for host-side back-ends). (Index values are checked by the
// back-end, which alone can read them.)
void gather_rows(const Tensor& src, const Tensor& idx, const Tensor& out);
void scatter_rows(const Tensor& src, const Tensor& idx, const Tensor& out);
// A [rows, ...] tensor seen as [rows, elements per row]: the 2-D view the row ops work on.
Tensor as_rows(const Tensor& t);

// src and dst of one element count; dtypes equal, or both float (F32, F16, BF16).
void convert(const Tensor& src, const Tensor& dst);

}  // namespace cpinfer::contract
