// The op interface the model is written against. A back-end (cpu, cuda) implements it; the model,
// the KV cache and context parallelism never include a back-end header.
//
// Conventions
// - All tensors are contiguous row-major views (core/tensor.h) living on the back-end's device.
// - Activations use act_dtype(): F32 on the CPU reference, BF16 on CUDA. Weights keep the dtype
//   they were stored in (BF16/F16/F32); the weights of linear layers may also be FP8 (Weight) on a
//   back-end where fp8_weights_supported(). Every op accumulates in fp32.
// - Calls are stream-ordered: they may return before the work is done; sync() waits for all of it.
// - Shapes in comments: T tokens, H hidden, Hq/Hkv heads, D head_dim, E experts, K top-k, I width.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "core/check.h"
#include "core/tensor.h"

namespace cpinfer {

// Rotary embedding parameters, computed once from the config (loader/config.h):
// cos/sin(pos * inv_freq[i]) * attention_factor, NeoX (rotate_half) pairing of i and i + D/2.
struct RopeParams {
  std::vector<float> inv_freq;  // [D/2]
  float attention_factor = 1.0f;
};

// Fine-grained FP8 (Qwen3-*-FP8, DeepSeek-V3): one scale per block of kFp8Block x kFp8Block weights.
inline constexpr int64_t kFp8Block = 128;

// A linear layer's weight W [N, K] as an op argument. Either a float tensor (BF16/F16/F32; `scale`
// undefined), or the e4m3 codes of W (F8E4M3 [N, K]) with `scale` F32 [ceil(N / kFp8Block),
// ceil(K / kFp8Block)]: W[n, k] = float(codes[n, k]) · scale[n / kFp8Block, k / kFp8Block], the
// product rounded to fp32 (transformers' dequantization: w.float() * scale_inv). A Tensor converts
// to a float Weight; copying a Weight into a Tensor drops the scale (the op contract then refuses
// the codes).
struct Weight : Tensor {
  Tensor scale;  // F8E4M3 weights only

  Weight() = default;
  Weight(const Tensor& t) : Tensor(t) {}  // NOLINT(google-explicit-constructor): a float weight
  bool fp8() const { return dtype == DType::F8E4M3; }
};

// One paged KV layer: block b holds block_size consecutive positions of one sequence.
struct KvLayer {
  Tensor k;  // [n_blocks, block_size, Hkv, D]
  Tensor v;  // [n_blocks, block_size, Hkv, D]
  int block_size() const { return static_cast<int>(k.dim(1)); }
};

// One causal query block: queries are rows [q_begin, q_begin + q_len) of q/out and sit at global
// positions pos_begin .. pos_begin + q_len - 1 of sequence `seq`; query i attends to the cached
// keys at positions kv_begin .. min(kv_end, pos_begin + i + 1) - 1 of that sequence (which must be
// in the cache). A query with no key in that range gets out = 0 and lse = -inf.
// Ordinary prefill: pos_begin = number of cached tokens, kv_begin = 0, kv_end unbounded. Decode:
// q_len = 1. Context parallelism: each local zigzag block is one AttnBlock at its global offset;
// the overlapped exchange splits it into its diagonal (kv_begin = pos_begin: keys this rank
// computed) and its prefix (kv_end = pos_begin: keys from other ranks), merged by log-sum-exp.
struct AttnBlock {
  static constexpr int32_t kNoBound = 0x7fffffff;
  int32_t q_begin = 0;
  int32_t q_len = 0;
  int32_t pos_begin = 0;
  int32_t seq = 0;  // row of the block table
  int32_t kv_begin = 0;
  int32_t kv_end = kNoBound;
};
inline constexpr int kAttnBlockFields = 6;  // device layout: the AttnBlock fields in order

// Attention metadata for one forward, built once and used by every layer (no per-layer copies).
struct AttnBatch {
  std::vector<AttnBlock> blocks;     // host copy
  std::vector<int32_t> block_table;  // host copy, [n_seqs, max_blocks_per_seq]
  int32_t max_blocks_per_seq = 0;
  int32_t max_q_len = 0;   // largest q_len over the blocks
  int32_t max_kv_len = 0;  // largest pos_begin + q_len over the blocks
  // 0, or a bound on every block's key count that the launch is sized for instead of the blocks'
  // own (a captured decode graph replays one launch for every step of its context bucket).
  int32_t key_bound = 0;
  Tensor dev_blocks;       // [n_blocks, kAttnBlockFields] I32 on the device
  Tensor dev_block_table;  // [n_seqs, max_blocks_per_seq] I32 on the device
};

// The flattened device layout of `blocks` ([n, kAttnBlockFields] I32, row-major).
inline std::vector<int32_t> flatten_attn_blocks(const std::vector<AttnBlock>& blocks) {
  std::vector<int32_t> flat;
  flat.reserve(blocks.size() * kAttnBlockFields);
  for (const AttnBlock& a : blocks)
    flat.insert(flat.end(), {a.q_begin, a.q_len, a.pos_begin, a.seq, a.kv_begin, a.kv_end});
  return flat;
}

// Parameters of one row of sample(): SamplingParams (engine/sampler.h) plus the draw's identity.
// The draw is a pure function of (logits, row): the same inputs give the same token on every
// back-end except where the draw lands within float rounding of a boundary (see Backend::sample).
// A NaN field, temperature +inf, top_p <= 0 or min_p > 1 is an error.
struct SampleRow {
  float temperature = 1.0f;  // <= 0: greedy
  int32_t top_k = -1;        // <= 0: off
  float top_p = 1.0f;        // >= 1: off
  float min_p = 0.0f;        // <= 0: off
  uint64_t seed = 0;
  uint64_t step = 0;  // index of the token being drawn in its sequence
};

// The experts one rank holds: global experts [first, first + count), each with its three
// matrices as views (per-expert tensors or slices of a fused [E, 2I, H] gate_up tensor), float or
// FP8 (Weight).
struct ExpertShard {
  int32_t n_experts = 0;  // global expert count E
  int32_t first = 0;
  int32_t count = 0;
  std::vector<Weight> gate;  // count x [I, H]
  std::vector<Weight> up;    // count x [I, H]
  std::vector<Weight> down;  // count x [H, I]
};

// A recorded sequence of ops (a CUDA graph). replay() enqueues it again; it reads whatever the
// device buffers it was recorded with hold at that time.
class OpGraph {
 public:
  virtual ~OpGraph() = default;
  virtual void replay() = 0;
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
  // The native stream the ops are ordered on (a cudaStream_t on CUDA; nullptr on the CPU), to
  // which device communicators bind their collectives.
  virtual void* native_stream() { return nullptr; }

  // ---- graphs (back-ends where graphs_supported()): the ops enqueued between begin_capture() and
  // end_capture() are recorded, not run; nothing in between may allocate, free or wait for the
  // device. end_capture() also ends a capture that failed (an op threw) and then throws.
  virtual bool graphs_supported() const { return false; }
  virtual void begin_capture() { CPI_FAIL(name(), " back-end records no graphs"); }
  virtual std::unique_ptr<OpGraph> end_capture() { CPI_FAIL(name(), " back-end records no graphs"); }
  // Changes whenever device memory is freed (a scratch buffer or workspace grew): a graph recorded
  // under another value may point at freed memory and must be recorded again.
  virtual uint64_t memory_epoch() const { return 0; }

  // Whether linear() and moe_experts() take FP8 weights (Weight with codes and block scales). The
  // loader keeps an FP8 checkpoint's weights as FP8 only for such a back-end and dequantizes them
  // to BF16 for the others.
  virtual bool fp8_weights_supported() const { return false; }

  // ---- ops
  // out[t] = table[ids[t]] converted to out.dtype. table [V, H], ids [T] I32, out [T, H].
  virtual void embedding(const Tensor& table, const Tensor& ids, Tensor out) = 0;
  // out = rms_norm(x) * w over the last dim. x, out [T, H]; w [H].
  virtual void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) = 0;
  // residual += x; out = rms_norm(residual) * w. residual, x, out [T, H].
  virtual void add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) = 0;
  // out = a · wᵀ. a [M, K] act dtype, w [N, K] any float dtype or FP8 (Weight), out [M, N] (act
  // dtype or F32).
  virtual void linear(const Tensor& a, const Weight& w, Tensor out) = 0;
  // out_i = a · w_iᵀ for each pair, as linear(): products of one input that a back-end may run as
  // one (the q, k and v projections). The default runs linear() for each.
  struct LinearOut {
    const Weight* w;
    Tensor out;
  };
  virtual void linears(const Tensor& a, std::span<const LinearOut> outs) {
    for (const LinearOut& o : outs) linear(a, *o.w, o.out);
  }
  // In place: per-head RMSNorm (weights [D]) of q [T, Hq, D] and k [T, Hkv, D], then RoPE at
  // positions [T] I32. Undefined norm weights (both): RoPE only. Contract: ops/contract.h.
  virtual void qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                            const Tensor& positions, const RopeParams& rope) = 0;
  // Writes k, v [T, Hkv, D] into the cache at slots [T] I32 (slot = block * block_size + offset);
  // a row with slot -1 (padding) is skipped.
  virtual void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) = 0;
  // qk_norm_rope, then kv_store of the rotated k and v (a one-rank attention layer's two steps); a
  // back-end may run them as one.
  virtual void qk_norm_rope_store(Tensor q, Tensor k, const Tensor& v, const Tensor& q_norm_w, const Tensor& k_norm_w,
                                  float eps, const Tensor& positions, const RopeParams& rope, const Tensor& slots,
                                  KvLayer cache) {
    qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, positions, rope);
    kv_store(k, v, slots, cache);
  }
  // Causal GQA attention of each AttnBlock over the paged cache. q, out [T, Hq, D]; lse [T, Hq]
  // F32 (natural log of the softmax denominator incl. scale) is written when defined.
  virtual void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                         Tensor lse) = 0;
  // Router: softmax(logits) in fp32 over E, top-k (ties to the lower id), renormalized when
  // `renormalize`. logits [T, E]; ids [T, K] I32; weights [T, K] F32.
  virtual void moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) = 0;
  // A MoE layer's router: logits = x · routerᵀ (linear(), logits [T, E] F32), then moe_route of
  // them. A back-end may run both as one (decode steps on CUDA).
  virtual void moe_gate(const Tensor& x, const Weight& router, int top_k, bool renormalize, Tensor logits, Tensor ids,
                        Tensor weights) {
    linear(x, router, logits);
    moe_route(logits, top_k, renormalize, ids, weights);
  }
  // residual += x; h = rms_norm(residual) · norm_w (add_rms_norm), then moe_gate of h: a sub-layer's
  // residual add and norm with the MoE router after them; a back-end may run them as one (decode
  // steps on CUDA).
  virtual void add_rms_norm_moe_gate(Tensor residual, const Tensor& x, const Tensor& norm_w, float eps, Tensor h,
                                     const Weight& router, int top_k, bool renormalize, Tensor logits, Tensor ids,
                                     Tensor weights) {
    add_rms_norm(residual, x, norm_w, eps, h);
    moe_gate(h, router, top_k, renormalize, logits, ids, weights);
  }
  // out[t] = Σ_k weights[t,k] · down(silu(gate(x[t])) ⊙ up(x[t])) over the k whose expert is in
  // the shard; other experts are skipped (another rank holds them; a token with none gets 0). Out
  // is written, not added to: no fill before it (a decode step's chain is one kernel shorter).
  // x, out [T, H].
  virtual void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                           Tensor out) = 0;
  // moe_experts into out, then residual += out; h = rms_norm(residual) · norm_w (add_rms_norm): the
  // MoE block with the next sub-layer's residual add and norm. A back-end may fuse the sum into the
  // experts' last kernel and leave out unwritten (CUDA). h may be x: the experts read x first.
  virtual void moe_experts_add_rms_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                        const ExpertShard& shard, Tensor out, Tensor residual, const Tensor& norm_w,
                                        float eps, Tensor h) {
    moe_experts(x, ids, weights, shard, out);
    add_rms_norm(residual, out, norm_w, eps, h);
  }
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
  // Merges two partial attentions of the same queries over disjoint key sets, in place:
  // out = (e^lse·out + e^lse2·out2) / (e^lse + e^lse2), lse = log(e^lse + e^lse2). out, out2
  // [T, Hq, D] act dtype; lse, lse2 [T, Hq] F32; -inf marks an empty key set.
  virtual void attention_merge(Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) = 0;
  // Draws one token per row of logits [R, V] F32; rows.size() == R; ids [R] I32. Every back-end
  // runs this algorithm (reference: backends/cpu/cpu_sample.cpp), per row, with l = the logits:
  // 0. NaN counts as -inf and -0 as +0. A row with no logit above -inf yields id -1.
  // 1. Greedy (temperature <= 0 or top_k == 1): the argmax, ties to the lowest id.
  // 2. m = max l; d_i = (l_i - m) / T in fp32 (0 where l_i == m, so +inf logits share the mass);
  //    e_i = float(exp(double(d_i))), so e_max = 1 and p_i = e_i / Σe. (d is bit-identical
  //    everywhere; e is too except when exp lands within a double ulp of a float rounding point.)
  // 3. top-k (0 < k < V): keep the k first tokens ranked by (l desc, id asc): l > l_(k), or
  //    l == l_(k) and id <= the id of the k-th ranked token.
  // 4. top-p (< 1): over the top-k survivors K, with M_K = Σ_K e (double), the threshold τ is the
  //    largest value of e among K such that Σ_{i∈K, e_i >= τ} e_i >= top_p · M_K (double); keep
  //    e_i >= τ. Every token whose e equals τ is kept (the set can exceed the smallest one by ties).
  // 5. min-p (> 0): keep e_i >= min_p (≡ p_i >= min_p · p_max, since e_max = 1).
  // 6. u = sample_uniform(seed, step) (cpu_backend.h): with mix64 SplitMix64's finalizer,
  //    u = (mix64(mix64(seed) + (step + 1) · 0x9E3779B97F4A7C15) >> 40) · 2^-24, in [0, 1), exact in
  //    fp32. M = Σ e over the kept tokens (double); the token is the first id, ascending,
  //    whose cumulative kept mass exceeds u · M; if rounding leaves none, the last kept id with
  //    e > 0. Sums may be taken in any order: back-ends differ only where u · M lies within
  //    rounding of a CDF boundary (or top_p · M_K of a top-p step).
  virtual void sample(const Tensor& logits, const std::vector<SampleRow>& rows, Tensor ids) = 0;
};

// Owns one allocation of a back-end; move-only.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Backend& be, size_t bytes) : be_(&be), bytes_(bytes), ptr_(bytes ? be.alloc(bytes) : nullptr) {}
  ~Buffer() { reset(); }
  Buffer(Buffer&& o) noexcept : be_(o.be_), bytes_(o.bytes_), ptr_(o.ptr_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      be_ = o.be_;
      bytes_ = o.bytes_;
      ptr_ = o.ptr_;
      o.ptr_ = nullptr;
      o.bytes_ = 0;
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

// Kernel choices of a back-end (--attention-backend, --moe-runner-backend, --fp8-weights). "auto":
// the back-end picks per call. CUDA: attention auto | cudnn | ws | wgmma | mma (prefill;
// docs/attention.md), MoE auto | mma | wgmma | wgmma128 | wgmma-ws | cublas (the expert GEMMs of batches above
// the decode sizes; backends/cuda/cuda_moe.cpp). The CPU back-end has one kernel of each and takes
// only "auto". fp8: auto (FP8 checkpoint weights stay FP8 where the back-end computes with them:
// the CPU, and CUDA on compute capability 9.0) | bf16 (every back-end gets them dequantized to
// BF16 at load).
struct BackendOptions {
  std::string attention = "auto";
  std::string moe = "auto";
  std::string fp8 = "auto";
  bool pdl = true;  // CUDA: programmatic dependent launch of the decode-path kernels (--disable-pdl: off)
};

// Back-end factory: "cpu" always; "cuda" when built with CUDA (device index = ordinal). Throws
// cpinfer::Error for options the back-end does not take.
std::unique_ptr<Backend> make_backend(const std::string& kind, int device_index = 0, const BackendOptions& opt = {});
// simd = false: the CPU back-end's generic (baseline x86-64) kernels only (tests). fp8 = false: it
// says it takes no FP8 weights (fp8_weights_supported()), so the loader dequantizes them to BF16.
std::unique_ptr<Backend> make_cpu_backend(bool simd = true, bool fp8 = true);
#ifdef CPINFER_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(int device_index, const BackendOptions& opt = {});
#endif

}  // namespace cpinfer
