// CudaBackend::moe_experts with FP8 experts (codes + 128x128 block scales, ops/backend.h): the
// permutation and the weighted un-permute of cuda_moe.cpp around FP8 expert GEMMs.
// - Small batches (T·K <= kSmallPairs, decode), and shapes the block-scaled GEMMs do not take (H or
//   I not a multiple of 128, unaligned pointers, not Hopper): the row-wise kernels of
//   kernels/moe_fp8.cu on the codes, activations BF16 (the CPU reference's arithmetic).
// - Larger batches on Hopper, by default: the device-scheduled grouped wgmma FP8 GEMMs
//   (kernels/moe_gemm_fp8_wgmma.cu, DeepSeek-V3's scheme: activations quantized per (row, 128
//   columns), per 128-wide K block an fp32 partial product scaled by the row's and the weight
//   block's scales). --moe-runner-backend cublas: per expert, cuBLASLt's block-scaled FP8 GEMM
//   (cuda_fp8.cpp), which needs the expert row counts on the host (one stream synchronization per
//   call). mma/wgmma128 have no FP8 kernels: they run the default.
#include <algorithm>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

size_t round_up(size_t n) { return (n + 255) / 256 * 256; }
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
constexpr int64_t kSmallPairs = 64;  // as cuda_moe.cpp

}  // namespace

bool CudaBackend::moe_fp8_blocked(int64_t n_pairs, int count, int64_t hidden, int64_t inter, bool aligned) const {
  return n_pairs > kSmallPairs && hopper_ && aligned && moe_fp8_grouped_supported(hidden, inter) &&
         moe_grouped_gemm_max_tiles(n_pairs, count) <= 65535;
}

Fp8ExpertTables CudaBackend::fp8_expert_tables_on_device(const ExpertShard& shard) {
  const int count = shard.count;
  std::vector<const void*> host;
  host.reserve(6 * static_cast<size_t>(count));
  for (const auto* list : {&shard.gate, &shard.up, &shard.down})
    for (const Weight& w : *list) host.push_back(w.data);
  for (const auto* list : {&shard.gate, &shard.up, &shard.down})
    for (const Weight& w : *list) host.push_back(w.scale.data);
  const void* const* p = pointer_table_on_device(std::move(host));
  Fp8ExpertTables t;
  t.gate = p;
  t.up = p + count;
  t.down = p + 2 * count;
  t.gate_scale = p + 3 * count;
  t.up_scale = p + 4 * count;
  t.down_scale = p + 5 * count;
  return t;
}

void CudaBackend::moe_experts_fp8(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                                  Tensor out) {
  const char* op = "moe_experts";
  const int64_t n_tokens = x.rows(), hidden = x.cols(), top_k = ids.cols();
  const int count = shard.count;
  const int64_t inter = shard.gate[0].dim(0);
  bool aligned = aligned16(x.data);
  for (int e = 0; e < count; ++e) {
    for (const Weight* w : {&shard.gate[e], &shard.up[e], &shard.down[e]}) {
      CPI_CHECK(w->fp8(), op, ": expert ", shard.first + e, " mixes FP8 and ", dtype_name(w->dtype),
                " weights (one form per shard)");
      CPI_CHECK(w->device == Device::CUDA && w->scale.device == Device::CUDA, op, ": expert ", shard.first + e,
                " weights or scales are not on the CUDA device");
      aligned = aligned && aligned16(w->data);
    }
  }
  if (inter == 0) return;  // every expert adds down · silu(empty) = 0
  DeviceGuard g(device_);
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  if (moe_fp8_blocked(static_cast<int64_t>(n_pairs), count, hidden, inter, aligned)) {
    if (moe_gemm_ == MoeGemm::Cublas && moe_experts_fp8_lt(x, ids, weights, shard, out)) return;
    // Layout: offsets, tile_start [count + 1] each, src_token, pair_row [T·K] each, xq [T, H]
    // e4m3 with its scales [H/128, T], act [T·K, I] BF16, aq [T·K, I] e4m3 with segmented
    // scales, y [T·K, H] F32.
    const int64_t kbh = hidden / 128, kbi = inter / 128;
    const size_t off_b = round_up((count + 1) * 4), pair_b = round_up(n_pairs * 4);
    const size_t xq_b = round_up(static_cast<size_t>(n_tokens * hidden));
    const size_t xs_b = round_up(static_cast<size_t>(fp8_act_scale_floats(n_tokens, kbh)) * 4);
    const size_t act_b = round_up(n_pairs * inter * 2), aq_b = round_up(n_pairs * inter);
    const size_t as_b =
        round_up(static_cast<size_t>(fp8_segment_scale_floats(static_cast<int64_t>(n_pairs), count, kbi)) * 4);
    const size_t y_b = round_up(n_pairs * hidden * 4);
    char* ws = static_cast<char*>(workspace(2 * off_b + 2 * pair_b + xq_b + xs_b + act_b + aq_b + as_b + y_b));
    auto* offsets = reinterpret_cast<int32_t*>(ws);
    auto* tile_start = reinterpret_cast<int32_t*>(ws + off_b);
    char* p = ws + 2 * off_b;
    auto* src_token = reinterpret_cast<int32_t*>(p);
    auto* pair_row = reinterpret_cast<int32_t*>(p + pair_b);
    p += 2 * pair_b;
    auto* xq = reinterpret_cast<uint8_t*>(p);
    auto* xs = reinterpret_cast<float*>(p + xq_b);
    p += xq_b + xs_b;
    void* act = p;
    auto* aq = reinterpret_cast<uint8_t*>(p + act_b);
    auto* as = reinterpret_cast<float*>(p + act_b + aq_b);
    auto* y_rows = reinterpret_cast<float*>(p + act_b + aq_b + as_b);
    const Fp8ExpertTables tables = fp8_expert_tables_on_device(shard);
    CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                         tile_start, stream_),
                "moe_permute");
    CUDA_LAUNCH(launch_fp8_quantize_rows(dev(x), xq, xs, nullptr, 0, stream_), "fp8_quantize_rows");
    MoeFp8GemmArgs a;
    a.xq = xq;
    a.x_scale = xs;
    a.n_tokens = n_tokens;
    a.src_token = src_token;
    a.offsets = offsets;
    a.tile_start = tile_start;
    a.count = count;
    a.tables = tables;
    a.hidden = hidden;
    a.inter = inter;
    a.n_pairs = static_cast<int64_t>(n_pairs);
    a.act = act;
    a.aq = aq;
    a.act_scale = as;
    a.y = y_rows;
    CUDA_LAUNCH(launch_moe_grouped_gemm_fp8_wgmma(a, /*gate_up=*/true, stream_), "moe_gateup_fp8_wgmma");
    Tensor act_rows(act, DType::BF16, {static_cast<int64_t>(n_pairs), inter}, Device::CUDA);
    CUDA_LAUNCH(launch_fp8_quantize_rows(dev(act_rows), aq, as, offsets, count, stream_), "fp8_quantize_rows");
    CUDA_LAUNCH(launch_moe_grouped_gemm_fp8_wgmma(a, /*gate_up=*/false, stream_), "moe_down_fp8_wgmma");
    Tensor y(y_rows, DType::F32, {static_cast<int64_t>(n_pairs), hidden}, Device::CUDA);
    CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_), "moe_unpermute");
    return;
  }
  // The row-wise kernels. Layout: offsets, active [count + 1] each, src_token, pair_row [T·K]
  // each, act [T·K, I] BF16, y [T·K, H] F32.
  const size_t off_b = round_up((count + 1) * 4), pair_b = round_up(n_pairs * 4);
  const size_t act_b = round_up(n_pairs * inter * 2), y_b = round_up(n_pairs * hidden * 4);
  char* ws = static_cast<char*>(workspace(2 * off_b + 2 * pair_b + act_b + y_b));
  auto* offsets = reinterpret_cast<int32_t*>(ws);
  auto* active = reinterpret_cast<int32_t*>(ws + off_b);
  auto* src_token = reinterpret_cast<int32_t*>(ws + 2 * off_b);
  auto* pair_row = reinterpret_cast<int32_t*>(ws + 2 * off_b + pair_b);
  void* act = ws + 2 * off_b + 2 * pair_b;
  auto* y_rows = reinterpret_cast<float*>(ws + 2 * off_b + 2 * pair_b + act_b);
  const Fp8ExpertTables tables = fp8_expert_tables_on_device(shard);
  CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                       nullptr, stream_, active),
              "moe_permute");
  const bool vec = aligned && hidden % 8 == 0 && inter % 8 == 0;
  const int max_active = static_cast<int>(std::min<size_t>(n_pairs, static_cast<size_t>(count)));
  CUDA_LAUNCH(launch_moe_rowwise_gemms_fp8(dev(x), src_token, offsets, count, tables, inter, vec, act, y_rows, stream_,
                                           active, max_active),
              "moe_rowwise_gemms_fp8");
  Tensor y(y_rows, DType::F32, {static_cast<int64_t>(n_pairs), hidden}, Device::CUDA);
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_), "moe_unpermute");
}

// --moe-runner-backend cublas with FP8 experts: gather the rows, quantize them per expert segment,
// and run cuBLASLt's block-scaled GEMM per expert; the offsets come to the host first. False (out
// untouched) when cuBLASLt lacks an algorithm for one of the experts' GEMMs.
bool CudaBackend::moe_experts_fp8_lt(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                     const ExpertShard& shard, Tensor out) {
  const int count = shard.count;
  const int64_t n_tokens = x.rows(), hidden = x.cols(), top_k = ids.cols(), inter = shard.gate[0].dim(0);
  const int64_t kbh = hidden / 128, kbi = inter / 128;
  const int64_t ld_h = lt_w_scale_ld(hidden), ld_i = lt_w_scale_ld(inter);  // cuBLASLt's weight-scale rows
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  const size_t off_b = round_up((count + 1) * 4), pair_b = round_up(n_pairs * 4);
  const size_t meta_bytes = off_b + 2 * pair_b;
  char* ws = static_cast<char*>(workspace(meta_bytes));
  auto* offsets = reinterpret_cast<int32_t*>(ws);
  CUDA_LAUNCH(launch_moe_permute(dev(ids), shard.first, count, offsets, reinterpret_cast<int32_t*>(ws + off_b),
                                 reinterpret_cast<int32_t*>(ws + off_b + pair_b), stream_),
              "moe_permute");
  std::vector<int32_t> host_off(count + 1);
  CUDA_CHECK(cudaMemcpyAsync(host_off.data(), offsets, (count + 1) * 4, cudaMemcpyDeviceToHost, stream_));
  CUDA_CHECK(cudaStreamSynchronize(stream_));
  const int64_t n_rows = host_off[count];
  if (n_rows == 0) return true;

  // Rows: xp [n, H] BF16, xq [n, H] e4m3 + segmented scales, gate/up/act [n, I] BF16, aq [n, I] e4m3
  // + segmented scales, y [n, H] F32; then the padded weight scales of the shard (when K/128 is
  // not a multiple of 4): gate, up [count, ceil(I/128), ld_h], down [count, ceil(H/128), ld_i].
  const int64_t sn_i = (inter + 127) / 128, sn_h = (hidden + 127) / 128;
  const size_t xp_b = round_up(n_rows * hidden * 2), xq_b = round_up(n_rows * hidden);
  const size_t xs_b = round_up(fp8_segment_scale_floats(n_rows, count, kbh) * 4);
  const size_t gi_b = round_up(n_rows * inter * 2), aq_b = round_up(n_rows * inter);
  const size_t as_b = round_up(fp8_segment_scale_floats(n_rows, count, kbi) * 4);
  const size_t y_b = round_up(n_rows * hidden * 4);
  const size_t pg_b = ld_h != kbh ? round_up(static_cast<size_t>(count * sn_i * ld_h) * 4) : 0;
  const size_t pd_b = ld_i != kbi ? round_up(static_cast<size_t>(count * sn_h * ld_i) * 4) : 0;
  ws = static_cast<char*>(workspace(meta_bytes + xp_b + xq_b + xs_b + 3 * gi_b + aq_b + as_b + y_b + 2 * pg_b + pd_b,
                                    meta_bytes));  // may move
  offsets = reinterpret_cast<int32_t*>(ws);
  auto* src_token = reinterpret_cast<int32_t*>(ws + off_b);
  auto* pair_row = reinterpret_cast<int32_t*>(ws + off_b + pair_b);
  char* p = ws + meta_bytes;
  Tensor xp(p, DType::BF16, {n_rows, hidden}, Device::CUDA);
  auto* xq = reinterpret_cast<uint8_t*>(p += xp_b);
  auto* xs = reinterpret_cast<float*>(p += xq_b);
  Tensor gp(p += xs_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor upr(p += gi_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor act(p += gi_b, DType::BF16, {n_rows, inter}, Device::CUDA);
  auto* aq = reinterpret_cast<uint8_t*>(p += gi_b);
  auto* as = reinterpret_cast<float*>(p += aq_b);
  Tensor y(p += as_b, DType::F32, {n_rows, hidden}, Device::CUDA);
  auto* pg = reinterpret_cast<float*>(p += y_b);
  auto* pu = reinterpret_cast<float*>(p + pg_b);
  auto* pd = reinterpret_cast<float*>(p + 2 * pg_b);
  const Fp8ExpertTables tables = fp8_expert_tables_on_device(shard);
  if (pg_b) {
    CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.gate_scale, count, sn_i, kbh, pg, ld_h, stream_), "pad");
    CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.up_scale, count, sn_i, kbh, pu, ld_h, stream_), "pad");
  }
  if (pd_b) CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.down_scale, count, sn_h, kbi, pd, ld_i, stream_), "pad");
  auto scale_of = [&](const std::vector<Weight>& list, float* padded, int64_t sn, int64_t ld, int e) {
    return padded != nullptr ? padded + static_cast<int64_t>(e) * sn * ld : list[e].scale.ptr<const float>();
  };
  for (int e = 0; e < count; ++e) {  // before anything reaches out: every GEMM must have an algorithm
    const int64_t b = host_off[e], n = host_off[e + 1] - host_off[e];
    if (n == 0) continue;
    for (const Weight* w : {&shard.gate[e], &shard.up[e]})
      if (fp8_lt_algo(n, inter, hidden, DType::BF16, w->data, xq + b * hidden, gp.slice(b, n).data) == nullptr)
        return false;
    if (fp8_lt_algo(n, hidden, inter, DType::F32, shard.down[e].data, aq + b * inter, y.slice(b, n).data) == nullptr)
      return false;
  }
  Tensor src_idx(src_token, DType::I32, {n_rows}, Device::CUDA);
  CUDA_LAUNCH(launch_gather_rows(dev(x), dev(src_idx), dev(xp), stream_), "gather_rows");
  CUDA_LAUNCH(launch_fp8_quantize_rows(dev(xp), xq, xs, offsets, count, stream_, lt_layout(hidden).act),
              "fp8_quantize_rows");
  for (int e = 0; e < count; ++e) {
    const int64_t b = host_off[e], n = host_off[e + 1] - host_off[e];
    if (n == 0) continue;
    const float* sx = xs + fp8_segment_scale_base(b, e, kbh);
    fp8_gemm_lt(xq + b * hidden, sx, n, shard.gate[e].data, scale_of(shard.gate, pg_b ? pg : nullptr, sn_i, ld_h, e),
                inter, hidden, gp.slice(b, n).data, DType::BF16);
    fp8_gemm_lt(xq + b * hidden, sx, n, shard.up[e].data, scale_of(shard.up, pg_b ? pu : nullptr, sn_i, ld_h, e), inter,
                hidden, upr.slice(b, n).data, DType::BF16);
  }
  CUDA_LAUNCH(launch_silu_mul(dev(gp), dev(upr), dev(act), stream_), "silu_mul");
  CUDA_LAUNCH(launch_fp8_quantize_rows(dev(act), aq, as, offsets, count, stream_, lt_layout(inter).act),
              "fp8_quantize_rows");
  for (int e = 0; e < count; ++e) {
    const int64_t b = host_off[e], n = host_off[e + 1] - host_off[e];
    if (n == 0) continue;
    fp8_gemm_lt(aq + b * inter, as + fp8_segment_scale_base(b, e, kbi), n, shard.down[e].data,
                scale_of(shard.down, pd_b ? pd : nullptr, sn_h, ld_i, e), hidden, inter, y.slice(b, n).data,
                DType::F32);
  }
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_), "moe_unpermute");
  return true;
}

}  // namespace cpinfer::cuda
