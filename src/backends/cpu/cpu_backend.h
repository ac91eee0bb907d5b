// The CPU reference back-end: plain loops + OpenBLAS sgemm, fp32 activations and fp32
// accumulation everywhere. Every other back-end is tested against it, so clarity and agreement
// with Hugging Face transformers' fp32 forward come before speed; it is still fast enough for CI
// (OpenMP over independent rows/heads/tiles, sgemm for every matrix product).
//
// Activations (x, q, k, out, logits ...) must be F32; weights (linear, experts, norms, embedding
// table) may be BF16/F16/F32 and are converted to fp32 on the fly; the weights of linear layers and
// experts may also be FP8 with block scales (Weight), dequantized on the fly as transformers does
// (e4m3 value · scale in fp32); the KV cache may be any of the three float types. Every op checks shapes and dtypes
// first and throws cpinfer::Error with the op and tensor named; ops return only when the work is done (sync() is a
// no-op).
#pragma once
#include <algorithm>
#include <cstdint>
#include <span>

#include "ops/backend.h"

namespace cpinfer {

namespace cpu {
// The kernel sets of the matrix products, each a superset of the one before: Generic (baseline
// x86-64, or any other CPU), Avx2 (AVX2 + FMA + F16C), Avx512 (AVX-512 F/BW/DQ/VL as well).
enum class Kernels : int { Generic = 0, Avx2 = 1, Avx512 = 2 };
// The best set this CPU runs.
Kernels best_kernels();
}  // namespace cpu

class CpuBackend final : public Backend {
 public:
  // simd = false: the generic kernels only (tests). fp8 = false: fp8_weights_supported() says no, so
  // the loader dequantizes FP8 weights to BF16 (the FP8 kernels still take FP8 weights given directly).
  explicit CpuBackend(bool simd = true, bool fp8 = true)
      : CpuBackend(simd ? cpu::Kernels::Avx512 : cpu::Kernels::Generic, fp8) {}
  // The products' kernels up to `most` (tests run every set the CPU has this way).
  CpuBackend(cpu::Kernels most, bool fp8) : kernels_(std::min(most, cpu::best_kernels())), fp8_(fp8) {}
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }
  DType act_dtype() const override { return DType::F32; }

  void* alloc(size_t bytes) override;
  void dealloc(void* p) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void copy(void* dst, const void* src, size_t bytes) override;
  void fill_zero(Tensor t) override;
  void sync() override {}
  bool fp8_weights_supported() const override { return fp8_; }

  void embedding(const Tensor& table, const Tensor& ids, Tensor out) override;
  void rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) override;
  void add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) override;
  void linear(const Tensor& a, const Weight& w, Tensor out) override;
  void qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                    const Tensor& positions, const RopeParams& rope) override;
  void kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) override;
  void attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                 Tensor lse) override;
  void moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) override;
  void moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                   Tensor out) override;
  void silu_mul(const Tensor& gate, const Tensor& up, Tensor out) override;
  void add(Tensor a, const Tensor& b) override;
  void gather_rows(const Tensor& src, const Tensor& idx, Tensor out) override;
  void scatter_rows(const Tensor& src, const Tensor& idx, Tensor out) override;
  void convert(const Tensor& src, Tensor dst) override;
  void attention_merge(Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) override;
  void sample(const Tensor& logits, const std::vector<SampleRow>& rows, Tensor ids) override;

 private:
  cpu::Kernels kernels_;
  bool fp8_ = true;
};

// ---- token sampling reference (cpu_sample.cpp): the algorithm of Backend::sample (ops/backend.h),
// shared by CpuBackend::sample, the host Sampler (engine/sampler.h) and the CUDA back-end's host
// side (which takes the uniform draw from here, so both back-ends draw the same u).

// The uniform u in [0, 1) of draw `step` of a sequence seeded with `seed` (24-bit, exact in fp32).
float sample_uniform(uint64_t seed, uint64_t step);
// Greedy rows: temperature <= 0 or top_k == 1.
inline bool sample_row_greedy(const SampleRow& r) { return r.temperature <= 0.0f || r.top_k == 1; }

// What one draw saw, for tests that compare back-ends: a back-end whose sums round differently can
// pick another token only when `draw_margin` (or `top_p_margin`) is within rounding of 0.
struct SampleTrace {
  float u = 0.0f;
  double kept_mass = 0.0;     // Σ e over the kept tokens
  double target = 0.0;        // u · kept_mass
  double draw_margin = 1.0;   // distance of target to the nearest CDF boundary of the chosen id, / kept_mass
  double top_p_margin = 1.0;  // distance of top_p · mass to the cumulative masses around the top-p threshold, / mass
  int64_t n_kept = 0;         // tokens with e > 0 that passed every filter
};
// One row of Backend::sample: the token id drawn from `logits` [V], or -1 when no logit is above
// -inf (every one is -inf or NaN). Throws on V == 0 or a bad row (contract::sample_row).
int32_t sample_reference(std::span<const float> logits, const SampleRow& row, SampleTrace* trace = nullptr);

namespace cpu {

// out[m, n] = Σ_k a[m, k] · w[n, k] for m < M, n < N = w.dim(0); a fp32 [M, K] (row stride K), w
// [N, K] in F32/F16/BF16 or FP8 with block scales (row stride K), out fp32 with row stride ldc.
// Non-F32 weights are converted (FP8: dequantized, code · scale in fp32) in blocks of rows into a
// thread-local scratch, one cblas_sgemm per block; a few rows of `a` are multiplied row by row. OpenMP threads split
// the columns (or rows); OpenBLAS (opened at run time, cpu_linear.cpp) runs single-threaded: when it loads it gets
// openblas_set_num_threads(1) for the process, so only one thread pool ever spins. Each element's result does not
// depend on the thread count. `kernels`: the best kernel set used (at most what the CPU has).
void gemm_wt(const float* a, int64_t M, int64_t K, const Weight& w, float* out, int64_t ldc,
             Kernels kernels = best_kernels());

// What runs the GEMMs, e.g. "OpenBLAS (SkylakeX kernels)"; the first call loads OpenBLAS.
const std::string& gemm_library();

// Weight rows [n0, n0 + rows) of FP8 `w` dequantized to fp32 `out` [rows, K]: code · scale rounded to
// fp32, bit-identical on every kernel set.
void dequantize_fp8(const Weight& w, int64_t n0, int64_t rows, float* out, Kernels kernels = best_kernels());

}  // namespace cpu
}  // namespace cpinfer
