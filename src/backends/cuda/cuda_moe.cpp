// CudaBackend::moe_experts: permute the (token, k) pairs by local expert on the device, run the
// experts' GEMMs on their contiguous segments, and accumulate the weighted results back into out
// in a fixed order per token.
// - Small batches (T·K <= kSmallPairs, decode): two row-wise grouped kernels cover all experts.
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

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"
#include "ops/contract.h"

namespace cpinfer::cuda {
namespace {

size_t round_up(size_t n) { return (n + 255) / 256 * 256; }

constexpr int64_t kSmallPairs = 64;

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace

const void* const* CudaBackend::pointer_table_on_device(std::vector<const void*> host) {
  for (const auto& t : expert_pointer_tables_)
    if (t.host == host) return static_cast<const void* const*>(t.device);
  ExpertPointers t;
  t.host = std::move(host);
  t.device = alloc(t.host.size() * sizeof(void*));
  upload(t.device, t.host.data(), t.host.size() * sizeof(void*));
  expert_pointer_tables_.push_back(std::move(t));
  return static_cast<const void* const*>(expert_pointer_tables_.back().device);
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
  const char* op = "moe_experts";
  contract::moe_experts(x, ids, weights, shard, out);
  CPI_CHECK(x.device == Device::CUDA && ids.device == Device::CUDA && weights.device == Device::CUDA &&
                out.device == Device::CUDA,
            op, ": x, ids, weights and out must be on the CUDA device");
  CPI_CHECK(x.dtype == DType::BF16, op, ": x has dtype ", dtype_name(x.dtype), ", expected BF16");
  CPI_CHECK(out.dtype == DType::BF16 || out.dtype == DType::F32, op, ": out has dtype ", dtype_name(out.dtype),
            ", expected BF16 or F32");
  const int64_t n_tokens = x.rows(), hidden = x.cols(), top_k = ids.cols();
  const int count = shard.count;
  CPI_CHECK(count <= 8192, op, ": ", count, " local experts > 8192 are not supported");
  if (n_tokens == 0 || count == 0 || top_k == 0) return;
  if (shard.gate[0].fp8()) {
    moe_experts_fp8(x, ids, weights, shard, out);
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
  if (inter == 0) return;  // every expert adds down · silu(empty) = 0
  DeviceGuard g(device_);
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  bool aligned = aligned16(x.data);
  for (int e = 0; aligned && e < count; ++e)
    aligned = aligned16(shard.gate[e].data) && aligned16(shard.up[e].data) && aligned16(shard.down[e].data);
  const bool small = static_cast<int64_t>(n_pairs) <= kSmallPairs;
  const MoeGemm setting = small ? MoeGemm::Grouped : moe_gemm_;
  if (setting == MoeGemm::Cublas) {
    moe_experts_cublas(x, ids, weights, shard, out);
    return;
  }
  // Everything sized from n_pairs (an upper bound of the local rows), in one workspace request
  // before the first launch: nothing here waits for the device. Layout: offsets, tile_start,
  // active [count + 1] each, src_token [T·K], pair_row [T·K], act [T·K, I] BF16, y [T·K, H] F32.
  const size_t off_b = round_up((count + 1) * 4), pair_b = round_up(n_pairs * 4);
  const size_t act_b = round_up(n_pairs * inter * 2), y_b = round_up(n_pairs * hidden * 4);
  char* ws = static_cast<char*>(workspace(3 * off_b + 2 * pair_b + act_b + y_b));
  auto* offsets = reinterpret_cast<int32_t*>(ws);
  auto* tile_start = reinterpret_cast<int32_t*>(ws + off_b);
  auto* active = reinterpret_cast<int32_t*>(ws + 2 * off_b);
  auto* src_token = reinterpret_cast<int32_t*>(ws + 3 * off_b);
  auto* pair_row = reinterpret_cast<int32_t*>(ws + 3 * off_b + pair_b);
  void* act = ws + 3 * off_b + 2 * pair_b;
  float* y_rows = reinterpret_cast<float*>(ws + 3 * off_b + 2 * pair_b + act_b);
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
  CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                       tensor_cores ? tile_start : nullptr, stream_, tensor_cores ? nullptr : active),
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
    const int max_active = static_cast<int>(std::min<size_t>(n_pairs, static_cast<size_t>(count)));
    CUDA_LAUNCH(launch_moe_rowwise_gemms(dev(x), src_token, offsets, count, ptrs, ptrs + count, ptrs + 2 * count, inter,
                                         vec, act, y_rows, stream_, active, max_active),
                "moe_rowwise_gemms");
  }
  Tensor y(y_rows, use_wgmma && wgmma_cfg.y_bf16 ? DType::BF16 : DType::F32, {static_cast<int64_t>(n_pairs), hidden},
           Device::CUDA);
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_), "moe_unpermute");
}

// The per-expert cuBLAS path (--moe-runner-backend cublas): copies the offsets to the host.
void CudaBackend::moe_experts_cublas(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                     const ExpertShard& shard, Tensor out) {
  const int count = shard.count;
  const int64_t n_tokens = x.rows(), hidden = x.cols(), top_k = ids.cols(), inter = shard.gate[0].dim(0);
  // Workspace: offsets, src_token, pair_row, then (once the local row count is known) the rows.
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  const size_t meta_bytes = round_up((count + 1) * 4) + 2 * round_up(n_pairs * 4);
  char* ws = static_cast<char*>(workspace(meta_bytes));
  auto* offsets = reinterpret_cast<int32_t*>(ws);
  auto* src_token = reinterpret_cast<int32_t*>(ws + round_up((count + 1) * 4));
  auto* pair_row = reinterpret_cast<int32_t*>(ws + round_up((count + 1) * 4) + round_up(n_pairs * 4));
  CUDA_LAUNCH(launch_moe_permute(dev(ids), shard.first, count, offsets, src_token, pair_row, stream_), "moe_permute");
  std::vector<int32_t> host_off(count + 1);
  CUDA_CHECK(cudaMemcpyAsync(host_off.data(), offsets, (count + 1) * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  const int64_t n_rows = host_off[count];
  if (n_rows == 0) return;

  // Rows: xp [n_rows, H] BF16, gate/up [n_rows, I] BF16 each, act [n_rows, I] BF16, y [n_rows, H] F32.
  const size_t xp_b = round_up(n_rows * hidden * 2), gi_b = round_up(n_rows * inter * 2),
               y_b = round_up(n_rows * hidden * 4);
  ws = static_cast<char*>(workspace(meta_bytes + xp_b + 3 * gi_b + y_b, meta_bytes));  // may move
  offsets = reinterpret_cast<int32_t*>(ws);
  src_token = reinterpret_cast<int32_t*>(ws + round_up((count + 1) * 4));
  pair_row = reinterpret_cast<int32_t*>(ws + round_up((count + 1) * 4) + round_up(n_pairs * 4));
  char* rows = ws + meta_bytes;
  Tensor xp(rows, DType::BF16, {n_rows, hidden}, Device::CUDA);
  Tensor gp(rows + xp_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor up(rows + xp_b + gi_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor act(rows + xp_b + 2 * gi_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor y(rows + xp_b + 3 * gi_b, DType::F32, {n_rows, hidden}, Device::CUDA);
  Tensor src_idx(src_token, DType::I32, {n_rows}, Device::CUDA);
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
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_), "moe_unpermute");
}

}  // namespace cpinfer::cuda
