// CudnnAttention (cudnn_attention.h): cuDNN's SDPA graph over the engine's paged layout.
#include "backends/cuda/cudnn_attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include "core/check.h"
#include "core/log.h"

#ifdef CPINFER_HAVE_CUDNN_HEADERS
#include "backends/cuda/cudnn_graph.h"
#endif

namespace cpinfer::cuda {

namespace {

constexpr size_t kAlign = 256;
[[maybe_unused]] size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Lengths are rounded up to a multiple of g, the largest power of two (at least 64) with
// 4·g <= n: at most 25% more than n, four buckets per octave, so a plan serves many lengths.
[[maybe_unused]] int64_t bucket(int64_t n) {
  n = std::max<int64_t>(n, 1);
  int64_t g = 64;
  while (g * 8 <= n) g *= 2;
  return (n + g - 1) / g * g;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// What a plan depends on: batch entries, bucketed max query / key lengths, heads, head dim, the
// cache's page geometry and whether K/V are read as one contiguous run. (T and the scale are per
// call.)
struct Key {
  int64_t b, sq, skv, hq, hkv, d, block_size, n_pages, dense;
  int64_t pages() const { return (skv + block_size - 1) / block_size; }
  auto tie() const { return std::tie(b, sq, skv, hq, hkv, d, block_size, n_pages, dense); }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
};

[[maybe_unused]] Key key_of(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, const CudnnCall& call) {
  return Key{batch.n_blocks, bucket(batch.max_q_len), bucket(batch.max_kv_len), q.dim(1),          cache.k.dim(2),
             q.dim(2),       cache.k.dim(1),          cache.k.dim(0),           call.dense ? 1 : 0};
}

// Scratch layout of one call: the metadata arrays, then the stats of a call without lse, then
// cuDNN's own workspace.
struct Layout {
  size_t seq_q, seq_kv, q_off, stats_off, page_table, stats, cudnn, total;
};
[[maybe_unused]] Layout layout(const Key& k, int64_t t, int64_t cudnn_bytes) {
  Layout l{};
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t here = at;
    at += align_up(bytes);
    return here;
  };
  l.seq_q = take(k.b * sizeof(int32_t));
  l.seq_kv = take(k.b * sizeof(int32_t));
  l.q_off = take((k.b + 1) * sizeof(int64_t));
  l.stats_off = take((k.b + 1) * sizeof(int64_t));
  l.page_table = take(k.b * k.pages() * sizeof(int32_t));
  l.stats = take(static_cast<size_t>(t * k.hq) * sizeof(float));
  l.cudnn = take(static_cast<size_t>(cudnn_bytes));
  l.total = at;
  return l;
}

}  // namespace

#ifdef CPINFER_HAVE_CUDNN_HEADERS

namespace {

// Tensor uids of the graph: the non-virtual ones are bound in the variant pack.
enum Uid : int64_t {
  kQ = 1,
  kKCache,
  kVCache,
  kO,
  kStats,
  kSeqQ,
  kSeqKv,
  kPageK,
  kPageV,
  kQOff,
  kOOff,
  kStatsOff,
  kScale,
  kNegInfPad,
  kNegInfCausal,
  kVirtual = 100,  // virtual tensors count up from here
};

// cuDNN 9's composite SDPA forward pattern, as its fused flash-attention engines recognize it:
// S = Q·Kᵀ (K paged, or with k.dense one strided run of the cache), S·scale, padding mask (row <
// seq_q and col < seq_kv), bottom-right causal
// mask (row + seq_kv - seq_q >= col), softmax with Stats = max + log(Σexp), O = P·V (V paged).
// Q, O and Stats are ragged: batch entry b starts at row q_begin of [T, Hq, D] / [T, Hq] (the
// offsets also bound what cuDNN reads and writes when the bucketed length exceeds T). A dense plan
// reads K/V as one strided run of the cache instead of through page tables: cuDNN has faster
// engines for it.
cudnn::Plan build_sdpa_plan(const Key& k, cudnnBackendDescriptor_t devprop) {
  using cudnn::Dims;
  cudnn::GraphBuilder g;
  int64_t next_virtual = kVirtual;
  const int64_t b = k.b, sq = k.sq, skv = k.skv, hq = k.hq, hkv = k.hkv, d = k.d, p = k.pages();
  const Dims one{1, 1, 1, 1}, col{b, 1, 1, 1}, col_stride{1, 1, 1, 1};
  const Dims s_dims{b, hq, sq, skv}, s_strides{hq * sq * skv, sq * skv, skv, 1};
  const Dims row_dims{b, hq, sq, 1}, row_strides{hq * sq, sq, 1, 1};
  auto virt = [&](cudnnDataType_t type, Dims dims, Dims strides) {
    return g.tensor(next_virtual++, type, dims, strides, true);
  };
  auto scores = [&](cudnnDataType_t type) { return virt(type, s_dims, s_strides); };

  const auto offsets = Dims{b + 1, 1, 1, 1};
  const bool dense = k.dense != 0;
  auto q_off = g.tensor(kQOff, CUDNN_DATA_INT64, offsets, col_stride, false);
  auto o_off = g.tensor(kOOff, CUDNN_DATA_INT64, offsets, col_stride, false);
  auto stats_off = g.tensor(kStatsOff, CUDNN_DATA_INT64, offsets, col_stride, false);
  // [T, Hq, D] seen as [B, Hq, Sq, D] with token-major strides.
  const Dims qo_dims{b, hq, sq, d}, qo_strides{sq * hq * d, d, hq * d, 1};
  auto q = g.tensor(kQ, CUDNN_DATA_BFLOAT16, qo_dims, qo_strides, false, false, q_off);
  auto seq_q = g.tensor(kSeqQ, CUDNN_DATA_INT32, col, col_stride, false);
  auto seq_kv = g.tensor(kSeqKv, CUDNN_DATA_INT32, col, col_stride, false);
  // Paged: the cache [n_pages, block_size, Hkv, D] seen as [n_pages, Hkv, block_size, D], read
  // through the page tables. Dense: K and V are [Skv, Hkv, D] runs of the cache.
  cudnnBackendDescriptor_t k_cache = nullptr, v_cache = nullptr, page_k = nullptr, page_v = nullptr;
  if (!dense) {
    const Dims cache_dims{k.n_pages, hkv, k.block_size, d}, cache_strides{k.block_size * hkv * d, d, hkv * d, 1};
    k_cache = g.tensor(kKCache, CUDNN_DATA_BFLOAT16, cache_dims, cache_strides, false);
    v_cache = g.tensor(kVCache, CUDNN_DATA_BFLOAT16, cache_dims, cache_strides, false);
    const Dims table_dims{b, 1, p, 1}, table_strides{p, p, 1, 1};
    page_k = g.tensor(kPageK, CUDNN_DATA_INT32, table_dims, table_strides, false);
    page_v = g.tensor(kPageV, CUDNN_DATA_INT32, table_dims, table_strides, false);
  }

  // Kᵀ [B, Hkv, D, Skv], gathered from the pages or a strided view of the run.
  cudnnBackendDescriptor_t kt = nullptr;
  if (dense) {
    kt = g.tensor(kKCache, CUDNN_DATA_BFLOAT16, {b, hkv, d, skv}, {skv * hkv * d, d, 1, hkv * d}, false);
  } else {
    kt = virt(CUDNN_DATA_BFLOAT16, {b, hkv, d, skv}, {d * skv * hkv, d * skv, 1, d});
    g.paged_load(k_cache, seq_kv, page_k, kt);
  }
  auto s = scores(CUDNN_DATA_FLOAT);
  g.matmul(q, kt, s, seq_q, seq_kv, nullptr);
  auto scale = g.tensor(kScale, CUDNN_DATA_FLOAT, one, one, false, true);
  auto s_scaled = scores(CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s, s_scaled, scale);

  // Padding mask: rows past seq_q and columns past seq_kv of each batch entry.
  auto row = scores(CUDNN_DATA_INT32), coln = scores(CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s_scaled, row, nullptr, nullptr, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, s_scaled, coln, nullptr, nullptr, 3);
  auto row_in = scores(CUDNN_DATA_BOOLEAN), col_in = scores(CUDNN_DATA_BOOLEAN), in = scores(CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, row, row_in, seq_q);
  g.pointwise(CUDNN_POINTWISE_CMP_LT, CUDNN_DATA_BOOLEAN, coln, col_in, seq_kv);
  g.pointwise(CUDNN_POINTWISE_LOGICAL_AND, CUDNN_DATA_BOOLEAN, row_in, in, col_in);
  auto neg_inf_pad = g.tensor(kNegInfPad, CUDNN_DATA_FLOAT, one, one, false, true);
  auto s_padded = scores(CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s_scaled, s_padded, neg_inf_pad, in);

  // Bottom-right causal mask: query row i of an entry sits at position seq_kv - seq_q + i.
  auto row2 = scores(CUDNN_DATA_INT32), col2 = scores(CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, s_padded, row2, nullptr, nullptr, 2);
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, s_padded, col2, nullptr, nullptr, 3);
  auto row_plus = scores(CUDNN_DATA_INT32), pos = scores(CUDNN_DATA_INT32);
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_INT32, row2, row_plus, seq_kv);
  g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_INT32, row_plus, pos, seq_q);
  auto visible = scores(CUDNN_DATA_BOOLEAN);
  g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, pos, visible, col2);
  auto neg_inf_causal = g.tensor(kNegInfCausal, CUDNN_DATA_FLOAT, one, one, false, true);
  auto s_masked = scores(CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, s_padded, s_masked, neg_inf_causal, visible);

  // Softmax; Stats = max + log(Σ exp(s - max)), the natural-log softmax denominator.
  auto mx = virt(CUDNN_DATA_FLOAT, row_dims, row_strides);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, s_masked, mx);
  auto centered = scores(CUDNN_DATA_FLOAT), ex = scores(CUDNN_DATA_FLOAT);
  g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, s_masked, centered, mx);
  g.pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, centered, ex);
  auto sum = virt(CUDNN_DATA_FLOAT, row_dims, row_strides), log_sum = virt(CUDNN_DATA_FLOAT, row_dims, row_strides);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, ex, sum);
  g.pointwise(CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, sum, log_sum);
  // Stats [T, Hq] seen as [B, Hq, Sq, 1] with token-major strides.
  auto stats = g.tensor(kStats, CUDNN_DATA_FLOAT, row_dims, {sq * hq, 1, hq, 1}, false, false, stats_off);
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, stats, log_sum);
  auto probs = scores(CUDNN_DATA_BFLOAT16);
  g.pointwise(CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, ex, probs, sum);

  cudnnBackendDescriptor_t v = nullptr;
  if (dense) {
    v = g.tensor(kVCache, CUDNN_DATA_BFLOAT16, {b, hkv, skv, d}, {skv * hkv * d, d, hkv * d, 1}, false);
  } else {
    v = virt(CUDNN_DATA_BFLOAT16, {b, hkv, skv, d}, {d * skv * hkv, d * skv, d, 1});
    g.paged_load(v_cache, seq_kv, page_v, v);
  }
  auto o = g.tensor(kO, CUDNN_DATA_BFLOAT16, qo_dims, qo_strides, false, false, o_off);
  g.matmul(probs, v, o, seq_q, nullptr, seq_kv);
  return g.build(devprop);
}

}  // namespace

struct CudnnAttention::Impl {
  int device = 0;
  cudnnHandle_t handle = nullptr;
  std::unique_ptr<cudnn::Desc> devprop;  // the device the plans are built for
  int version = 0;
  std::string reason;
  struct Entry {
    std::unique_ptr<cudnn::Plan> plan;
    std::string error;  // why the graph was refused; empty when plan is set
  };
  std::map<Key, Entry> plans;

  // The plan of `k`, built on first use; null with the reason in entry.error when refused.
  Entry& plan(const Key& k) {
    auto it = plans.find(k);
    if (it != plans.end()) return it->second;
    Entry e;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      e.plan = std::make_unique<cudnn::Plan>(build_sdpa_plan(k, devprop->get()));
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      log_info("cuDNN attention plan for ", k.b, " block(s), q <= ", k.sq, ", keys <= ", k.skv, ", ", k.hq, "/", k.hkv,
               " heads, D ", k.d, ", pages of ", k.block_size, ": engine ", e.plan->engine_index, ", workspace ",
               e.plan->workspace_bytes, " B, built in ", static_cast<int64_t>(ms), " ms");
    } catch (const cudnn::GraphError& err) {
      e.error = std::string("cuDNN rejects the graph: ") + err.what();
      log_info("cuDNN attention: ", e.error);
    }
    return plans.emplace(k, std::move(e)).first->second;
  }
};

CudnnAttention::CudnnAttention(int device) : impl_(std::make_unique<Impl>()) {
  impl_->device = device;
  const cudnn::Api& a = cudnn::api();
  if (!a.error.empty()) {
    impl_->reason = "cuDNN not available: " + a.error;
    return;
  }
  impl_->version = static_cast<int>(a.get_version());
  if (cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    impl_->reason = "cuDNN not available: cannot select CUDA device " + std::to_string(device);
    return;
  }
  const cudnnStatus_t st = a.create(&impl_->handle);
  if (st != CUDNN_STATUS_SUCCESS) {
    impl_->handle = nullptr;
    impl_->reason = std::string("cuDNN not available: cudnnCreate failed: ") + a.get_error_string(st);
    return;
  }
  try {
    impl_->devprop = std::make_unique<cudnn::Desc>(CUDNN_BACKEND_DEVICEPROP_DESCRIPTOR);
    const int32_t id = device;
    impl_->devprop->set(CUDNN_ATTR_DEVICEPROP_DEVICE_ID, CUDNN_TYPE_INT32, 1, &id)
        .set(CUDNN_ATTR_DEVICEPROP_HANDLE, CUDNN_TYPE_HANDLE, 1, &impl_->handle)
        .finalize("device properties");
  } catch (const cudnn::GraphError& e) {
    impl_->devprop.reset();
    a.destroy(impl_->handle);
    impl_->handle = nullptr;
    impl_->reason = std::string("cuDNN not available: ") + e.what();
  }
}

CudnnAttention::~CudnnAttention() {
  impl_->plans.clear();
  impl_->devprop.reset();
  if (impl_->handle) cudnn::api().destroy(impl_->handle);
}

bool CudnnAttention::available() const { return impl_->handle != nullptr; }

#else  // built without the cuDNN headers: never available

struct CudnnAttention::Impl {
  std::string reason = "cuDNN not available: built without the cuDNN headers";
  int version = 0;
  struct Entry {};
  std::map<Key, Entry> plans;
};

CudnnAttention::CudnnAttention(int) : impl_(std::make_unique<Impl>()) {}
CudnnAttention::~CudnnAttention() = default;
bool CudnnAttention::available() const { return false; }

#endif

const std::string& CudnnAttention::unavailable_reason() const { return impl_->reason; }
int CudnnAttention::version() const { return impl_->version; }
int CudnnAttention::plans_built() const { return static_cast<int>(impl_->plans.size()); }

std::string CudnnAttention::check(const DevTensor& q, const DevAttnBatch& batch, const int32_t* host_blocks,
                                  const int32_t* host_table, const DevKv& cache, const DevTensor& out,
                                  const DevTensor& lse, CudnnCall* call) {
  CudnnCall c;
  if (call) *call = c;
  if (!available()) return impl_->reason;
  if (q.dtype != DType::BF16 || out.dtype != DType::BF16 || cache.k.dtype != DType::BF16 ||
      cache.v.dtype != DType::BF16)
    return "cuDNN path takes BF16 q, out and cache only";
  if (q.ndim != 3 || out.ndim != 3 || cache.k.ndim != 4 || q.dim(2) != cache.k.dim(3))
    return "cuDNN path: q/out must be [T, Hq, D] and the cache [n_pages, block_size, Hkv, D]";
  const int64_t t = q.dim(0), hq = q.dim(1), d = q.dim(2), hkv = cache.k.dim(2);
  if (d % 8 != 0 || d > 256) return "cuDNN path: head_dim " + std::to_string(d) + " is not a multiple of 8 <= 256";
  if (hkv <= 0 || hq % hkv != 0) return "cuDNN path: query heads are not a multiple of kv heads";
  if (lse.defined() && (lse.dtype != DType::F32 || lse.numel() != t * hq)) return "cuDNN path: lse must be [T, Hq] F32";
  for (const void* p : {q.data, out.data, cache.k.data, cache.v.data, lse.defined() ? lse.data : nullptr})
    if (!aligned16(p)) return "cuDNN path: a tensor is not 16-byte aligned";
  if (batch.n_blocks <= 0 || host_blocks == nullptr) return "cuDNN path: empty batch";
  int64_t row = 0, max_q = 0, max_kv = 0;
  for (int i = 0; i < batch.n_blocks; ++i) {
    const int32_t* blk = host_blocks + static_cast<int64_t>(i) * kDevAttnBlockFields;
    const int32_t q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], kv_begin = blk[4], kv_end = blk[5];
    // A finite kv_end at or past the block's last position bounds nothing.
    if (kv_begin != 0 || static_cast<int64_t>(kv_end) < static_cast<int64_t>(pos_begin) + q_len)
      return "cuDNN path: key ranges (kv_begin > 0 or kv_end inside the causal range) are not supported";
    if (q_begin != row) return "cuDNN path: blocks must be back to back in row order";
    row += q_len;
    max_q = std::max<int64_t>(max_q, q_len);
    max_kv = std::max<int64_t>(max_kv, static_cast<int64_t>(pos_begin) + q_len);
  }
  if (row > t) return "cuDNN path: the blocks cover more rows than q has";
  if (max_q > batch.max_q_len || max_kv > batch.max_kv_len)
    return "cuDNN path: batch.max_q_len / max_kv_len are smaller than the blocks need";
  if (max_kv > std::numeric_limits<int32_t>::max() / 2) return "cuDNN path: sequence too long";
  // Dense: one block at row 0 and position 0 whose pages are consecutive, with the pages the
  // plan's bucketed key length reads (past the sequence: masked, finite by the cache contract)
  // inside the cache.
  if (host_table && batch.n_blocks == 1 && host_blocks[0] == 0 && host_blocks[2] == 0 && batch.max_blocks_per_seq > 0) {
    const int64_t bs = cache.k.dim(1), used = (max_kv + bs - 1) / bs;
    const int64_t read = (bucket(batch.max_kv_len) + bs - 1) / bs;
    const int32_t* row = host_table + static_cast<int64_t>(host_blocks[3]) * batch.max_blocks_per_seq;
    bool consecutive = used <= batch.max_blocks_per_seq && row[0] >= 0;
    for (int64_t i = 1; consecutive && i < used; ++i) consecutive = row[i] == row[0] + i;
    if (consecutive && row[0] + read <= cache.k.dim(0)) c = CudnnCall{true, row[0]};
  }
  if (call) *call = c;
#ifdef CPINFER_HAVE_CUDNN_HEADERS
  return impl_->plan(key_of(q, batch, cache, c)).error;
#else
  return impl_->reason;
#endif
}

size_t CudnnAttention::workspace_bytes(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache,
                                       const CudnnCall& call) {
#ifdef CPINFER_HAVE_CUDNN_HEADERS
  if (!available()) return 0;
  const Key k = key_of(q, batch, cache, call);
  const Impl::Entry& e = impl_->plan(k);
  return e.plan ? layout(k, q.dim(0), e.plan->workspace_bytes).total : 0;
#else
  (void)call;
  return 0;
#endif
}

void CudnnAttention::run(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, const CudnnCall& call,
                         float scale, const DevTensor& out, const DevTensor& lse, void* workspace,
                         size_t workspace_size, cudaStream_t stream) {
  CPI_CHECK(available(), impl_->reason);
#ifdef CPINFER_HAVE_CUDNN_HEADERS
  const Key k = key_of(q, batch, cache, call);
  const Impl::Entry& e = impl_->plan(k);
  CPI_CHECK(e.plan, e.error);
  const Layout l = layout(k, q.dim(0), e.plan->workspace_bytes);
  CPI_CHECK(workspace_size >= l.total && (reinterpret_cast<uintptr_t>(workspace) % kAlign) == 0,
            "cuDNN attention: workspace of ", workspace_size, " bytes at ", workspace, " is too small (", l.total,
            " needed) or not 256-byte aligned");
  char* ws = static_cast<char*>(workspace);
  auto at = [&](size_t off) { return static_cast<void*>(ws + off); };
  const cudaError_t err = launch_cudnn_attention_meta(
      batch, k.hq * k.d, k.hq, static_cast<int>(k.pages()), k.n_pages, static_cast<int32_t*>(at(l.seq_q)),
      static_cast<int32_t*>(at(l.seq_kv)), static_cast<int64_t*>(at(l.q_off)), static_cast<int64_t*>(at(l.stats_off)),
      static_cast<int32_t*>(at(l.page_table)), stream);
  CPI_CHECK(err == cudaSuccess, "cuDNN attention: metadata kernel failed to launch: ", cudaGetErrorString(err));

  const cudnn::Api& a = cudnn::api();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // By-value scalars are passed as host pointers; they are read when the call is enqueued. A dense
  // plan binds K/V at the first page of the run and has no page tables.
  const size_t page_bytes = static_cast<size_t>(k.block_size * k.hkv * k.d) * sizeof(uint16_t);
  void* k_ptr = static_cast<char*>(cache.k.data) + (call.dense ? call.first_page * page_bytes : 0);
  void* v_ptr = static_cast<char*>(cache.v.data) + (call.dense ? call.first_page * page_bytes : 0);
  std::vector<int64_t> uids = {kQ,    kKCache, kVCache,   kO,     kStats,     kSeqQ,        kSeqKv,
                               kQOff, kOOff,   kStatsOff, kScale, kNegInfPad, kNegInfCausal};
  std::vector<void*> ptrs = {q.data,
                             k_ptr,
                             v_ptr,
                             out.data,
                             lse.defined() ? lse.data : at(l.stats),
                             at(l.seq_q),
                             at(l.seq_kv),
                             at(l.q_off),
                             at(l.q_off),
                             at(l.stats_off),
                             &scale,
                             const_cast<float*>(&neg_inf),
                             const_cast<float*>(&neg_inf)};
  if (!call.dense) {
    uids.insert(uids.end(), {kPageK, kPageV});
    ptrs.insert(ptrs.end(), {at(l.page_table), at(l.page_table)});
  }
  void* cudnn_ws = e.plan->workspace_bytes > 0 ? at(l.cudnn) : nullptr;
  try {
    cudnn::ok(a.set_stream(impl_->handle, stream), "cudnnSetStream");
    cudnn::Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
    pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()), uids.data())
        .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(ptrs.size()), ptrs.data())
        .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &cudnn_ws)
        .finalize("variant pack");
    cudnn::ok(a.execute(impl_->handle, e.plan->plan, pack.get()), "cudnnBackendExecute");
  } catch (const cudnn::GraphError& err2) {
    CPI_FAIL("cuDNN attention failed: ", err2.what());
  }
#else
  (void)q, (void)batch, (void)cache, (void)call, (void)scale, (void)out, (void)lse, (void)workspace,
      (void)workspace_size, (void)stream;
#endif
}

}  // namespace cpinfer::cuda
