// CudaBackend: the Backend interface (ops/backend.h) on one NVIDIA GPU. Activations are BF16,
// every op accumulates in fp32, and all work is ordered on one CUDA stream per back-end (exposed
// through stream() so that communication can later overlap with it).
#pragma once
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <vector>

#include "backends/cuda/cudnn_attention.h"
#include "backends/cuda/fp8_lt.h"
#include "backends/cuda/kernels/kernels.h"
#include "ops/backend.h"

namespace cpinfer::cuda {

inline constexpr size_t kCublasWorkspaceBytes = 32u << 20;  // cuBLAS wants >= 32 MiB on Hopper

// Plain copies of the views for the kernel launchers (kernels/kernels.h).
inline DevTensor dev(const Tensor& t) {
  DevTensor d;
  d.data = t.data;
  d.dtype = t.dtype;
  d.ndim = t.ndim;
  for (int i = 0; i < t.ndim; ++i) d.shape[i] = t.shape[i];
  return d;
}
inline DevKv dev(const KvLayer& kv) { return DevKv{dev(kv.k), dev(kv.v)}; }
inline DevAttnBatch dev(const AttnBatch& b) {
  DevAttnBatch d;
  d.blocks = b.dev_blocks.ptr<const int32_t>();
  d.n_blocks = static_cast<int>(b.dev_blocks.dim(0));
  d.block_table = b.dev_block_table.ptr<const int32_t>();
  d.max_blocks_per_seq = b.max_blocks_per_seq;
  d.max_q_len = b.max_q_len;
  d.max_kv_len = b.max_kv_len;
  return d;
}

class CudaBackend : public Backend {
 public:
  // Throws cpinfer::Error for a missing device or an option it does not take (BackendOptions).
  explicit CudaBackend(int device_index, const BackendOptions& opt = {});
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  Device device() const override { return Device::CUDA; }
  std::string name() const override;
  DType act_dtype() const override { return DType::BF16; }

  void* alloc(size_t bytes) override;
  void dealloc(void* p) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill_zero(Tensor t) override;
  void sync() override;
  void* native_stream() override { return stream_; }
  bool graphs_supported() const override { return true; }
  // FP8 weights stay FP8 (cuda_fp8.cpp) on a compute capability 9.0 GPU unless --fp8-weights bf16.
  bool fp8_weights_supported() const override { return fp8_weights_; }
  // What linear() runs for an FP8 weight (cuda_fp8.cpp); tests pick their reference by it:
  //   Skinny       <= kSkinnyMaxRows rows: the own kernel on the codes, BF16 activations as they are
  //                (K % 128 != 0, or not Hopper);
  //   BlockScaled  the activations quantized per (row, 128 columns) to e4m3, then cuBLASLt's FP8
  //                GEMM with 1x128 (activation) and 128x128 (weight) block scales over the rows
  //                padded to a multiple of 4 (Hopper, K % 128 == 0, N % 16 == 0, and cuBLASLt
  //                offers an algorithm);
  //   Dequantize   anything else: the weight dequantized to BF16 in scratch, then the BF16 GEMM;
  //   SkinnyQuantized  <= kSkinnyFp8QuantizedMaxRows (16) rows on Hopper with K % 128 == 0: the
  //                activations quantized as BlockScaled's, the products on the tensor cores
  //                (kernels/fp8_mma.cuh).
  enum class Fp8Path { Skinny, BlockScaled, Dequantize, SkinnyQuantized };
  Fp8Path fp8_linear_path(const Tensor& a, const Weight& w, const Tensor& out);
  // Whether FP8 products over K take the quantized skinny kernel (Fp8Path::SkinnyQuantized, and
  // linears' one launch), row count aside.
  bool skinny_fp8_quantized(int64_t k) const { return hopper_ && skinny_fp8_quantized_supported(k); }
  // Whether moe_experts with FP8 experts (cuda_moe_fp8.cpp) quantizes the activations per (row,
  // 128 columns) for a call of n_pairs (token, expert) pairs over `count` local experts: batches
  // above the decode sizes on Hopper with H and I multiples of 128 and 16-byte aligned x and codes
  // (the grouped wgmma FP8 GEMMs: by default the warp-specialized ones writing y in BF16, with
  // --moe-runner-backend wgmma the first ones writing y in F32; or cuBLASLt per expert with
  // --moe-runner-backend cublas). Else the row-wise kernels run on the BF16 activations.
  bool moe_fp8_blocked(int64_t n_pairs, int count, int64_t hidden, int64_t inter, bool aligned) const;
  // Whether the cuBLASLt FP8 scale-layout probe has run (lazily: ensure_fp8_lt_probe below).
  bool fp8_lt_probed() const { return lt_probed_; }
  // Whether linear() runs BF16 GEMMs of at most kSkinnyMaxRows (2) rows on the own streaming kernel
  // (default) or on cuBLAS (tests compare the two).
  void set_skinny_gemm(bool on) { skinny_gemm_ = on; }
  void begin_capture() override;
  std::unique_ptr<OpGraph> end_capture() override;
  uint64_t memory_epoch() const override { return memory_epoch_; }

  void embedding(const Tensor& table, const Tensor& ids, Tensor out) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) override;
  void add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) override;
  void linear(const Tensor& a, const Weight& w, Tensor out) override;
  void linears(const Tensor& a, std::span<const LinearOut> outs) override;
  void qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                    const Tensor& positions, const RopeParams& rope) override;
  void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) override;
  void qk_norm_rope_store(Tensor q, Tensor k, const Tensor& v, const Tensor& q_norm_w, const Tensor& k_norm_w,
                          float eps, const Tensor& positions, const RopeParams& rope, const Tensor& slots,
                          KvLayer cache) override;
  void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                 Tensor lse) override;
  void moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) override;
  void moe_gate(const Tensor& x, const Weight& router, int top_k, bool renormalize, Tensor logits, Tensor ids,
                Tensor weights) override;
  void add_rms_norm_moe_gate(Tensor residual, const Tensor& x, const Tensor& norm_w, float eps, Tensor h,
                             const Weight& router, int top_k, bool renormalize, Tensor logits, Tensor ids,
                             Tensor weights) override;
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                   Tensor out) override;
  void moe_experts_add_rms_norm(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                                Tensor out, Tensor residual, const Tensor& norm_w, float eps, Tensor h) override;
  void silu_mul(const Tensor& gate, const Tensor& up, Tensor out) override;
  void add(Tensor a, const Tensor& b) override;
  void gather_rows(const Tensor& src, const Tensor& idx, Tensor out) override;
  void scatter_rows(const Tensor& src, const Tensor& idx, Tensor out) override;
  void convert(const Tensor& src, Tensor dst) override;
  void attention_merge(Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) override;
  void sample(const Tensor& logits, const std::vector<SampleRow>& rows, Tensor ids) override;

  cudaStream_t stream() const { return stream_; }

  // The kernel behind prefill attention (head_dim 128, BF16). Auto (the default) picks per call an
  // own kernel (see own_prefill_kernel): on Hopper the warp-specialized one (Ws), which is ahead of
  // cuDNN's fused attention at every length measured (attention_bench, H200, 2026-12-04: 583 / 691
  // / 614 / 616 TFLOP/s at 4K / 16K / 32K / 128K with pages of 16 in a fresh prompt's order against
  // 456 / 625 / 583 / 540 for cuDNN's dense graph). A set kernel runs every call: Ws, Wgmma, MmaSync, or cuDNN's fused
  // attention (cudnn_attention.h) for the calls it takes, with the automatic own kernel for the
  // others. BackendOptions::attention (--attention-backend auto|cudnn|ws|ws-1pass|wgmma|mma) sets it at
  // construction (cudnn where cuDNN cannot be loaded: a warning, and Auto; Ws runs in two passes,
  // AttentionWsConfig::two_pass, except under ws-1pass); tests switch it to cover each. set_prefill_kernel(Cudnn)
  // throws "cuDNN not available: <reason>" then.
  enum class PrefillKernel { Auto, MmaSync, Wgmma, Ws, Cudnn };
  static PrefillKernel parse_attention_backend(const std::string& name);
  void set_prefill_kernel(PrefillKernel k);
  // The expert GEMMs of batches above the decode sizes (cuda_moe.cpp): Grouped (auto: wgmma on
  // Hopper, mma.sync elsewhere), Mma, Wgmma, Wgmma128 (128 x 128 tiles) or Cublas (per expert, one
  // host synchronization per call; for comparison). BackendOptions::moe (--moe-runner-backend
  // auto|mma|wgmma|wgmma128|cublas) sets it; the wgmma ones need compute capability 9.0.
  enum class MoeGemm { Grouped, Mma, Wgmma, Wgmma128, WgmmaWs, Cublas };
  static MoeGemm parse_moe_runner_backend(const std::string& name);
  void set_moe_gemm(MoeGemm m);
  MoeGemm moe_gemm() const { return moe_gemm_; }
  PrefillKernel prefill_kernel() const { return prefill_kernel_; }
  // The Ws kernel's settings (kernels.h); tests switch its softmax between one pass and two.
  void set_ws_config(const AttentionWsConfig& cfg) { ws_cfg_ = cfg; }
  const AttentionWsConfig& ws_config() const { return ws_cfg_; }
  bool wgmma_supported() const { return hopper_; }
  // ---- the cuDNN prefill path. "" when cuDNN is usable here, else "cuDNN not available: <why>"
  // (the first call loads it).
  std::string cudnn_unavailable_reason();
  // Whether the cuDNN path takes this attention call (""), else why not, and (call) whether it
  // runs the dense graph; the first call for a shape bucket builds its plan.
  std::string cudnn_check(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, const Tensor& out,
                          const Tensor& lse, CudnnCall* call = nullptr);
  int64_t cudnn_calls() const { return cudnn_calls_; }              // attention calls run on cuDNN so far
  int64_t cudnn_dense_calls() const { return cudnn_dense_calls_; }  // of them, on the dense graph
  // fp8_block_scaled() calls so far: one per FP8 block-scaled linear, one per linears() whose
  // products share one quantization (tests tell the two apart).
  int64_t fp8_block_scaled_calls() const { return fp8_block_scaled_calls_; }
  int device_index() const { return device_; }

 private:
  // The argument checks of linear (also run by linears' one-launch path), qk_norm_rope and kv_store
  // (also run by qk_norm_rope_store).
  void check_linear(const Tensor& a, const Weight& w, const Tensor& out);
  void check_qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                          const Tensor& positions, const RopeParams& rope);
  void check_kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, const KvLayer& cache);
  // Scratch memory reused across ops on this stream; grows (after a stream sync) when too small,
  // keeping the first `keep_bytes` of its old content.
  void* workspace(size_t bytes, size_t keep_bytes = 0);
  // The pieces of scratch one op needs, bump-allocated from one workspace() request:
  // carve_workspace(layout) runs layout(bump) twice, once to add up the sizes of the pieces it
  // takes (Bump::take, each 256-byte aligned) and once, after the request, to hand out their
  // addresses; returns the bytes. keep_bytes as for workspace() (the pieces taken first keep their
  // addresses when a later layout starts with the same ones).
  struct Bump {
    uintptr_t base = 0;
    size_t used = 0;
    template <class T>
    T* take(size_t count) {
      T* p = reinterpret_cast<T*>(base + used);
      used += (count * sizeof(T) + 255) / 256 * 256;
      return p;
    }
  };
  template <class Layout>
  size_t carve_workspace(Layout&& layout, size_t keep_bytes = 0) {
    Bump size;
    layout(size);
    Bump at{reinterpret_cast<uintptr_t>(workspace(size.used, keep_bytes))};
    layout(at);
    return at.used;
  }
  // The device copy of rope.inv_freq, uploaded once per distinct content.
  const float* inv_freq_on_device(const RopeParams& rope);
  // Device array [3 · count] of the shard's gate | up | down weight pointers, uploaded once.
  const void* const* expert_pointers_on_device(const ExpertShard& shard);
  // out = a · wᵀ through cuBLAS with fp32 compute: a [M, K], w [N, K], out [M, N].
  void gemm(const Tensor& a, const Tensor& w, Tensor out);
  // ---- FP8 (cuda_fp8.cpp, cuda_moe_fp8.cpp)
  void linear_fp8(const Tensor& a, const Weight& w, Tensor out);
  // out_i = a · w_iᵀ on Fp8Path::BlockScaled for every pair (the caller has checked that each takes
  // it): a's rows quantized once for all of them, then one cuBLASLt GEMM per pair (linears: q, k
  // and v of a decode batch above the skinny kernels' rows share one quantizing launch).
  void fp8_block_scaled(const Tensor& a, std::span<const LinearOut> outs);
  // out [M, N] (row-major, BF16 or F32, ld N) = (aq · a_scale) · (w · w_scale)ᵀ on cuBLASLt: aq
  // [M, K] e4m3 with VEC128 scales a_scale[kb · M + m]; w [N, K] e4m3 with BLK128x128 scales
  // w_scale[nb · w_scale_ld + kb], w_scale_ld a multiple of 4. K % 128 == 0, M % 4 == 0 (callers
  // pad the rows). Throws when cuBLASLt has no algorithm (callers ask fp8_lt_supported first).
  void fp8_gemm_lt(const void* aq, const float* a_scale, int64_t m, const void* w, const float* w_scale, int64_t n,
                   int64_t k, void* out, DType out_dtype);
  // How cuBLASLt reads the block scales, per class of K (K/128 a multiple of 4 or not): the
  // activation scales' order and whether the weight scales' rows are padded to a multiple of 4
  // floats. cuBLASLt takes no stride for them, so fp8_lt_probe() finds the layout by running a
  // small GEMM per candidate against a host reference; ok = false: none matched (the block-scaled
  // GEMM is then not used for that class). The candidates, first the one torch's _scaled_mm hands
  // cuBLASLt (M-major activation scales, padded weight-scale rows).
  struct Fp8LtLayout {
    bool ok = false;
    Fp8ActScales act = Fp8ActScales::MMajor;
    bool w_padded = true;
  };
  Fp8LtLayout lt_layout_[2];
  bool lt_probing_ = false;
  void fp8_lt_probe();
  // The probe runs once per back-end, lazily: a BF16 model never pays for it (it synchronizes and
  // takes cuBLASLt's heuristics; the back-end used to run it at construction on every Hopper GPU).
  // It runs at the first lt_layout() query, i.e. the first FP8 product that could take cuBLASLt's
  // block-scaled GEMM (an FP8 linear of more than kSkinnyMaxRows rows, FP8 experts on
  // --moe-runner-backend cublas), or at begin_capture() once this back-end has been handed FP8
  // weights (fp8_used_): it uploads, downloads and synchronizes, which a stream capture forbids, so
  // it must have run before one starts. The engine's decode graphs record a step only after running
  // it eagerly, so their first FP8 linear runs it at the latest there. Asked for while the stream
  // is capturing and not yet run, it throws (the capture fails; decode graphs then run eagerly).
  bool lt_probed_ = false;
  bool fp8_used_ = false;  // an FP8 weight reached linear() or moe_experts()
  void ensure_fp8_lt_probe();
  // The probe's result for one layout candidate (nmse of the GEMM against the host reference; +inf
  // when cuBLASLt rejects it).
  double fp8_lt_try(int64_t k, const Fp8LtLayout& cand);
  const Fp8LtLayout& lt_layout(int64_t k) {
    ensure_fp8_lt_probe();
    return lt_layout_[(k / 128) % 4 == 0 ? 0 : 1];
  }
  // Row stride (floats) of the weight scales as cuBLASLt reads them.
  int64_t lt_w_scale_ld(int64_t k) {
    const int64_t kb = k / 128;
    return lt_layout(k).w_padded ? (kb + 3) / 4 * 4 : kb;
  }
  // The layout launch_fp8_quantize_rows writes activation scales in for a GEMM over the rows
  // padded to a multiple of 4 (cuBLASLt's block-scaled GEMM takes no other M): M-major with the
  // padded row count as the stride (MMajorPad4 is that), the other layouts as probed.
  Fp8ActScales lt_quantize_layout(int64_t k) {
    const Fp8ActScales a = lt_layout(k).act;
    return a == Fp8ActScales::MMajor ? Fp8ActScales::MMajorPad4 : a;
  }
  // Whether cuBLASLt has a block-scaled FP8 algorithm for these sizes and the alignments of these
  // pointers (asked once per key), and the shape is one it takes.
  bool fp8_lt_supported(int64_t m, int64_t n, int64_t k, DType out_dtype, const void* w, const void* aq,
                        const void* out);
  bool gate_in_one_kernel(const Tensor& x, const Weight& router, int top_k, bool renormalize, const Tensor& logits,
                          const Tensor& ids, const Tensor& weights, const RowAddNorm* norm);
  // moe_experts after its checks; with `norm` its last kernel runs the residual add + RMSNorm of the
  // sum instead of writing out (moe_experts_add_rms_norm).
  void moe_experts_then(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard, Tensor out,
                        const RowAddNorm* norm);
  void zero_experts(Tensor out, const RowAddNorm* norm);
  void moe_experts_fp8(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard, Tensor out,
                       const RowAddNorm* norm);
  // The per-expert cuBLASLt path of FP8 experts: copies the offsets to the host (one stream
  // synchronization per call), like moe_experts_cublas. False when cuBLASLt lacks an algorithm
  // for one of the GEMMs (nothing was written to out).
  bool moe_experts_fp8_lt(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                          Tensor out, const RowAddNorm* norm);
  // The scratch of the device-scheduled MoE paths (cuda_moe.cpp, cuda_moe_fp8.cpp) from one
  // workspace request: the permutation's pieces, act [T·K, I] BF16 (unless with_act is false) and
  // y [T·K, H] of y_elt bytes per element, then whatever `more` takes.
  struct MoeScratch {
    int32_t *offsets = nullptr, *tile_start = nullptr, *active = nullptr;  // [count + 1] each
    int32_t *src_token = nullptr, *pair_row = nullptr;                     // [T·K] each
    int32_t* permute = nullptr;                                            // launch_moe_permute_tiled's block_counts
    void* act = nullptr;
    void* y = nullptr;
  };
  MoeScratch carve_moe_scratch(int count, size_t n_pairs, int64_t inter, int64_t hidden, size_t y_elt,
                               const std::function<void(Bump&)>& more = {}, bool with_act = true);
  // The start of the per-expert (cuBLAS, cuBLASLt) MoE paths: the call's pairs permuted by local
  // expert into the workspace's first pieces, and the segment offsets copied to the host (one
  // stream synchronization). A later carve_workspace starts its layout with take() and keeps
  // `bytes`, so those pieces keep their content (their addresses may move).
  struct ExpertRows {
    int count = 0;
    size_t n_pairs = 0, bytes = 0;
    int32_t *offsets = nullptr, *src_token = nullptr, *pair_row = nullptr;  // [count + 1], [T·K], [T·K]
    std::vector<int32_t> host_off;                                          // [count + 1]
    int64_t rows() const { return host_off[count]; }
    void take(Bump& w) {
      offsets = w.take<int32_t>(count + 1);
      src_token = w.take<int32_t>(n_pairs);
      pair_row = w.take<int32_t>(n_pairs);
    }
  };
  ExpertRows permute_rows_to_host(const Tensor& ids, const ExpertShard& shard);
  // Device arrays of the shard's code and scale pointers (uploaded once per shard).
  Fp8ExpertTables fp8_expert_tables_on_device(const ExpertShard& shard);
  // A device copy of `host` (pointers), uploaded once per distinct content.
  const void* const* pointer_table_on_device(std::vector<const void*> host);
  // MoE expert GEMMs of batches above 64 (token, expert) pairs: by default the device-scheduled
  // tensor-core grouped kernels, which never synchronize with the host: wgmma on compute
  // capability 9.0 (kernels/moe_gemm_wgmma.cu), mma.sync elsewhere (kernels/moe_gemm.cu). The
  // setting (moe_gemm_, --moe-runner-backend):
  //   auto                the default above;
  //   mma                 the mma.sync grouped kernels, also on Hopper;
  //   wgmma               the earlier wgmma kernels (no warp specialization, 128 x 256 tiles);
  //   wgmma128            the wgmma kernels with 128 x 128 tiles (for tuning);
  //   wgmma-ws            the Hopper default by name: the warp-specialized wgmma kernels (a
  //                       producer warpgroup loads, two multiply; expert outputs in BF16); the
  //                       wgmma settings need compute capability 9.0 (else an error);
  //   cublas              the per-expert cuBLAS path, which copies the segment offsets to the host
  //                       (a stream synchronization per call): for comparison and benchmarks only.
  // Shapes the grouped kernels do not take (H or I not a multiple of 64, unaligned pointers) use
  // the row-wise kernels whatever the setting (except cublas). FP8 experts (cuda_moe_fp8.cpp):
  // wgmma runs the first grouped FP8 kernels, cublas cuBLASLt per expert, every other setting the
  // warp-specialized grouped FP8 kernels.
  void moe_experts_cublas(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                          Tensor out, const RowAddNorm* norm);

  int device_ = 0;
  bool hopper_ = false;  // compute capability 9.0: the sm_90a wgmma kernels can run
  int n_sms_ = 1;
  PrefillKernel prefill_kernel_ = PrefillKernel::Auto;
  MoeGemm moe_gemm_ = MoeGemm::Grouped;
  int* attn_sched_ = nullptr;  // the Ws kernel's scratch (kAttnWsScratchInts, zero between calls)
  AttentionWsConfig ws_cfg_;
  unsigned* gate_ticket_ = nullptr;        // launch_moe_gate's counter (zero between launches)
  std::unique_ptr<CudnnAttention> cudnn_;  // created on first use
  int64_t cudnn_calls_ = 0;
  int64_t cudnn_dense_calls_ = 0;
  int64_t fp8_block_scaled_calls_ = 0;
  CudnnAttention& cudnn();
  // Runs the call on cuDNN when it takes it (cuda_backend_cudnn.cpp); false when it does not
  // (nothing was enqueued).
  bool attention_cudnn(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                       Tensor lse);
  // The own kernel that runs a call with KV pages of block_size tokens. Auto on Hopper: Ws where its
  // K/V arrive by TMA (block sizes >= 8 that are powers of two: 542-625 TFLOP/s with pages of 16 in
  // reverse order, 583-691 in order, against ~445 for wgmma; attention_bench, H200, 2026-12-04),
  // else Wgmma (Ws would copy every key with cp.async); mma.sync elsewhere.
  PrefillKernel own_prefill_kernel(int64_t block_size) const {
    if (prefill_kernel_ != PrefillKernel::Auto && prefill_kernel_ != PrefillKernel::Cudnn) return prefill_kernel_;
    if (!hopper_) return PrefillKernel::MmaSync;
    const bool tma_pages = block_size >= 8 && (block_size & (block_size - 1)) == 0;
    return tma_pages ? PrefillKernel::Ws : PrefillKernel::Wgmma;
  }
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  bool fp8_weights_ = false;
  // cuBLASLt FP8 GEMMs (descriptors + algorithm, fp8_lt.h) by (M, N, K, out dtype, weight,
  // activation and out alignment), including those for which cuBLASLt offers no algorithm; the
  // call for a key when it has one, else nullptr.
  const Fp8LtCall* fp8_lt_call(int64_t m, int64_t n, int64_t k, DType out_dtype, const void* w, const void* aq,
                               const void* out);
  std::map<std::array<int64_t, 7>, std::unique_ptr<Fp8LtCall>> lt_calls_;

  void* cublas_workspace_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  uint64_t memory_epoch_ = 0;  // frees of device memory (memory_epoch())
  bool skinny_gemm_ = true;    // linear() of <= kSkinnyMaxRows rows on the own kernel (set_skinny_gemm)
  bool capturing_ = false;
  struct RopeTable {
    std::vector<float> inv_freq;
    float* device = nullptr;
  };
  std::vector<RopeTable> rope_tables_;
  struct ExpertPointers {
    std::vector<const void*> host;
    void* device = nullptr;
    // FP8 tables: the TMA descriptors of the codes (Fp8ExpertTables::weight_maps), null where they
    // could not be encoded; tma_tried once encoding was attempted.
    void* tma = nullptr;
    bool tma_tried = false;
  };
  std::vector<ExpertPointers> expert_pointer_tables_;
  // The cached entry of pointer_table_on_device (uploaded on first use).
  ExpertPointers& expert_pointer_entry(std::vector<const void*> host);
  std::string name_;
};

}  // namespace cpinfer::cuda
