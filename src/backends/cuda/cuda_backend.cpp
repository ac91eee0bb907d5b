// CudaBackend: argument checks, memory, cuBLAS GEMMs and the orchestration of the kernels in
// kernels/. Every op validates shapes and dtypes on the host (a bad call throws naming the op and
// the offending tensor) and then only enqueues work on stream_; nothing here waits for the GPU
// except download(), sync(), workspace growth and the expert counts of moe_experts.
#include "backends/cuda/cuda_backend.h"

#include <cublasLt.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "backends/cpu/cpu_backend.h"
#include "backends/cuda/cuda_args.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"
#include "core/log.h"
#include "ops/contract.h"

namespace cpinfer::cuda {

const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
    default:
      return "unknown cuBLAS status";
  }
}

namespace {

const char* prefill_kernel_name(CudaBackend::PrefillKernel k) {
  switch (k) {
    case CudaBackend::PrefillKernel::Ws:
      return "ws (warp-specialized wgmma)";
    case CudaBackend::PrefillKernel::Wgmma:
      return "wgmma";
    case CudaBackend::PrefillKernel::MmaSync:
      return "mma.sync";
    case CudaBackend::PrefillKernel::Cudnn:
      return "cuDNN";
    case CudaBackend::PrefillKernel::Auto:
      return "auto";
  }
  return "?";
}

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32:
      return CUDA_R_32F;
    case DType::BF16:
      return CUDA_R_16BF;
    case DType::F16:
      return CUDA_R_16F;
    default:
      CPI_FAIL("no cuBLAS type for dtype ", dtype_name(t));
  }
}

}  // namespace

CudaBackend::PrefillKernel CudaBackend::parse_attention_backend(const std::string& name) {
  if (name == "auto") return PrefillKernel::Auto;
  if (name == "cudnn") return PrefillKernel::Cudnn;
  if (name == "ws" || name == "ws-1pass") return PrefillKernel::Ws;  // (one pass: see the constructor)
  if (name == "wgmma") return PrefillKernel::Wgmma;
  if (name == "mma") return PrefillKernel::MmaSync;
  CPI_FAIL("--attention-backend must be auto, cudnn, ws, ws-1pass, wgmma or mma, got '", name, "'");
}

CudaBackend::MoeGemm CudaBackend::parse_moe_runner_backend(const std::string& name) {
  if (name == "auto" || name == "grouped") return MoeGemm::Grouped;
  if (name == "mma") return MoeGemm::Mma;
  if (name == "wgmma") return MoeGemm::Wgmma;
  if (name == "wgmma128") return MoeGemm::Wgmma128;
  if (name == "wgmma-ws") return MoeGemm::WgmmaWs;
  if (name == "cublas") return MoeGemm::Cublas;
  CPI_FAIL("--moe-runner-backend must be auto, mma, wgmma, wgmma128, wgmma-ws or cublas, got '", name, "'");
}

CudaBackend::CudaBackend(int device_index, const BackendOptions& opt) : device_(device_index) {
  // Both settings are checked before the device is touched: a bad flag is a clear error anywhere.
  const PrefillKernel attention = parse_attention_backend(opt.attention);
  const MoeGemm moe = parse_moe_runner_backend(opt.moe);
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  CPI_CHECK(err == cudaSuccess, "cannot use CUDA: cudaGetDeviceCount failed: ", cudaGetErrorString(err));
  CPI_CHECK(device_index >= 0 && device_index < n, "CUDA device ", device_index, " does not exist (", n,
            " device(s) visible)");
  CUDA_CHECK(cudaSetDevice(device_));
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  name_ = std::string("cuda:") + std::to_string(device_) + " (" + prop.name + ")";
  hopper_ = prop.major == 9 && prop.minor == 0;
  n_sms_ = prop.multiProcessorCount;
  CPI_CHECK(attention == PrefillKernel::Auto || attention == PrefillKernel::MmaSync ||
                attention == PrefillKernel::Cudnn || hopper_,
            "--attention-backend ", opt.attention, " needs a compute capability 9.0 GPU, ", name_, " is ", prop.major,
            ".", prop.minor);
  CPI_CHECK(hopper_ || (moe != MoeGemm::Wgmma && moe != MoeGemm::Wgmma128 && moe != MoeGemm::WgmmaWs),
            "--moe-runner-backend ", opt.moe, " needs a compute capability 9.0 GPU, ", name_, " is ", prop.major, ".",
            prop.minor);
  prefill_kernel_ = attention;
  ws_cfg_.two_pass = opt.attention != "ws-1pass";
  moe_gemm_ = moe;
  // Decode-path kernels may start under the previous one's tail (compute capability 9.0; every
  // back-end of a process gets the same option).
  set_programmatic_launch(opt.pdl && prop.major >= 9);
  // Resources last: a bad setting above throws before anything needs freeing.
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  CUBLAS_CHECK(cublasCreate(&cublas_));
  CUBLAS_CHECK(cublasSetStream(cublas_, stream_));
  CUDA_CHECK(cudaMalloc(&cublas_workspace_, kCublasWorkspaceBytes));
  CUBLAS_CHECK(cublasSetWorkspace(cublas_, cublas_workspace_, kCublasWorkspaceBytes));
  CUBLAS_CHECK(cublasLtCreate(&lt_));
  // FP8 weights stay FP8 where the block-scaled FP8 GEMMs run (compute capability 9.0).
  fp8_weights_ = hopper_ && opt.fp8 != "bf16";
  CUDA_CHECK(cudaMalloc(&attn_sched_, kAttnWsScratchInts * sizeof(int)));
  CUDA_CHECK(cudaMemset(attn_sched_, 0, kAttnWsScratchInts * sizeof(int)));
  CUDA_CHECK(cudaMalloc(&gate_ticket_, sizeof(unsigned)));
  CUDA_CHECK(cudaMemset(gate_ticket_, 0, sizeof(unsigned)));
  if (prefill_kernel_ == PrefillKernel::Cudnn && !cudnn().available()) {  // a deployment without cuDNN keeps serving
    log_warn(cudnn_->unavailable_reason(), "; prefill attention stays on the own kernels");
    prefill_kernel_ = PrefillKernel::Auto;
  }
  // How cuBLASLt reads FP8 block scales is probed at the first FP8 product that needs it, not here
  // (ensure_fp8_lt_probe, cuda_backend.h).
  const char* own = prefill_kernel_ == PrefillKernel::Auto || prefill_kernel_ == PrefillKernel::Cudnn
                        ? (hopper_ ? "ws for KV pages of 8, 16, 32, ... tokens, wgmma for others" : "mma.sync")
                        : prefill_kernel_name(prefill_kernel_);
  const std::string first = prefill_kernel_ == PrefillKernel::Cudnn ? "cuDNN, else " : "";
  log_info("CUDA back-end on ", name_, ", ", prop.multiProcessorCount, " SMs, ", prop.totalGlobalMem >> 20,
           " MiB, prefill attention on ", first, own);
}

CudaBackend::~CudaBackend() {
  // Destructors must not throw: errors here are ignored (the process is tearing the device down).
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(stream_);
  for (auto& t : rope_tables_) cudaFree(t.device);
  for (auto& t : expert_pointer_tables_) {
    cudaFree(t.device);
    cudaFree(t.tma);
  }
  if (lt_) cublasLtDestroy(lt_);
  if (workspace_) cudaFree(workspace_);
  if (attn_sched_) cudaFree(attn_sched_);
  if (gate_ticket_) cudaFree(gate_ticket_);
  if (cublas_) cublasDestroy(cublas_);
  if (cublas_workspace_) cudaFree(cublas_workspace_);
  if (stream_) cudaStreamDestroy(stream_);
}

std::string CudaBackend::name() const { return name_; }

void CudaBackend::set_moe_gemm(MoeGemm m) {
  CPI_CHECK(hopper_ || (m != MoeGemm::Wgmma && m != MoeGemm::Wgmma128 && m != MoeGemm::WgmmaWs),
            "the wgmma MoE kernels need a compute capability 9.0 GPU (", name_, ")");
  moe_gemm_ = m;
}

void CudaBackend::set_prefill_kernel(PrefillKernel k) {
  CPI_CHECK(k == PrefillKernel::Auto || k == PrefillKernel::MmaSync || k == PrefillKernel::Cudnn || hopper_, "the ",
            prefill_kernel_name(k), " attention kernel needs a compute capability 9.0 GPU (", name_, ")");
  if (k == PrefillKernel::Cudnn) CPI_CHECK(cudnn().available(), cudnn_->unavailable_reason());
  prefill_kernel_ = k;
}

// ---- memory

void* CudaBackend::alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  DeviceGuard g(device_);
  void* p = nullptr;
  cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    CPI_FAIL("CUDA out of memory: cannot allocate ", bytes >> 20, " MiB on ", name_, " (", free_b >> 20,
             " MiB free of ", total_b >> 20, " MiB): ", cudaGetErrorString(err));
  }
  return p;
}

void CudaBackend::dealloc(void* p) {
  if (!p) return;
  DeviceGuard g(device_);
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // the memory may still be in use by queued work
  CUDA_CHECK(cudaFree(p));
  ++memory_epoch_;
}

void CudaBackend::upload(void* dst, const void* host_src, size_t bytes) {
  if (bytes == 0) return;
  DeviceGuard g(device_);
  CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));  // the caller may free host_src on return
}

void CudaBackend::download(void* host_dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  DeviceGuard g(device_);
  CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void CudaBackend::copy(void* dst, const void* src, size_t bytes) {
  if (bytes == 0) return;
  DeviceGuard g(device_);
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
}

void CudaBackend::fill_zero(Tensor t) {
  if (t.numel() == 0) return;
  check_on_device(t, "fill_zero", "t");
  DeviceGuard g(device_);
  // Small buffers (a decode step's MoE output) by a kernel that keeps the step's programmatic launch
  // chain (a memset node ends it); large ones (a KV cache, a ring) by cudaMemset.
  if (t.nbytes() <= (size_t{1} << 20)) {
    CUDA_LAUNCH(launch_fill_zero(t.data, t.nbytes(), stream_), "fill_zero");
    return;
  }
  CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), stream_));
}

void CudaBackend::sync() {
  DeviceGuard g(device_);
  CUDA_CHECK(cudaStreamSynchronize(stream_));
}

void* CudaBackend::workspace(size_t bytes, size_t keep_bytes) {
  if (bytes <= workspace_bytes_) return workspace_;
  const size_t want = std::max(bytes, workspace_bytes_ * 3 / 2);
  void* fresh = alloc(want);
  if (workspace_) {
    if (keep_bytes > 0)
      CUDA_CHECK(cudaMemcpyAsync(fresh, workspace_, std::min(keep_bytes, workspace_bytes_), cudaMemcpyDeviceToDevice,
                                 stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // queued work may still use the old scratch
    CUDA_CHECK(cudaFree(workspace_));
    ++memory_epoch_;
  }
  workspace_ = fresh;
  workspace_bytes_ = want;
  return workspace_;
}

const float* CudaBackend::inv_freq_on_device(const RopeParams& rope) {
  for (const auto& t : rope_tables_)
    if (t.inv_freq == rope.inv_freq) return t.device;
  RopeTable t;
  t.inv_freq = rope.inv_freq;
  t.device = static_cast<float*>(alloc(rope.inv_freq.size() * sizeof(float)));
  upload(t.device, rope.inv_freq.data(), rope.inv_freq.size() * sizeof(float));
  rope_tables_.push_back(std::move(t));
  return rope_tables_.back().device;
}

// ---- ops

void CudaBackend::embedding(const Tensor& table, const Tensor& ids, Tensor out) {
  contract::embedding(table, ids, out);
  check_on_device(table, "embedding", "table");
  check_on_device(ids, "embedding", "ids");
  check_on_device(out, "embedding", "out");
  check_dtype(ids, DType::I32, "embedding", "ids");
  check_act(out, "embedding", "out");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_embedding(dev(table), dev(ids), dev(out), stream_), "embedding");
}

void CudaBackend::rms_norm(const Tensor& x, const Tensor& w, float eps, Tensor out) {
  contract::rms_norm("rms_norm", x, w, eps, out);
  check_on_device(x, "rms_norm", "x");
  check_on_device(w, "rms_norm", "w");
  check_on_device(out, "rms_norm", "out");
  check_act(x, "rms_norm", "x");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_rms_norm(DevTensor{}, dev(x), dev(w), eps, dev(out), stream_), "rms_norm");
}

void CudaBackend::add_rms_norm(Tensor residual, const Tensor& x, const Tensor& w, float eps, Tensor out) {
  contract::rms_norm("add_rms_norm", x, w, eps, out, &residual);
  check_on_device(residual, "add_rms_norm", "residual");
  check_on_device(x, "add_rms_norm", "x");
  check_on_device(w, "add_rms_norm", "w");
  check_on_device(out, "add_rms_norm", "out");
  check_act(x, "add_rms_norm", "x");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_rms_norm(dev(residual), dev(x), dev(w), eps, dev(out), stream_), "rms_norm");
}

void CudaBackend::gemm(const Tensor& a, const Tensor& w, Tensor out) {
  const int64_t m = a.rows(), k = a.cols(), n = w.dim(0);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    CUDA_CHECK(cudaMemsetAsync(out.data, 0, out.nbytes(), stream_));
    return;
  }
  CPI_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "linear: ", a.shape_str(), " x ", w.shape_str(),
            " is too large for one cuBLAS call");
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major out[M, N] = a[M, K] · w[N, K]ᵀ is column-major outᵀ[N, M] = wᵀ-op(w[K, N]) · a[K, M].
  CUBLAS_CHECK(cublasGemmEx(cublas_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                            static_cast<int>(k), &alpha, w.data, cuda_type(w.dtype), static_cast<int>(k), a.data,
                            cuda_type(a.dtype), static_cast<int>(k), &beta, out.data, cuda_type(out.dtype),
                            static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::check_linear(const Tensor& a, const Weight& w, const Tensor& out) {
  contract::linear(a, w, out);
  check_on_device(a, "linear", "a");
  check_on_device(w, "linear", "w");
  check_on_device(out, "linear", "out");
  check_act(a, "linear", "a");
  check_act(out, "linear", "out");
}

void CudaBackend::linear(const Tensor& a, const Weight& w, Tensor out) {
  check_linear(a, w, out);
  if (w.fp8()) {
    linear_fp8(a, w, out);
    return;
  }
  CPI_CHECK(w.dtype == DType::BF16 || w.dtype == DType::F32, "linear: weight dtype ", dtype_name(w.dtype),
            " is not supported on CUDA (BF16 or F32; convert the checkpoint)");
  DeviceGuard g(device_);
  if (a.dtype == DType::BF16 && w.dtype == DType::BF16) {
    // A few rows (decode): one streaming read of w; else cuBLAS. Both accumulate in fp32.
    if (skinny_gemm_ && skinny_gemm_supported(dev(a), dev(w), dev(out))) {
      CUDA_LAUNCH(launch_skinny_gemm(dev(a), dev(w), nullptr, dev(out), stream_), "skinny_gemm");
      return;
    }
    gemm(a, w, out);  // BF16 x BF16 -> BF16 or F32 output, fp32 accumulation
    return;
  }
  // Mixed or F32 operands: compute in F32 (cuBLAS wants A and B of one type).
  const int64_t m = a.rows(), k = a.cols(), n = w.dim(0);
  const size_t a_bytes = a.dtype == DType::F32 ? 0 : static_cast<size_t>(m * k) * 4;
  const size_t o_bytes = out.dtype == DType::F32 ? 0 : static_cast<size_t>(m * n) * 4;
  char* ws = static_cast<char*>(workspace((a_bytes + o_bytes + 255) / 256 * 256 + 256));
  Tensor a32 = a, w32 = w, o32 = out;
  if (a.dtype != DType::F32) {
    a32 = Tensor(ws, DType::F32, {m, k}, Device::CUDA);
    CUDA_LAUNCH(launch_convert(dev(a), dev(a32), stream_), "convert");
  }
  if (w.dtype != DType::F32) CPI_FAIL("linear: F32 activations need F32 weights (got ", dtype_name(w.dtype), ")");
  if (out.dtype != DType::F32) o32 = Tensor(ws + (a_bytes + 255) / 256 * 256, DType::F32, {m, n}, Device::CUDA);
  gemm(a32, w32, o32);
  if (out.dtype != DType::F32) CUDA_LAUNCH(launch_convert(dev(o32), dev(out), stream_), "convert");
}

// Decode-sized products of one input on BF16 or FP8 weights (one format for all): one skinny launch
// for all of them (q, k and v: the two small ones no longer pay a launch and a latency-bound tail of
// their own). Whether the launch applies is decided first; the op contract is then checked once,
// here for the one launch or for FP8 products that share one block-scaled quantization (more rows
// than the skinny kernels take), or by linear() for each product on the fallback.
void CudaBackend::linears(const Tensor& a, std::span<const LinearOut> outs) {
  bool one_launch = skinny_gemm_ && !outs.empty() && outs.size() <= static_cast<size_t>(kSkinnyMaxSegs) &&
                    a.device == Device::CUDA && a.rows() > 0;
  const bool fp8 = one_launch && outs[0].w->fp8();
  // FP8 on Hopper with K % 128 == 0: the activations quantized, the products on the tensor cores
  // (as linear()'s Fp8Path::SkinnyQuantized), up to kSkinnyFp8QuantizedMaxRows rows.
  const bool quantized = fp8 && skinny_fp8_quantized(a.cols());
  const int64_t max_rows = quantized ? kSkinnyFp8QuantizedMaxRows : kSkinnyMaxRows;
  DevTensor w[kSkinnyMaxSegs], s[kSkinnyMaxSegs], o[kSkinnyMaxSegs];
  for (size_t i = 0; one_launch && i < outs.size(); ++i) {
    const Weight& wi = *outs[i].w;
    const Tensor& oi = outs[i].out;
    one_launch = wi.fp8() == fp8 && wi.device == Device::CUDA && oi.device == Device::CUDA &&
                 oi.dtype == outs[0].out.dtype && oi.rows() == a.rows() &&
                 (!fp8 || (wi.scale.device == Device::CUDA && wi.scale.data != nullptr));
    if (one_launch) {
      w[i] = dev(wi);
      s[i] = fp8 ? dev(wi.scale) : DevTensor{};
      o[i] = dev(oi);
      one_launch = skinny_gemm_supported(dev(a), w[i], o[i], max_rows);
    }
  }
  if (!one_launch) {
    // More rows than the skinny kernels take, FP8 weights: where every product takes cuBLASLt's
    // block-scaled GEMM, a's rows are quantized once for all of them.
    DeviceGuard g(device_);
    // (check_linear raises on a tensor off the device, as Backend::linears' linear() would.)
    bool blocked = outs.size() > 1 && a.dtype == DType::BF16 && a.rows() > 0 && a.cols() > 0;
    for (const LinearOut& lo : outs)
      blocked = blocked && lo.w->fp8() && lo.w->scale.device == Device::CUDA && lo.w->scale.data != nullptr;
    if (blocked) {
      for (const LinearOut& lo : outs) check_linear(a, *lo.w, lo.out);
      for (const LinearOut& lo : outs)
        blocked = blocked && lo.w->dim(0) > 0 && fp8_linear_path(a, *lo.w, lo.out) == Fp8Path::BlockScaled;
    }
    if (!blocked) {
      Backend::linears(a, outs);
      return;
    }
    fp8_used_ = true;
    fp8_block_scaled(a, outs);
    return;
  }
  for (const LinearOut& lo : outs) check_linear(a, *lo.w, lo.out);
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_skinny_gemms(dev(a), w, fp8 ? s : nullptr, o, static_cast<int>(outs.size()), stream_, quantized),
              "skinny_gemms");
}

void CudaBackend::qk_norm_rope(Tensor q, Tensor k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                               const Tensor& positions, const RopeParams& rope) {
  check_qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, positions, rope);
  DeviceGuard g(device_);
  const float* inv_freq = inv_freq_on_device(rope);
  CUDA_LAUNCH(launch_qk_norm_rope(dev(q), dev(k), dev(q_norm_w), dev(k_norm_w), eps, dev(positions), inv_freq,
                                  rope.attention_factor, stream_),
              "qk_norm_rope");
}

void CudaBackend::check_qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w,
                                     float eps, const Tensor& positions, const RopeParams& rope) {
  contract::qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, positions, rope);
  check_on_device(q, "qk_norm_rope", "q");
  check_on_device(k, "qk_norm_rope", "k");
  if (q_norm_w.defined()) {
    check_on_device(q_norm_w, "qk_norm_rope", "q_norm_w");
    check_on_device(k_norm_w, "qk_norm_rope", "k_norm_w");
  }
  check_on_device(positions, "qk_norm_rope", "positions");
  check_act(q, "qk_norm_rope", "q");
  check_dtype(positions, DType::I32, "qk_norm_rope", "positions");
  CPI_CHECK(q.dim(2) <= 1024, "qk_norm_rope: head_dim ", q.dim(2), " > 1024 is not supported by the CUDA kernel");
  CPI_CHECK(q_norm_w.dtype == k_norm_w.dtype, "qk_norm_rope: the CUDA kernel needs q and k norm weights of one dtype");
}

void CudaBackend::kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, KvLayer cache) {
  check_kv_store(k, v, slots, cache);
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_kv_store(dev(k), dev(v), dev(slots), dev(cache), stream_), "kv_store");
}

// One kernel when the cache holds the activations' dtype (the engine's case): the warps of the k
// heads store what they rotated, and the token's v head, straight into the cache. Otherwise the two
// kernels of qk_norm_rope and kv_store; the arguments are checked once, before either runs.
void CudaBackend::qk_norm_rope_store(Tensor q, Tensor k, const Tensor& v, const Tensor& q_norm_w,
                                     const Tensor& k_norm_w, float eps, const Tensor& positions, const RopeParams& rope,
                                     const Tensor& slots, KvLayer cache) {
  check_qk_norm_rope(q, k, q_norm_w, k_norm_w, eps, positions, rope);
  check_kv_store(k, v, slots, cache);
  const bool fused = cache.k.dtype == q.dtype && v.dtype == q.dtype;
  DeviceGuard g(device_);
  const float* inv_freq = inv_freq_on_device(rope);
  const DevTensor dv = dev(v), ds = dev(slots);
  const DevKv dc = dev(cache);
  CUDA_LAUNCH(launch_qk_norm_rope(dev(q), dev(k), dev(q_norm_w), dev(k_norm_w), eps, dev(positions), inv_freq,
                                  rope.attention_factor, stream_, fused ? &dv : nullptr, fused ? &ds : nullptr,
                                  fused ? &dc : nullptr),
              fused ? "qk_norm_rope_store" : "qk_norm_rope");
  if (!fused) CUDA_LAUNCH(launch_kv_store(dev(k), dv, ds, dc, stream_), "kv_store");
}

void CudaBackend::check_kv_store(const Tensor& k, const Tensor& v, const Tensor& slots, const KvLayer& cache) {
  contract::kv_store(k, v, slots, cache);
  check_on_device(k, "kv_store", "k");
  check_on_device(v, "kv_store", "v");
  check_on_device(slots, "kv_store", "slots");
  check_on_device(cache.k, "kv_store", "cache.k");
  check_on_device(cache.v, "kv_store", "cache.v");
  check_dtype(slots, DType::I32, "kv_store", "slots");
  check_act(k, "kv_store", "k");
  check_act(cache.k, "kv_store", "cache.k");
  check_dtype(cache.v, cache.k.dtype, "kv_store", "cache.v");
}

void CudaBackend::moe_route(const Tensor& logits, int top_k, bool renormalize, Tensor ids, Tensor weights) {
  contract::moe_route(logits, top_k, ids, weights);
  check_on_device(logits, "moe_route", "logits");
  check_on_device(ids, "moe_route", "ids");
  check_on_device(weights, "moe_route", "weights");
  check_act(logits, "moe_route", "logits");
  const int64_t e = logits.cols();
  CPI_CHECK(top_k <= 32, "moe_route: top_k ", top_k, " > 32 is not supported on CUDA");
  CPI_CHECK(e <= 1024, "moe_route: ", e, " experts > 1024 are not supported on CUDA");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_moe_route(dev(logits), top_k, renormalize, dev(ids), dev(weights), stream_), "moe_route");
}

// A decode step's router in one kernel (kernels/moe.cu launch_moe_gate), with the residual add +
// RMSNorm before it when `norm` is given; false (nothing launched) for other sizes and FP8 routers.
bool CudaBackend::gate_in_one_kernel(const Tensor& x, const Weight& router, int top_k, bool renormalize,
                                     const Tensor& logits, const Tensor& ids, const Tensor& weights,
                                     const RowAddNorm* norm) {
  if (!skinny_gemm_ || router.fp8() || x.device != Device::CUDA || router.device != Device::CUDA ||
      logits.dtype != DType::F32 || logits.ndim != 2 || logits.rows() != x.rows() || logits.cols() != router.dim(0) ||
      !moe_gate_supported(dev(x), dev(router), top_k) || (norm && !moe_gate_norm_supported(dev(x), *norm)))
    return false;
  contract::moe_route(logits, top_k, ids, weights);
  check_on_device(logits, "moe_gate", "logits");
  check_on_device(ids, "moe_gate", "ids");
  check_on_device(weights, "moe_gate", "weights");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_moe_gate(dev(x), dev(router), top_k, renormalize, dev(logits), gate_ticket_, dev(ids),
                              dev(weights), stream_, norm),
              "moe_gate");
  return true;
}

void CudaBackend::moe_gate(const Tensor& x, const Weight& router, int top_k, bool renormalize, Tensor logits,
                           Tensor ids, Tensor weights) {
  if (!gate_in_one_kernel(x, router, top_k, renormalize, logits, ids, weights, nullptr))
    Backend::moe_gate(x, router, top_k, renormalize, logits, ids, weights);
}

void CudaBackend::add_rms_norm_moe_gate(Tensor residual, const Tensor& x, const Tensor& norm_w, float eps, Tensor h,
                                        const Weight& router, int top_k, bool renormalize, Tensor logits, Tensor ids,
                                        Tensor weights) {
  contract::rms_norm("add_rms_norm_moe_gate", x, norm_w, eps, h, &residual);
  const RowAddNorm norm{dev(residual), dev(norm_w), dev(h), eps};
  const bool on_device = residual.device == Device::CUDA && h.device == Device::CUDA && norm_w.device == Device::CUDA;
  if (!on_device || !gate_in_one_kernel(x, router, top_k, renormalize, logits, ids, weights, &norm))
    Backend::add_rms_norm_moe_gate(residual, x, norm_w, eps, h, router, top_k, renormalize, logits, ids, weights);
}

void CudaBackend::silu_mul(const Tensor& gate, const Tensor& up, Tensor out) {
  contract::silu_mul(gate, up, out);
  check_on_device(gate, "silu_mul", "gate");
  check_on_device(up, "silu_mul", "up");
  check_on_device(out, "silu_mul", "out");
  check_act(gate, "silu_mul", "gate");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_silu_mul(dev(gate), dev(up), dev(out), stream_), "silu_mul");
}

void CudaBackend::add(Tensor a, const Tensor& b) {
  contract::add(a, b);
  check_on_device(a, "add", "a");
  check_on_device(b, "add", "b");
  check_act(a, "add", "a");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_add(dev(a), dev(b), stream_), "add");
}

void CudaBackend::gather_rows(const Tensor& src, const Tensor& idx, Tensor out) {
  contract::gather_rows(src, idx, out);
  check_on_device(src, "gather_rows", "src");
  check_on_device(idx, "gather_rows", "idx");
  check_on_device(out, "gather_rows", "out");
  check_dtype(idx, DType::I32, "gather_rows", "idx");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_gather_rows(dev(contract::as_rows(src)), dev(idx), dev(contract::as_rows(out)), stream_),
              "gather_rows");
}

void CudaBackend::scatter_rows(const Tensor& src, const Tensor& idx, Tensor out) {
  contract::scatter_rows(src, idx, out);
  check_on_device(src, "scatter_rows", "src");
  check_on_device(idx, "scatter_rows", "idx");
  check_on_device(out, "scatter_rows", "out");
  check_dtype(idx, DType::I32, "scatter_rows", "idx");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_scatter_rows(dev(contract::as_rows(src)), dev(idx), dev(contract::as_rows(out)), stream_),
              "scatter_rows");
}

void CudaBackend::convert(const Tensor& src, Tensor dst) {
  contract::convert(src, dst);
  check_on_device(src, "convert", "src");
  check_on_device(dst, "convert", "dst");
  DeviceGuard g(device_);
  if (src.dtype == dst.dtype) {
    copy(dst.data, src.data, src.nbytes());
    return;
  }
  CUDA_LAUNCH(launch_convert(dev(src), dev(dst), stream_), "convert");
}

// The algorithm is in ops/backend.h; kernels/sample.cu runs it, one CTA per row.
void CudaBackend::sample(const Tensor& logits, const std::vector<SampleRow>& rows, Tensor ids) {
  const char* op = "sample";
  contract::sample(logits, rows, ids);
  check_on_device(logits, op, "logits");
  check_on_device(ids, op, "ids");
  const int64_t r_count = logits.dim(0), v = logits.dim(1);
  if (r_count == 0) return;
  CPI_CHECK(v < INT32_MAX, op, ": logits ", logits.shape_str(), " needs V < 2^31");
  CPI_CHECK(r_count <= INT32_MAX, op, ": ", r_count, " rows exceed one launch");
  std::vector<DevSampleRow> dev_rows(rows.size());
  bool any_drawn = false;
  for (size_t i = 0; i < rows.size(); ++i) {
    const SampleRow& r = rows[i];
    DevSampleRow& d = dev_rows[i];
    d.greedy = sample_row_greedy(r) ? 1 : 0;
    d.temperature = r.temperature;
    d.top_k = r.top_k > 0 && r.top_k < v ? r.top_k : 0;
    d.top_p = r.top_p < 1.0f ? r.top_p : 1.0f;
    d.min_p = r.min_p > 0.0f ? r.min_p : 0.0f;
    d.u = sample_uniform(r.seed, r.step);  // the reference's generator: both back-ends draw the same u
    any_drawn |= !d.greedy;
  }
  // One workspace holds the row parameters and, when a row is drawn, the probabilities [R, V].
  const size_t rows_bytes = (dev_rows.size() * sizeof(DevSampleRow) + 255) / 256 * 256;
  const size_t scratch_bytes = any_drawn ? static_cast<size_t>(r_count * v) * sizeof(float) : 0;
  DeviceGuard g(device_);
  char* ws = static_cast<char*>(workspace(rows_bytes + scratch_bytes));
  // Stream-ordered, no wait: from pageable memory the copy is staged before this call returns.
  CUDA_CHECK(
      cudaMemcpyAsync(ws, dev_rows.data(), dev_rows.size() * sizeof(DevSampleRow), cudaMemcpyHostToDevice, stream_));
  float* scratch = any_drawn ? reinterpret_cast<float*>(ws + rows_bytes) : nullptr;
  CUDA_LAUNCH(launch_sample(dev(logits), reinterpret_cast<const DevSampleRow*>(ws), scratch, dev(ids), stream_),
              "sample");
}

}  // namespace cpinfer::cuda

namespace cpinfer {

std::unique_ptr<Backend> make_cuda_backend(int device_index, const BackendOptions& opt) {
  return std::make_unique<cuda::CudaBackend>(device_index, opt);
}

}  // namespace cpinfer
