// The op interface the model is written against. A back-end (cpu, cuda) implements it; the model,
// the KV cache and context parallelism never include a back-end header.
//
// Conventions
// - All tensors are contiguous row-major views (core/tensor.h) living on the back-end's device.
// - Activations use act_dtype(): F32 on the CPU reference, BF16 on CUDA. Weights keep the dtype
//   they were stored in (BF16/F16/F32); every op accumulates in fp32.
// - Calls are stream-ordered: they may return before the work is done; sync() waits for all of it.
// - Shapes in comments: T tokens, H hidden, Hq/Hkv heads, D head_dim, E experts, K top-k, I width.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace cpinfer {

// Rotary embedding parameters, computed once from the config (loader/config.h):
// cos/sin(pos * inv_freq[i]) * attention_factor, NeoX (rotate_half) pairing of i and i + D/2.
struct RopeParams {
  std::vector<float> inv_freq;  // [D/2]
  float attention_factor = 1.0f;
};

// One paged KV layer: block b holds block_size consecutive positions of one sequence.
struct KvLayer {
  Tensor k;  // [n_blocks, block_size, Hkv, D]
  Tensor v;  // [n_blocks, block_size, Hkv, D]
  int block_size() const { return static_cast<int>(k.dim(1)); }
};

// One causal query block: queries are rows [q_begin, q_begin + q_len) of q/out and sit at global
// positions pos_begin .. pos_begin + q_len - 1 of sequence `seq`; query i attends to the cached
// keys at positions 0 .. pos_begin + i of that sequence (which must be in the cache).
// Ordinary prefill: pos_begin = number of cached tokens. Decode: q_len = 1. Context parallelism:
// each local zigzag block is one AttnBlock at its global offset.
struct AttnBlock {
  int32_t q_begin = 0;
  int32_t q_len = 0;
  int32_t pos_begin = 0;
  int32_t seq = 0;  // row of the block table
};

// Attention metadata for one forward, built once and used by every layer (no per-layer copies).
struct AttnBatch {
  std::vector<AttnBlock> blocks;              // host copy
  std::vector<int32_t> block_table;           // host copy, [n_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t max_q_len = 0;                      // largest q_len over the blocks
  int32_t max_kv_len = 0;                     // largest pos_begin + q_len over the blocks
  Tensor dev_blocks;                          // [n_blocks, 4] I32 on the device (AttnBlock fields)
  Tensor dev_block_table;                     // [n_seqs, max_blocks_per_seq] I32 on the device
};

// The experts one rank holds: global experts [first, first + count), each with its three
// matrices as views (per-expert tensors or slices of a fused [E, 2I, H] gate_up tensor).
struct ExpertShard {
  int32_t n_experts = 0;   // global expert count E
  int32_t first = 0;
  int32_t count = 0;
  std::vector<Tensor> gate;  // count x [I, H]
  std::vector<Tensor> up;    // count x [I, H]
  std::vector<Tensor> down;  // count x [H, I]
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;

  // ---- memory (device-side bytes; on the CPU back-end "device" is host memory)
  virtual void* alloc(size_t bytes) = 0;
  virtual void dealloc(void* p) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill_zero(Tensor t) = 0;
  virtual void sync() = 0;

  // ---- ops
  // out[t] = table[ids[t]] converted to out.dtype. table [V, H], ids [T] I32, out [T, H].
  virtual void embedding(const Tensor& table, const Tensor& ids, Tensor out) = 0;
  // out = rms_norm(x) * w over the last dim. x, out [T, H]; w [H].
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) = 0;
  // residual += x; out = rms_norm(residual) * w. residual, x, out [T, H].
  virtual void add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) = 0;
  // out = a · wᵀ. a [M, K] act dtype, w [N, K] any float dtype, out [M, N] (act dtype or F32).
  virtual void linear(const Tensor& a, const Tensor& w, Tensor out) = 0;
  // In place: per-head RMSNorm (weights [D]) of q [T, Hq, D] and k [T, Hkv, D], then RoPE at
  // positions [T] I32.
  virtual void qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                            const Tensor& positions, const RopeParams& rope) = 0;
  // Writes k, v [T, Hkv, D] into the cache at slots [T] I32 (slot = block * block_size + offset).
  virtual void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) = 0;
  // Causal GQA attention of each AttnBlock over the paged cache. q, out [T, Hq, D]; lse [T, Hq]
  // F32 (natural log of the softmax denominator incl. scale) is written when defined.
  virtual void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                         Tensor lse) = 0;
  // Router: softmax(logits) in fp32 over E, top-k (ties to the lower id), renormalized when
  // `renormalize`. logits [T, E]; ids [T, K] I32; weights [T, K] F32.
  virtual void moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) = 0;
  // out[t] += Σ_k weights[t,k] · down(silu(gate(x[t])) ⊙ up(x[t])) over the k whose expert is in
  // the shard; other experts are skipped (another rank holds them). x, out [T, H].
  virtual void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                           Tensor out) = 0;
  // out = silu(gate) ⊙ up. gate, up, out [T, I].
  virtual void silu_mul(const Tensor& gate, const Tensor& up, Tensor out) = 0;
  // a += b (same shape and dtype).
  virtual void add(Tensor a, const Tensor& b) = 0;
  // out[i] = src[idx[i]] (rows). src [N, C], idx [M] I32, out [M, C].
  virtual void gather_rows(const Tensor& src, const Tensor& idx, Tensor out) = 0;
  // out[idx[i]] = src[i] (rows). src [M, C], idx [M] I32, out [N, C].
  virtual void scatter_rows(const Tensor& src, const Tensor& idx, Tensor out) = 0;
  // Element-type conversion (same shape).
  virtual void convert(const Tensor& src, Tensor dst) = 0;
};

// Owns one allocation of a back-end; move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t bytes) : be_(&be), bytes_(bytes), ptr_(bytes ? be.alloc(bytes) : nullptr) {}
  ~Buffer() { reset(); }
  Buffer(Buffer&& o) noexcept : be_(o.be_), bytes_(o.bytes_), ptr_(o.ptr_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      be_ = o.be_; bytes_ = o.bytes_; ptr_ = o.ptr_;
      o.ptr_ = nullptr; o.bytes_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void reset() {
    if (ptr_) be_->dealloc(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Tensor tensor(DType t, std::initializer_list<int64_t> dims) const {
    Tensor x(ptr_, t, dims, be_->device());
    CPI_CHECK(x.nbytes() <= bytes_, "buffer of ", bytes_, " bytes too small for ", x.shape_str());
    return x;
  }

 private:
  Backend* be_ = nullptr;
  size_t bytes_ = 0;
  void* ptr_ = nullptr;
};

// Back-end factory: "cpu" always; "cuda" when built with CUDA (device index = ordinal).
std::unique_ptr<Backend> make_backend(const std::string& kind, int device_index = 0);
std::unique_ptr<Backend> make_cpu_backend();
#ifdef CPINFER_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device_index);
#endif

}  // namespace cpinfer
