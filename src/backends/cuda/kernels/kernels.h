// Host-side launchers of the CUDA kernels. The back-end (cuda_backend.cpp) validates shapes and
// dtypes first; a launcher only enqueues work on `stream` and returns the launch status
// (cudaErrorInvalidValue for a dtype it was not built for), which the caller turns into an error.
//
// This header is shared by .cu and .cpp files. nvcc's front end lacks std::source_location, so
// the .cu side never sees core/check.h or core/tensor.h: tensors cross as DevTensor, a plain copy
// of the view's pointer, dtype and shape.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "core/dtype.h"

namespace cpinfer::cuda {

struct DevTensor {
  void* data = nullptr;
  DType dtype = DType::F32;
  int ndim = 0;
  int64_t shape[4] = {0, 0, 0, 0};

  bool defined() const { return ndim > 0; }
  int64_t dim(int i) const { return shape[i < 0 ? ndim + i : i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return ndim == 0 ? 0 : n;
  }
  int64_t cols() const { return ndim == 0 ? 0 : shape[ndim - 1]; }
  int64_t rows() const { return ndim == 0 || cols() == 0 ? 0 : numel() / cols(); }
  size_t row_bytes() const { return static_cast<size_t>(cols()) * dtype_size(dtype); }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// The paged KV layer: k, v [n_blocks, block_size, Hkv, D].
struct DevKv {
  DevTensor k, v;
  int block_size() const { return static_cast<int>(k.dim(1)); }
};

// Attention metadata on the device (ops/backend.h AttnBatch; kDevAttnBlockFields equals its
// kAttnBlockFields, which this header cannot include).
inline constexpr int kDevAttnBlockFields = 6;
struct DevAttnBatch {
  // [n_blocks, 6]: q_begin, q_len, pos_begin, seq, kv_begin, kv_end. Query i of a block attends to
  // keys [kv_begin, min(kv_end, pos_begin + i + 1)); none: out 0, lse -inf.
  const int32_t* blocks = nullptr;
  int n_blocks = 0;
  const int32_t* block_table = nullptr;  // [n_seqs, max_blocks_per_seq]
  int max_blocks_per_seq = 0;
  int max_q_len = 0;
  int max_kv_len = 0;  // largest pos_begin + q_len (sizes the cuDNN path's plan)
};

// Programmatic dependent launch of the decode-path kernels (common.cuh launch_k): on for the
// process once a CudaBackend on a compute capability 9.0 GPU enables it (BackendOptions::pdl).
void set_programmatic_launch(bool on);
bool programmatic_launch();

// ---- row-wise element ops (elementwise.cu)
// bytes zero bytes at p: a kernel (launched as the decode path's others are, so it keeps their
// programmatic launch chain), or a memset for unaligned p.
cudaError_t launch_fill_zero(void* p, size_t bytes, cudaStream_t stream);
cudaError_t launch_embedding(const DevTensor& table, const DevTensor& ids, DevTensor out, cudaStream_t stream);
// When `residual` is defined: residual += x, then out = rms_norm(residual) * w; otherwise
// out = rms_norm(x) * w. x, residual and out share one dtype.
cudaError_t launch_rms_norm(DevTensor residual, const DevTensor& x, const DevTensor& w, float eps, DevTensor out,
                            cudaStream_t stream);
// A residual add + RMSNorm that a kernel runs on its own rows (the MoE weighted sum after its sum,
// the decode router before its GEMV): residual += row; out = rms_norm(residual) * w, rounded as
// launch_rms_norm rounds them (norm.cuh), so the outputs are bit for bit those of the two ops.
// residual and out [rows, cols] in the row's dtype, w [cols] any float dtype.
struct RowAddNorm {
  DevTensor residual, w, out;
  float eps = 0.0f;
};
cudaError_t launch_silu_mul(const DevTensor& gate, const DevTensor& up, DevTensor out, cudaStream_t stream);
cudaError_t launch_add(DevTensor a, const DevTensor& b, cudaStream_t stream);
cudaError_t launch_convert(const DevTensor& src, DevTensor dst, cudaStream_t stream);

// ---- skinny_gemm.cu: out [M, N] = a [M, K] · w [N, K]ᵀ for M <= kSkinnyMaxRows (decode
// projections): BF16 a (16-byte aligned, K <= 16384), fp32 accumulation, BF16 or F32 out; w BF16
// (K % 8 == 0) or FP8 (ops/backend.h Weight: codes F8E4M3 [N, K], K % 16 == 0, with `scale` F32
// [ceil(N/128), ceil(K/128)], W = code · scale; 1 byte read per weight), 16-byte aligned. Two rows
// at most on the widening kernels: at 8 rows the 30B-A3B decode step was 3.7 ms slower than on
// cuBLAS (H200).
inline constexpr int64_t kSkinnyMaxRows = 2;
// The quantized FP8 path (below) takes up to 16 rows: 8 are the columns of one m16n8k32 mma, two
// groups of 8 share each weight fragment, so 16 rows read the codes once, as 1 row does (there it
// replaces a quantizing kernel and cuBLASLt's block-scaled GEMM: docs/fp8.md).
inline constexpr int64_t kSkinnyFp8QuantizedMaxRows = 16;
bool skinny_gemm_supported(const DevTensor& a, const DevTensor& w, const DevTensor& out,
                           int64_t max_rows = kSkinnyMaxRows);
// scale: the FP8 weight's scales (nullptr for BF16). quantized (FP8 weights, compute capability >=
// 8.9, skinny_fp8_quantized_supported(K)): a's rows are quantized per 128 columns as prefill does
// and the products run on the tensor cores (kernels/fp8_mma.cuh); otherwise a stays BF16 and the
// codes are widened on the CUDA cores.
cudaError_t launch_skinny_gemm(const DevTensor& a, const DevTensor& w, const DevTensor* scale, DevTensor out,
                               cudaStream_t stream, bool quantized = false);
bool skinny_fp8_quantized_supported(int64_t k);
// out[i] = a · w[i]ᵀ for i < count <= kSkinnyMaxSegs in one launch (each pair as skinny_gemm_supported
// takes it, all weights of one dtype, all outs of one dtype; scale[i] for FP8 weights, else
// nullptr): q, k and v of a decode step.
inline constexpr int kSkinnyMaxSegs = 3;
cudaError_t launch_skinny_gemms(const DevTensor& a, const DevTensor* w, const DevTensor* scale, DevTensor* out,
                                int count, cudaStream_t stream, bool quantized = false);
// ---- fp8.cu: fine-grained FP8 weights (ops/backend.h Weight): codes F8E4M3 [N, K], scale F32
// [ceil(N/128), ceil(K/128)], W = code · scale. (The decode-sized product on the codes is
// skinny_gemm.cu's.)
// Activation quantization per (row, 128-column block) (DeepSeek-V3's dynamic scheme): s = amax /
// 448 (1 for an all-zero block), q = e4m3(x / s) rounded to nearest even, saturating. src [M, K]
// BF16 or F32, K % 128 == 0, 16-byte aligned; q [M, K] bytes. The scales of a group of `rows` rows
// (all M, or one MoE segment) form a block laid out by Fp8ActScales: row r_local (from 0), K block
// kb at fp8_act_scale_index(...). offsets == nullptr: one group of all M rows at scales[0..];
// offsets [count + 1] (the MoE segments: rows [offsets[e], offsets[e + 1]) belong to expert e):
// segment e's group at scales + fp8_segment_scale_base(offsets[e], e, K/128) (16-byte aligned);
// rows >= offsets[count] are skipped.
enum class Fp8ActScales : int {
  MMajor = 0,      // scales[kb · rows + r]: what the own wgmma kernels read
  MMajorPad4 = 1,  // scales[kb · round_up(rows, 4) + r]
  KMajor = 2,      // scales[r · K/128 + kb]
};
__host__ __device__ inline int64_t fp8_act_scale_ld(int64_t rows, Fp8ActScales l) {
  return l == Fp8ActScales::MMajorPad4 ? (rows + 3) / 4 * 4 : rows;
}
__host__ __device__ inline int64_t fp8_act_scale_index(int64_t r, int64_t kb, int64_t rows, int64_t kb_count,
                                                       Fp8ActScales l) {
  return l == Fp8ActScales::KMajor ? r * kb_count + kb : kb * fp8_act_scale_ld(rows, l) + r;
}
// Floats of one group of `rows` rows.
inline int64_t fp8_act_scale_floats(int64_t rows, int64_t kb_count) { return kb_count * ((rows + 3) / 4 * 4); }
cudaError_t launch_fp8_quantize_rows(const DevTensor& src, uint8_t* q, float* scales, const int32_t* offsets, int count,
                                     cudaStream_t stream, Fp8ActScales layout = Fp8ActScales::MMajor);
// Segment e (first row first_row) of the segmented layout: room for any layout (rows padded to 4).
__host__ __device__ inline int64_t fp8_segment_scale_base(int64_t first_row, int e, int64_t kb_count) {
  return (kb_count * (first_row + 3 * static_cast<int64_t>(e)) + 3) / 4 * 4 + 4 * static_cast<int64_t>(e);
}
// Floats the segmented layout needs for `rows` rows in `count` segments.
inline int64_t fp8_segment_scale_floats(int64_t rows, int count, int64_t kb_count) {
  return kb_count * (rows + 3 * static_cast<int64_t>(count)) + 4 * static_cast<int64_t>(count) + 4;
}
// out [N, K] (BF16 or F32) = codes · scale, rounded once.
cudaError_t launch_fp8_dequantize(const DevTensor& codes, const DevTensor& scale, DevTensor out, cudaStream_t stream);
// dst [count, rows, ld] = the count scale matrices [rows, cols] with rows padded by zeros to ld
// floats (cuBLASLt wants the rows of weight block scales 16-byte aligned). The matrices: `single`
// (count 1) or the device table `table` [count].
cudaError_t launch_fp8_pad_scales(const float* single, const void* const* table, int count, int64_t rows, int64_t cols,
                                  float* dst, int64_t ld, cudaStream_t stream);

// out[i] = src[idx[i]]; rows with idx outside [0, src rows) are zero-filled.
cudaError_t launch_gather_rows(const DevTensor& src, const DevTensor& idx, DevTensor out, cudaStream_t stream);
// out[idx[i]] = src[i]; rows with idx outside [0, out rows) are skipped.
cudaError_t launch_scatter_rows(const DevTensor& src, const DevTensor& idx, DevTensor out, cudaStream_t stream);

// ---- rope.cu: per-head RMSNorm + NeoX RoPE in place. inv_freq: device [D/2] F32. With v, slots
// and cache (all or none; cache and v of q's dtype): also kv_store(k after RoPE, v, slots, cache).
cudaError_t launch_qk_norm_rope(DevTensor q, DevTensor k, const DevTensor& q_norm_w, const DevTensor& k_norm_w,
                                float eps, const DevTensor& positions, const float* inv_freq, float attention_factor,
                                cudaStream_t stream, const DevTensor* v = nullptr, const DevTensor* slots = nullptr,
                                const DevKv* cache = nullptr);

// ---- kv_store.cu: scatter k, v [T, Hkv, D] into the paged cache at slots [T] (slot < 0 skipped).
cudaError_t launch_kv_store(const DevTensor& k, const DevTensor& v, const DevTensor& slots, const DevKv& cache,
                            cudaStream_t stream);

// ---- attention.cu / attention_generic.cu. q, out [T, Hq, D]; lse [T, Hq] F32 or undefined.
// Every kernel reads only the keys in each block's range, starting at kv_begin.
// Tensor-core prefill kernel: D = 128, BF16 q/out/cache.
cudaError_t launch_attention_flash(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                   DevTensor out, DevTensor lse, cudaStream_t stream);
// The same on Hopper warpgroup MMA (kernels/attention_wgmma.cu, built for sm_90a only): returns
// cudaErrorNotSupported on other devices or when the library was built without it.
cudaError_t launch_attention_wgmma(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                   DevTensor out, DevTensor lse, cudaStream_t stream);
// The warp-specialized Hopper kernel (kernels/attention_ws.cu, sm_90a only; FlashAttention-3's
// design: TMA producer, two ping-pong consumer warpgroups, persistent CTAs): D = 128, BF16.
// `sched` is device scratch of kAttnWsScratchInts int32 (counters, then one flag bit per work
// item), zero before the first call; each call leaves it zero again, so calls sharing it must be
// ordered (one stream). A call is one launch, or two (AttentionWsConfig::two_pass).
constexpr int kAttnWsCounters = 4;
constexpr int kAttnWsFlagWords = 1 << 15;  // 2^20 work items (128 query rows x one head each)
constexpr int kAttnWsScratchInts = kAttnWsCounters + kAttnWsFlagWords;
struct AttentionWsConfig {
  // Work order: the items of this many KV heads (with their query heads) run before the next
  // group's, so that fewer K/V streams compete for L2; 0 = all heads at once. One KV head at a time
  // is the default: on an H200 (2026-12-04) it ran 519 TFLOP/s at 128K tokens against 470 with all
  // heads at once, and the same within 1% at 16K and 32K (attention_bench --ws-kv-group).
  int kv_heads_per_group = 1;
  // K/V tiles in flight: 2 (the output leaves through a shared-memory staging buffer) or 3 (no room
  // for that buffer: stored from the registers).
  int stages = 2;
  // Two passes instead of one (attention_ws.cu): the first finds each row's max only on an item's
  // first and last tiles and on masked tiles and flags the items whose probabilities overflowed for
  // want of it, the second redoes those. On an H100 (2026-12-08, attention_bench --kernel
  // ws,ws-1pass, pages of 16) two passes ran 604 / 734 / 679 / 667 TFLOP/s at 4K / 16K / 32K / 128K
  // against one pass's 579 / 692 / 619 / 634. Calls of more than 2^20 work items run one pass.
  bool two_pass = true;
  // Tests only: with two_pass, false skips the second launch, so that a test can show a case needs it
  // (the flagged items stay flagged: the next two-pass call redoes them too).
  bool second_pass = true;
};
cudaError_t launch_attention_ws(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                DevTensor out, DevTensor lse, int* sched, cudaStream_t stream,
                                const AttentionWsConfig& cfg = {});
// Any D <= 256, F32 or BF16: one warp per (query, head, key split). Also serves decode. With
// n_splits > 1 (see attention_generic_splits) `part` is F32 scratch of
// T · Hq · n_splits · (D + 2) floats; max_keys bounds the length of every block's key range,
// min(kv_end, pos_begin + q_len) - kv_begin.
int attention_generic_splits(int n_rows, int hq, int max_keys);
cudaError_t launch_attention_generic(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                     DevTensor out, DevTensor lse, int n_splits, int max_keys, float* part,
                                     cudaStream_t stream);
// (attention_merge.cu) The log-sum-exp merge of n_splits <= kAttnMaxSplits partial results in
// `part` (layout above; the decode kernel's too) into out and lse.
inline constexpr int kAttnMaxSplits = 64;
cudaError_t launch_attention_split_merge(const DevAttnBatch& batch, int hq, int d, int n_splits, const float* part,
                                         DevTensor out, DevTensor lse, cudaStream_t stream);
// ---- attention_decode.cu: blocks of one query row (max_q_len == 1), D = 128, BF16 q and cache,
// Hq / Hkv from 1 to 16, 16-byte aligned q and cache: one CTA per (block, KV head, key split) for
// all the query heads of the KV head, on tensor cores. `part` as for the generic kernel (D = 128);
// at most kAttnMaxSplits splits (the merge's limit), each block's keys spread evenly over them.
bool attention_decode_supported(const DevTensor& q, const DevKv& cache, int max_q_len);
int attention_decode_splits(int n_blocks, int hkv, int max_keys, int n_sms);
cudaError_t launch_attention_decode(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, float scale,
                                    DevTensor out, DevTensor lse, int n_splits, float* part, cudaStream_t stream);
// ---- attention_merge.cu: in place, out = (e^lse·out + e^lse2·out2) / (e^lse + e^lse2) and
// lse = log(e^lse + e^lse2) in fp32; -inf marks an empty side, whose out is never read.
// out, out2 [T, Hq, D] F32 or BF16 (one dtype); lse, lse2 [T, Hq] F32.
cudaError_t launch_attention_merge(DevTensor out, DevTensor lse, const DevTensor& out2, const DevTensor& lse2,
                                   cudaStream_t stream);

// ---- moe.cu
cudaError_t launch_moe_route(const DevTensor& logits, int top_k, bool renormalize, DevTensor ids, DevTensor weights,
                             cudaStream_t stream);
// The router of a decode step as one kernel: logits [M, E] F32 = x [M, K] · router [E, K]ᵀ (BF16,
// M <= kSkinnyMaxRows), then launch_moe_route's softmax and top-k of them, by the block that
// finishes its logits last. ticket: a device counter that is 0 before the launch (and after it).
bool moe_gate_supported(const DevTensor& x, const DevTensor& router, int top_k);
// With `norm`: x is the addend of norm's residual add, the rows routed are norm.out (written by the
// block that routes); norm's dtypes BF16 (w any float dtype), x's shape.
bool moe_gate_norm_supported(const DevTensor& x, const RowAddNorm& norm);
cudaError_t launch_moe_gate(const DevTensor& x, const DevTensor& router, int top_k, bool renormalize, DevTensor logits,
                            unsigned* ticket, DevTensor ids, DevTensor weights, cudaStream_t stream,
                            const RowAddNorm* norm = nullptr);
// Counting sort of the (token, k) pairs whose expert is in [first, first + count):
// offsets [count + 1] (exclusive prefix sum of the per-expert counts), src_token [T*K] (token of
// each permuted row) and pair_row [T*K] (permuted row of each pair, -1 when not local).
cudaError_t launch_moe_permute(const DevTensor& ids, int first, int count, int32_t* offsets, int32_t* src_token,
                               int32_t* pair_row, cudaStream_t stream);
// The same, also writing tile_start [count + 1]: the exclusive prefix sum of ceil(rows_e / tile_m)
// (M-tiles per expert), which the grouped GEMMs use to map a CTA to its (expert, M-tile); and, when
// given, active [count + 1]: active[0] = the number of experts with rows, active[1..] their local
// indices in ascending order (the small-batch kernels launch for those only). block_counts: scratch
// of moe_permute_scratch_ints(T·K, count) int32 (none below 4,097 pairs; at most 256 · count), with
// which calls of more pairs run over many blocks (two kernels); nullptr: one block, any size. The
// rows of one expert's segment come in no fixed order (every kernel that reads them is indifferent
// to it).
cudaError_t launch_moe_permute_tiled(const DevTensor& ids, int first, int count, int32_t* offsets, int32_t* src_token,
                                     int32_t* pair_row, int tile_m, int32_t* tile_start, cudaStream_t stream,
                                     int32_t* active = nullptr, int32_t* block_counts = nullptr);
int64_t moe_permute_scratch_ints(int64_t n_pairs, int count);
// ---- moe_rowwise.cu: the expert GEMMs of small batches (decode) and odd shapes: all local experts
// in two launches (gate‖up + SiLU·mul, down), the rows found on the device (MoeRowSource). x BF16
// [T, H]; gate/up/down are device arrays of `count` BF16 weight pointers ([I, H], [I, H], [H, I]);
// act [rows, I] BF16 and y [rows, H] F32 are scratch of at least T·K rows. vectorized = true (the
// weight passes of gemv.cuh): H and I multiples of 8, x and every weight pointer 16-byte aligned;
// false: scalar loads, any H and I, no alignment needed. Slow for large batches: there, the
// fallback of the grouped path for shapes the tensor-core kernels do not take.
//
// Where the kernels find their rows. Segments: after launch_moe_permute_tiled, expert e's rows are
// [offsets[e], offsets[e+1]) of act and y, gate‖up reading x row src_token[row]; with `active` the
// grid covers max_active experts (>= active[0], e.g. min(count, T·K)) instead of all `count`: at
// decode most experts have no row, and their empty CTAs cost more than the work. Pairs (ids set): no
// permute at all; grid row p is the pair p = t·K + k of the router's choice ids [T, K] (global
// expert ids): expert ids[p] - first if it is local (else nothing), x row t = p / top_k, act and y
// row p. For decode sizes, where the permute is a kernel of the step's chain and the grid is T·K
// rows either way. launch_moe_unpermute(..., rows, ...) then sums y by the same rows.
struct MoeRowSource {
  const int32_t* src_token = nullptr;  // segments
  const int32_t* offsets = nullptr;
  const int32_t* pair_row = nullptr;  // where the permute put each pair (the unpermute's rows)
  const int32_t* active = nullptr;
  int max_active = 0;
  const int32_t* ids = nullptr;  // pairs
  int first = 0;
  int top_k = 0;
  int n_pairs = 0;

  static MoeRowSource segments(const int32_t* src_token, const int32_t* offsets, const int32_t* pair_row,
                               const int32_t* active, int max_active) {
    MoeRowSource s;
    s.src_token = src_token;
    s.offsets = offsets;
    s.pair_row = pair_row;
    s.active = active;
    s.max_active = max_active;
    return s;
  }
  static MoeRowSource pairs(const int32_t* ids, int first, int top_k, int n_pairs) {
    MoeRowSource s;
    s.ids = ids;
    s.first = first;
    s.top_k = top_k;
    s.n_pairs = n_pairs;
    return s;
  }
};
cudaError_t launch_moe_rowwise_gemms(const DevTensor& x, const MoeRowSource& rows, int count, const void* const* gate,
                                     const void* const* up, const void* const* down, int64_t inter, bool vectorized,
                                     void* act, float* y, cudaStream_t stream);

// The same for FP8 experts. Device arrays of `count` pointers: codes (gate/up [I, H], down [H, I]
// F8E4M3) and their F32 block scales ([ceil(I/128), ceil(H/128)], [ceil(H/128), ceil(I/128)]).
// Activations stay BF16 (W = code · scale, fp32 sums). vectorized: H, I multiples of 16, x and
// every code pointer 16-byte aligned.
struct Fp8ExpertTables {
  const void* const* gate = nullptr;
  const void* const* up = nullptr;
  const void* const* down = nullptr;
  const void* const* gate_scale = nullptr;
  const void* const* up_scale = nullptr;
  const void* const* down_scale = nullptr;
  // The grouped ws kernels': a device array of 3·count TMA descriptors of the codes
  // (encode_moe_fp8_weight_maps); null: those kernels are not run (the first FP8 kernels are).
  const void* weight_maps = nullptr;
  // The 128 x 192 gate‖up tiles' (MoeFp8GemmArgs::n192): 2·count descriptors of gate and up with
  // boxes of 96 rows (encode_moe_fp8_gateup192_maps); null: those tiles are not used.
  const void* gateup_maps192 = nullptr;
};
cudaError_t launch_moe_rowwise_gemms_fp8(const DevTensor& x, const MoeRowSource& rows, int count,
                                         const Fp8ExpertTables& tables, int64_t inter, bool vectorized, void* act,
                                         float* y, cudaStream_t stream);

// ---- moe_gemm.cu: the tensor-core grouped expert GEMMs of prefill, scheduled on the device.
inline constexpr int kMoeGemmTileM = 128;  // rows per M-tile: the tile_m of launch_moe_permute_tiled
// Shapes the grouped kernels take: H and I multiples of 64 (and x, weights 16-byte aligned).
inline bool moe_grouped_gemm_supported(int64_t hidden, int64_t inter) {
  return hidden > 0 && inter > 0 && hidden % 64 == 0 && inter % 64 == 0 && hidden <= (int64_t{1} << 20) &&
         inter <= (int64_t{1} << 20);
}
// Upper bound of the M-tiles over all experts, known on the host: ceil(n_pairs / 128) + count.
inline int64_t moe_grouped_gemm_max_tiles(int64_t n_pairs, int count) {
  return (n_pairs + kMoeGemmTileM - 1) / kMoeGemmTileM + count;
}
// act [rows, I] BF16 = silu(x[src_token] · gateᵀ) ⊙ (x[src_token] · upᵀ) per expert segment, then
// y [rows, H] F32 = act · downᵀ. offsets / tile_start from launch_moe_permute_tiled (tile_m =
// kMoeGemmTileM); n_pairs (T·K) bounds the rows and sizes the grid, so nothing is read back on the
// host. act and y are scratch of n_pairs rows. gate/up/down as in launch_moe_rowwise_gemms.
cudaError_t launch_moe_grouped_gemms(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                     const int32_t* tile_start, int64_t n_pairs, int count, const void* const* gate,
                                     const void* const* up, const void* const* down, int64_t inter, void* act, float* y,
                                     cudaStream_t stream);
// The same two GEMMs on Hopper warpgroup MMA (kernels/moe_gemm_wgmma.cu, built for sm_90a only):
// same arguments, semantics and device-side scheduling, tiles chosen by MoeWgmmaConfig.
// cudaErrorInvalidValue for shapes moe_grouped_gemm_supported rejects or a bad config; on a GPU
// other than compute capability 9.0 the launch fails (there is no code for it).
struct MoeWgmmaConfig {
  int tile_n_gateup = 256;  // B rows per tile of the gate‖up GEMM (half gate, half up): 256 or 128
  int tile_n_down = 256;    // B rows per tile of the down GEMM: 256 or 128
  // (256: 128 x 256 tiles, one CTA per SM; 128: 128 x 128 tiles, two CTAs per SM.)
  int n_per_cta = 2;  // N-tiles one CTA computes in turn (the next one's loads overlap the epilogue)
  // A producer warpgroup loads, two warpgroups multiply, meeting on mbarriers (128 x 256 tiles only).
  bool warp_specialized = false;
  // The down GEMM writes y in BF16 (y then holds n_pairs x H BF16 values; pass it to
  // launch_moe_unpermute as BF16): half the bytes written and read back at prefill, each expert's
  // output rounded to BF16 once before the weighted sum (as transformers' bf16 experts output it).
  bool y_bf16 = false;
  // Warp-specialized kernels: one CTA per SM walks the (M-tile, N-group) items; false: a CTA per item.
  bool persistent = true;
};
cudaError_t launch_moe_grouped_gemms_wgmma(const DevTensor& x, const int32_t* src_token, const int32_t* offsets,
                                           const int32_t* tile_start, int64_t n_pairs, int count,
                                           const void* const* gate, const void* const* up, const void* const* down,
                                           int64_t inter, void* act, void* y, const MoeWgmmaConfig& cfg,
                                           cudaStream_t stream);
// ---- moe_gemm_fp8_wgmma.cu: the grouped expert GEMMs for FP8 experts on Hopper (sm_90a only),
// scheduled on the device like launch_moe_grouped_gemms_wgmma (offsets / tile_start from
// launch_moe_permute_tiled with tile_m = kMoeGemmTileM). Per 128-wide K block the tensor cores
// compute an fp32 partial product of the e4m3 codes, which is added to the fp32 accumulators
// times the activation row's and the weight block's scales (DeepSeek-V3's promotion).
//   gate_up = true:  aq [rows, I] e4m3 with the segmented scales act_scale: act = silu(g) ⊙ u
//                    with g, u = xq[src_token] · gate/upᵀ (rounded to bf16 first, as the BF16
//                    kernels; act rounded to bf16), quantized as launch_fp8_quantize_rows(act, aq,
//                    act_scale, offsets, count) does; xq [T, H] e4m3 with scales
//                    x_scale[kb · n_tokens + t] (launch_fp8_quantize_rows without offsets);
//   gate_up = false: y [rows, H] F32 (BF16 where y_bf16) = aq · downᵀ.
// H and I multiples of 128, every pointer 16-byte aligned; aq / y scratch of n_pairs rows, and act
// [n_pairs, I] BF16 where moe_fp8_gate_up_needs_act(args).
// warp_specialized (the default): the kernels with a producer warpgroup (n192: gate‖up on 128 x
// 192 tiles); gate‖up quantizes act in its epilogue where a CTA computes whole 128-column scale
// blocks (n_per_cta a multiple of 4 on 128 x 192 tiles, of 2 on 128 x 128), else it writes act and
// the quantizer runs after it. false: the first kernel (every thread loads, the tensor cores wait for each
// promotion), act written and then quantized. All compute the same values bit for bit.
struct MoeFp8GemmArgs {
  const uint8_t* xq = nullptr;
  const float* x_scale = nullptr;
  int64_t n_tokens = 0;
  const int32_t* src_token = nullptr;
  const int32_t* offsets = nullptr;
  const int32_t* tile_start = nullptr;
  int count = 0;
  Fp8ExpertTables tables;
  int64_t hidden = 0, inter = 0, n_pairs = 0;
  void* act = nullptr;  // BF16 scratch where moe_fp8_gate_up_needs_act
  uint8_t* aq = nullptr;
  float* act_scale = nullptr;
  void* y = nullptr;
  bool y_bf16 = false;  // y in BF16: half the bytes written and read back (as MoeWgmmaConfig::y_bf16)
  bool warp_specialized = true;
  int n_per_cta = 0;       // N-tiles one CTA computes in turn, 1..64; 0: 4 in the ws kernels but on 128 x 128
                           // gate‖up tiles (moe_fp8_n_per_cta), 2 in the first kernels
  bool persistent = true;  // warp-specialized kernels: one CTA per SM walks the items (MoeWgmmaConfig)
  // The ws gate‖up GEMM on 128 x 192 tiles (96 gate + 96 up rows) where I is a multiple of 384 and
  // tables.gateup_maps192 is set; false: on 128 x 128 tiles (moe_bench's fp8.ws128).
  bool n192 = true;
};
// The FP8 ws gate‖up kernel's N-tiles per CTA for n_pairs expert rows on 128 x 128 tiles (the 128
// x 192 tiles and the down GEMM take 4): 4 from 8K tokens at top-8 on (one item's row setup serves
// more tiles), 2 below. H100, 2026-12-06, moe_bench at the Qwen3-30B-A3B
// shape: 4 against 2 took the MoE block from 2.079 / 4.163 to 2.011 / 4.003 ms at 16K / 32K tokens
// and was 0.5-1.5% slower at 4K.
inline int moe_fp8_n_per_cta(int64_t n_pairs) { return n_pairs >= (int64_t{1} << 16) ? 4 : 2; }
inline bool moe_fp8_grouped_supported(int64_t hidden, int64_t inter) {
  return hidden > 0 && inter > 0 && hidden % 128 == 0 && inter % 128 == 0 && hidden <= (int64_t{1} << 20) &&
         inter <= (int64_t{1} << 20);
}
cudaError_t launch_moe_grouped_gemm_fp8_wgmma(const MoeFp8GemmArgs& args, bool gate_up, cudaStream_t stream);
// Whether the gate‖up launch needs the act scratch (it writes act and quantizes it after the GEMM).
bool moe_fp8_gate_up_needs_act(const MoeFp8GemmArgs& args);
// The TMA descriptors of Fp8ExpertTables::weight_maps, written to host memory `maps` (3·count ·
// kTmaDescBytes bytes; gate e, up e, down e at e, count + e, 2·count + e) from the host's code
// pointers codes[e], codes[count + e], codes[2·count + e] (gate, up [I, H]; down [H, I]). False
// where the driver has no encoder or a matrix is not encodable (a pointer not 16-byte aligned).
inline constexpr size_t kTmaDescBytes = 128;
bool encode_moe_fp8_weight_maps(const void* const* codes, int count, int64_t hidden, int64_t inter, void* maps);
// Fp8ExpertTables::gateup_maps192 (2·count descriptors: gate e at e, up e at count + e) from the
// same host code pointers.
bool encode_moe_fp8_gateup192_maps(const void* const* codes, int count, int64_t hidden, int64_t inter, void* maps);

// out[t] = Σ_k weights[t,k] · y[pair_row[t*K+k]] over the local pairs, in k order (0 with none).
// With `norm` (its residual and out [T, H] in out's dtype; T <= kUnpermuteDecodeTokens, decode
// sizes): out is not written, the sum (rounded to out's dtype) goes into norm's residual add instead.
constexpr int64_t kUnpermuteDecodeTokens = 64;
cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const int32_t* pair_row, DevTensor out,
                                 cudaStream_t stream, const RowAddNorm* norm = nullptr);
// The same after the row-wise kernels, by their rows: segments, y row rows.pair_row[p]; pairs, y row
// p = t·K + k for the pairs whose expert ids[p] lies in [first, first + count).
cudaError_t launch_moe_unpermute(const DevTensor& y, const DevTensor& weights, const MoeRowSource& rows, int count,
                                 DevTensor out, cudaStream_t stream, const RowAddNorm* norm = nullptr);

// ---- sample.cu: one token per row of logits [R, V] F32 (Backend::sample, ops/backend.h) into
// ids [R] I32. rows: device [R]; scratch: device F32 [R, V] (the probabilities of non-greedy rows;
// may be null when every row is greedy). The host normalizes the parameters: top_k 0 when off
// (<= 0 or >= V), top_p >= 1 when off, min_p 0 when off, u the row's uniform draw.
struct DevSampleRow {
  float temperature = 1.0f;
  float top_p = 1.0f;
  float min_p = 0.0f;
  float u = 0.0f;
  int32_t top_k = 0;
  int32_t greedy = 0;
};
cudaError_t launch_sample(const DevTensor& logits, const DevSampleRow* rows, float* scratch, DevTensor ids,
                          cudaStream_t stream);
// Rows launch_sample has finished per path, summed over the process (a debug aid for tests; waits for
// the device): [0] greedy or without a token, [1] top-k candidates, [2] top-p / min-p candidates (no
// top-k), [3] the general path over the full row.
constexpr int kSamplePaths = 4;
cudaError_t sample_path_rows(unsigned long long (&rows)[kSamplePaths]);

}  // namespace cpinfer::cuda
