// CudaBackend::moe_experts: permute the (token, k) pairs by local expert on the device, run the
// experts' GEMMs on their contiguous segments, and write the weighted sums into out in a fixed
// order per token.
// - Small batches (T·K <= kSmallPairs, decode): two row-wise grouped kernels cover all experts; for
//   one token they read the router's (token, k) pairs as they are: no permute kernel in the chain.
// - Larger batches (prefill), by default: the tensor-core grouped GEMMs (gate‖up + SiLU·mul, then
//   down), scheduled on the device from the segment offsets: on a compute capability 9.0 GPU the
//   warp-specialized wgmma kernels of kernels/moe_gemm_wgmma.cu (128 x 256 tiles; the expert
//   outputs y written in BF16 for the weighted sum), elsewhere the mma.sync kernels
//   of kernels/moe_gemm.cu; shapes they do not take (H or I not a multiple of 64, unaligned
//   pointers) use the row-wise kernels. None of these synchronizes with the host: the forward can
//   be enqueued (or graph-captured) while NCCL exchanges run.
// - The setting for larger batches (CudaBackend::MoeGemm, --moe-runner-backend): auto = the
//   default above; mma = the mma.sync grouped kernels on any GPU; wgmma = the earlier wgmma kernels
//   (every thread loads and multiplies; 128 x 256 tiles, two N-tiles per CTA, F32 y); wgmma128 =
//   those with 128 x 128 tiles, one per CTA (for tuning); wgmma-ws = the Hopper default by name; the
//   wgmma settings need compute capability 9.0;
//   cublas = the older per-expert cuBLAS path, which copies the offsets to the host (one stream
//   synchronization per call), kept for comparison (bench/moe_bench) only.
#include <algorithm>

#include "backends/cuda/cuda_args.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"
#include "ops/contract.h"

namespace cpinfer::cuda {
namespace {

constexpr int64_t kSmallPairs = 64;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

CudaBackend::ExpertPointers& CudaBackend::expert_pointer_entry(std::vector<const void*> host) {
  for (auto& t : expert_pointer_tables_)
    if (t.host == host) return t;
  ExpertPointers t;
  t.host = std::move(host);
  t.device = alloc(t.host.size() * sizeof(void*));
  upload(t.device, t.host.data(), t.host.size() * sizeof(void*));
  expert_pointer_tables_.push_back(std::move(t));
  return expert_pointer_tables_.back();
}

const void* const* CudaBackend::pointer_table_on_device(std::vector<const void*> host) {
  return static_cast<const void* const*>(expert_pointer_entry(std::move(host)).device);
}

const void* const* CudaBackend::expert_pointers_on_device(const ExpertShard& shard) {
  std::vector<const void*> host;
  host.reserve(3 * shard.count);
  for (const auto* list : {&shard.gate, &shard.up, &shard.down})
    for (const Tensor& t : *list) host.push_back(t.data);
  return pointer_table_on_device(std::move(host));
}

void CudaBackend::moe_experts(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                              Tensor out) {
  contract::moe_experts(x, ids, weights, shard, out);
  moe_experts_then(x, ids, weights, shard, out, nullptr);
}

// The MoE block's weighted sum with the next sub-layer's residual add + RMSNorm in its kernel
// (launch_moe_unpermute with a RowAddNorm: out is not written).
void CudaBackend::moe_experts_add_rms_norm(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                           const ExpertShard& shard, Tensor out, Tensor residual, const Tensor& norm_w,
                                           float eps, Tensor h) {
  contract::moe_experts(x, ids, weights, shard, out);
  contract::rms_norm("moe_experts_add_rms_norm", out, norm_w, eps, h, &residual);
  check_on_device(residual, "moe_experts_add_rms_norm", "residual");
  check_on_device(norm_w, "moe_experts_add_rms_norm", "norm_w");
  check_on_device(h, "moe_experts_add_rms_norm", "h");
  // Decode sizes only (a token per block: at prefill a version of it made the 16K FP8 TTFT 1.5%
  // longer on an H100, 2026-12-06; there the two kernels run).
  if (out.rows() > kUnpermuteDecodeTokens || out.cols() > 16384) {
    Backend::moe_experts_add_rms_norm(x, ids, weights, shard, out, residual, norm_w, eps, h);
    return;
  }
  const RowAddNorm norm{dev(residual), dev(norm_w), dev(h), eps};
  moe_experts_then(x, ids, weights, shard, out, &norm);
}

// out = 0 (no expert of the shard is chosen, or I = 0), then the norm if one is asked for.
void CudaBackend::zero_experts(Tensor out, const RowAddNorm* norm) {
  fill_zero(out);
  if (norm) CUDA_LAUNCH(launch_rms_norm(norm->residual, dev(out), norm->w, norm->eps, norm->out, stream_), "rms_norm");
}

void CudaBackend::moe_experts_then(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                                   Tensor out, const RowAddNorm* norm) {
  const char* op = "moe_experts";
  CPI_CHECK(x.device == Device::CUDA && ids.device == Device::CUDA && weights.device == Device::CUDA &&
                out.device == Device::CUDA,
            op, ": x, ids, weights and out must be on the CUDA device");
  CPI_CHECK(x.dtype == DType::BF16, op, ": x has dtype ", dtype_name(x.dtype), ", expected BF16");
  CPI_CHECK(out.dtype == DType::BF16 || out.dtype == DType::F32, op, ": out has dtype ", dtype_name(out.dtype),
            ", expected BF16 or F32");
  const int64_t n_tokens = x.rows(), hidden = x.cols(), top_k = ids.cols();
  const int count = shard.count;
  CPI_CHECK(count <= 8192, op, ": ", count, " local experts > 8192 are not supported");
  if (n_tokens == 0) return;
  if (count == 0 || top_k == 0) {  // no expert of this shard is chosen: out = 0
    zero_experts(out, norm);
    return;
  }
  if (shard.gate[0].fp8()) {
    moe_experts_fp8(x, ids, weights, shard, out, norm);
    return;
  }
  const int64_t inter = shard.gate[0].dim(0);
  for (int e = 0; e < count; ++e) {
    const Tensor& g = shard.gate[e];
    const Tensor& u = shard.up[e];
    const Tensor& d = shard.down[e];
    CPI_CHECK(g.device == Device::CUDA && u.device == Device::CUDA && d.device == Device::CUDA, op, ": expert ",
              shard.first + e, " weights are not on the CUDA device");
    CPI_CHECK(g.dtype == DType::BF16 && u.dtype == DType::BF16 && d.dtype == DType::BF16, op, ": expert ",
              shard.first + e, " weights must be BF16 on CUDA (got ", dtype_name(g.dtype), ")");
  }
  if (inter == 0) {  // every expert gives down · silu(empty) = 0
    zero_experts(out, norm);
    return;
  }
  DeviceGuard g(device_);
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  bool aligned = aligned16(x.data);
  for (int e = 0; aligned && e < count; ++e)
    aligned = aligned16(shard.gate[e].data) && aligned16(shard.up[e].data) && aligned16(shard.down[e].data);
  const bool small = static_cast<int64_t>(n_pairs) <= kSmallPairs;
  const MoeGemm setting = small ? MoeGemm::Grouped : moe_gemm_;
  if (setting == MoeGemm::Cublas) {
    moe_experts_cublas(x, ids, weights, shard, out, norm);
    return;
  }
  // Everything sized from n_pairs (an upper bound of the local rows), in one workspace request
  // before the first launch: nothing here waits for the device.
  const MoeScratch m = carve_moe_scratch(count, n_pairs, inter, hidden, 4);
  int32_t *offsets = m.offsets, *tile_start = m.tile_start, *active = m.active, *src_token = m.src_token,
          *pair_row = m.pair_row;
  void* act = m.act;
  float* y_rows = static_cast<float*>(m.y);
  const void* const* ptrs = expert_pointers_on_device(shard);
  const bool tensor_cores = !small && aligned && moe_grouped_gemm_supported(hidden, inter) &&
                            moe_grouped_gemm_max_tiles(static_cast<int64_t>(n_pairs), count) <= 65535;
  // wgmma on Hopper unless mma.sync is asked for: it takes every shape the mma.sync kernels take.
  const bool use_wgmma = tensor_cores && hopper_ && setting != MoeGemm::Mma;
  MoeWgmmaConfig wgmma_cfg;  // 128 x 256 tiles, two N-tiles per CTA
  if (setting == MoeGemm::Wgmma128) {
    wgmma_cfg.tile_n_gateup = wgmma_cfg.tile_n_down = 128;
    wgmma_cfg.n_per_cta = 1;
  }
  // auto: the warp-specialized kernels, writing y in BF16 (bench/moe_bench: 544 vs 497 TFLOP/s for
  // the GEMMs at 32K tokens on an H200); "wgmma" keeps the earlier kernels (F32 y) to compare.
  wgmma_cfg.warp_specialized = wgmma_cfg.y_bf16 = setting == MoeGemm::WgmmaWs || setting == MoeGemm::Grouped;
  if (small && n_tokens == 1) {
    // One token (batch-1 decode): the row-wise kernels take the router's pairs as they are, no
    // permute kernel. (At batch 8 the pairs of a shared expert would each re-read its weights: there
    // the permute's segments are faster, 9.2 against 9.9 ms a step on an H200.)
    const bool vec = aligned && hidden % 8 == 0 && inter % 8 == 0;
    const MoeRowSource rows =
        MoeRowSource::pairs(ids.ptr<const int32_t>(), shard.first, static_cast<int>(top_k), static_cast<int>(n_pairs));
    CUDA_LAUNCH(launch_moe_rowwise_gemms(dev(x), rows, count, ptrs, ptrs + count, ptrs + 2 * count, inter, vec, act,
                                         y_rows, stream_),
                "moe_rowwise_gemms");
    Tensor y(y_rows, DType::F32, {static_cast<int64_t>(n_pairs), hidden}, Device::CUDA);
    CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), rows, count, dev(out), stream_, norm), "moe_unpermute");
    return;
  }
  CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                       tensor_cores ? tile_start : nullptr, stream_, tensor_cores ? nullptr : active,
                                       m.permute),
              "moe_permute");
  if (use_wgmma) {
    CUDA_LAUNCH(
        launch_moe_grouped_gemms_wgmma(dev(x), src_token, offsets, tile_start, static_cast<int64_t>(n_pairs), count,
                                       ptrs, ptrs + count, ptrs + 2 * count, inter, act, y_rows, wgmma_cfg, stream_),
        "moe_grouped_gemms_wgmma");
  } else if (tensor_cores) {
    CUDA_LAUNCH(launch_moe_grouped_gemms(dev(x), src_token, offsets, tile_start, static_cast<int64_t>(n_pairs), count,
                                         ptrs, ptrs + count, ptrs + 2 * count, inter, act, y_rows, stream_),
                "moe_grouped_gemms");
  } else {
    const bool vec = aligned && hidden % 8 == 0 && inter % 8 == 0;
    // At most T·K experts have rows: the grid covers that many (active lists them on the device).
    const MoeRowSource rows = MoeRowSource::segments(src_token, offsets, pair_row, active,
                                                     static_cast<int>(std::min<size_t>(n_pairs, size_t(count))));
    CUDA_LAUNCH(launch_moe_rowwise_gemms(dev(x), rows, count, ptrs, ptrs + count, ptrs + 2 * count, inter, vec, act,
                                         y_rows, stream_),
                "moe_rowwise_gemms");
  }
  Tensor y(y_rows, use_wgmma && wgmma_cfg.y_bf16 ? DType::BF16 : DType::F32, {static_cast<int64_t>(n_pairs), hidden},
           Device::CUDA);
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_, norm), "moe_unpermute");
}

CudaBackend::MoeScratch CudaBackend::carve_moe_scratch(int count, size_t n_pairs, int64_t inter, int64_t hidden,
                                                       size_t y_elt, const std::function<void(Bump&)>& more,
                                                       bool with_act) {
  MoeScratch m;
  carve_workspace([&](Bump& w) {
    m.offsets = w.take<int32_t>(count + 1);
    m.tile_start = w.take<int32_t>(count + 1);
    m.active = w.take<int32_t>(count + 1);
    m.src_token = w.take<int32_t>(n_pairs);
    m.pair_row = w.take<int32_t>(n_pairs);
    m.permute = w.take<int32_t>(static_cast<size_t>(moe_permute_scratch_ints(static_cast<int64_t>(n_pairs), count)));
    if (with_act) m.act = w.take<uint16_t>(n_pairs * inter);
    m.y = w.take<char>(n_pairs * hidden * y_elt);
    if (more) more(w);
  });
  return m;
}

CudaBackend::ExpertRows CudaBackend::permute_rows_to_host(const Tensor& ids, const ExpertShard& shard) {
  ExpertRows r;
  r.count = shard.count;
  r.n_pairs = static_cast<size_t>(ids.numel());
  r.bytes = carve_workspace([&](Bump& w) { r.take(w); });
  CUDA_LAUNCH(launch_moe_permute(dev(ids), shard.first, r.count, r.offsets, r.src_token, r.pair_row, stream_),
              "moe_permute");
  r.host_off.resize(r.count + 1);
  CUDA_CHECK(cudaMemcpyAsync(r.host_off.data(), r.offsets, (r.count + 1) * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  return r;
}

// The per-expert cuBLAS path (--moe-runner-backend cublas): copies the offsets to the host.
void CudaBackend::moe_experts_cublas(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                     const ExpertShard& shard, Tensor out, const RowAddNorm* norm) {
  const int count = shard.count;
  const int64_t hidden = x.cols(), inter = shard.gate[0].dim(0);
  ExpertRows r = permute_rows_to_host(ids, shard);
  const int64_t n_rows = r.rows();
  if (n_rows == 0) {
    zero_experts(out, norm);
    return;
  }
  const std::vector<int32_t>& host_off = r.host_off;

  // Rows: xp [n_rows, H] BF16, gate/up [n_rows, I] BF16 each, act [n_rows, I] BF16, y [n_rows, H] F32.
  void *xp_p = nullptr, *gp_p = nullptr, *up_p = nullptr, *act_p = nullptr, *y_p = nullptr;
  carve_workspace(
      [&](Bump& w) {
        r.take(w);
        xp_p = w.take<uint16_t>(n_rows * hidden);
        gp_p = w.take<uint16_t>(n_rows * inter);
        up_p = w.take<uint16_t>(n_rows * inter);
        act_p = w.take<uint16_t>(n_rows * inter);
        y_p = w.take<float>(n_rows * hidden);
      },
      r.bytes);  // may move
  Tensor xp(xp_p, DType::BF16, {n_rows, hidden}, Device::CUDA);
  Tensor gp(gp_p, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor up(up_p, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor act(act_p, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor y(y_p, DType::F32, {n_rows, hidden}, Device::CUDA);
  Tensor src_idx(r.src_token, DType::I32, {n_rows}, Device::CUDA);
  CUDA_LAUNCH(launch_gather_rows(dev(x), dev(src_idx), dev(xp), stream_), "gather_rows");
  for (int e = 0; e < count; ++e) {
    const int64_t begin = host_off[e], n = host_off[e + 1] - host_off[e];
    if (n == 0) continue;
    gemm(xp.slice(begin, n), shard.gate[e], gp.slice(begin, n));
    gemm(xp.slice(begin, n), shard.up[e], up.slice(begin, n));
  }
  CUDA_LAUNCH(launch_silu_mul(dev(gp), dev(up), dev(act), stream_), "silu_mul");
  for (int e = 0; e < count; ++e) {
    const int64_t begin = host_off[e], n = host_off[e + 1] - host_off[e];
    if (n == 0) continue;
    gemm(act.slice(begin, n), shard.down[e], y.slice(begin, n));
  }
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), r.pair_row, dev(out), stream_, norm), "moe_unpermute");
}

}  // namespace cpinfer::cuda
