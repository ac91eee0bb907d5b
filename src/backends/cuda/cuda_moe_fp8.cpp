// CudaBackend::moe_experts with FP8 experts (codes + 128x128 block scales, ops/backend.h): the
// permutation and the weighted un-permute of cuda_moe.cpp around FP8 expert GEMMs.
// - Small batches (T·K <= kSmallPairs, decode), and shapes the block-scaled GEMMs do not take (H or
//   I not a multiple of 128, unaligned pointers, not Hopper): the row-wise kernels of
//   kernels/moe_rowwise.cu on the codes, activations BF16 (the CPU reference's arithmetic).
// - Larger batches on Hopper, by default: the device-scheduled grouped wgmma FP8 GEMMs
//   (kernels/moe_gemm_fp8_wgmma.cu, DeepSeek-V3's scheme: activations quantized per (row, 128
//   columns), per 128-wide K block an fp32 partial product scaled by the row's and the weight
//   block's scales), warp-specialized (gate‖up on 128 x 192 tiles where I % 384 == 0), expert
//   outputs y in BF16 (as the BF16 default);
//   --moe-runner-backend wgmma: the first grouped FP8 kernels (no producer warpgroup, y in F32),
//   kept to compare; --moe-runner-backend cublas: per expert, cuBLASLt's block-scaled FP8 GEMM
//   (cuda_fp8.cpp) over the expert's rows padded to a multiple of 4, which needs the expert row
//   counts on the host (one stream synchronization per call). mma/wgmma128 have no FP8 kernels:
//   they run the default, and so does wgmma-ws by name.
#include <algorithm>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {
namespace {

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
  ExpertPointers& entry = expert_pointer_entry(std::move(host));
  const void* const* p = static_cast<const void* const*>(entry.device);
  Fp8ExpertTables t;
  t.gate = p;
  t.up = p + count;
  t.down = p + 2 * count;
  t.gate_scale = p + 3 * count;
  t.up_scale = p + 4 * count;
  t.down_scale = p + 5 * count;
  // The grouped ws kernels' TMA descriptors of the codes, encoded once per table (Hopper only): 3·count
  // of 64-row boxes, then gate's and up's 2·count of 96-row boxes (the 128 x 192 gate‖up tiles).
  const size_t desc128 = 3 * static_cast<size_t>(count) * kTmaDescBytes;
  if (!entry.tma_tried && hopper_ && count > 0) {
    entry.tma_tried = true;
    std::vector<unsigned char> maps(desc128 + 2 * static_cast<size_t>(count) * kTmaDescBytes);
    const int64_t hidden = shard.gate[0].dim(1), inter = shard.gate[0].dim(0);
    if (encode_moe_fp8_weight_maps(entry.host.data(), count, hidden, inter, maps.data()) &&
        encode_moe_fp8_gateup192_maps(entry.host.data(), count, hidden, inter, maps.data() + desc128)) {
      entry.tma = alloc(maps.size());
      upload(entry.tma, maps.data(), maps.size());
    }
  }
  t.weight_maps = entry.tma;
  t.gateup_maps192 = entry.tma != nullptr ? static_cast<const unsigned char*>(entry.tma) + desc128 : nullptr;
  return t;
}

void CudaBackend::moe_experts_fp8(const Tensor& x, const Tensor& ids, const Tensor& weights, const ExpertShard& shard,
                                  Tensor out, const RowAddNorm* norm) {
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
  if (inter == 0) {  // every expert gives down · silu(empty) = 0
    zero_experts(out, norm);
    return;
  }
  DeviceGuard g(device_);
  fp8_used_ = true;
  const size_t n_pairs = static_cast<size_t>(n_tokens * top_k);
  if (moe_fp8_blocked(static_cast<int64_t>(n_pairs), count, hidden, inter, aligned)) {
    if (moe_gemm_ == MoeGemm::Cublas && moe_experts_fp8_lt(x, ids, weights, shard, out, norm)) return;
    const int64_t kbh = hidden / 128, kbi = inter / 128;
    // The warp-specialized kernels (the default) write y in BF16 like the BF16 default;
    // --moe-runner-backend wgmma runs the first FP8 kernels, y in F32, to compare.
    MoeFp8GemmArgs a;
    a.warp_specialized = a.y_bf16 = moe_gemm_ != MoeGemm::Wgmma;
    a.n_tokens = n_tokens;
    a.hidden = hidden;
    a.inter = inter;
    a.n_pairs = static_cast<int64_t>(n_pairs);
    a.tables = fp8_expert_tables_on_device(shard);
    // Scratch: the device-scheduled paths' (act BF16 where the gate‖up GEMM writes it before its
    // quantization, y in BF16 or F32), then xq [T, H] e4m3 with its scales [H/128, T], aq [T·K, I]
    // e4m3 with segmented scales.
    uint8_t *xq = nullptr, *aq = nullptr;
    float *xs = nullptr, *as = nullptr;
    const MoeScratch m = carve_moe_scratch(
        count, n_pairs, inter, hidden, a.y_bf16 ? 2 : 4,
        [&](Bump& w) {
          xq = w.take<uint8_t>(static_cast<size_t>(n_tokens * hidden));
          xs = w.take<float>(static_cast<size_t>(fp8_act_scale_floats(n_tokens, kbh)));
          aq = w.take<uint8_t>(n_pairs * inter);
          as = w.take<float>(static_cast<size_t>(fp8_segment_scale_floats(static_cast<int64_t>(n_pairs), count, kbi)));
        },
        moe_fp8_gate_up_needs_act(a));
    int32_t *offsets = m.offsets, *tile_start = m.tile_start, *src_token = m.src_token, *pair_row = m.pair_row;
    void* y_rows = m.y;
    CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                         tile_start, stream_, nullptr, m.permute),
                "moe_permute");
    CUDA_LAUNCH(launch_fp8_quantize_rows(dev(x), xq, xs, nullptr, 0, stream_), "fp8_quantize_rows");
    a.xq = xq;
    a.x_scale = xs;
    a.src_token = src_token;
    a.offsets = offsets;
    a.tile_start = tile_start;
    a.count = count;
    a.act = m.act;
    a.aq = aq;
    a.act_scale = as;
    a.y = y_rows;
    // gate‖up leaves act quantized in aq (in its epilogue, or act then the quantizer), down reads it.
    CUDA_LAUNCH(launch_moe_grouped_gemm_fp8_wgmma(a, /*gate_up=*/true, stream_), "moe_gateup_fp8_wgmma");
    CUDA_LAUNCH(launch_moe_grouped_gemm_fp8_wgmma(a, /*gate_up=*/false, stream_), "moe_down_fp8_wgmma");
    Tensor y(y_rows, a.y_bf16 ? DType::BF16 : DType::F32, {static_cast<int64_t>(n_pairs), hidden}, Device::CUDA);
    CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), pair_row, dev(out), stream_, norm), "moe_unpermute");
    return;
  }
  // The row-wise kernels.
  const MoeScratch m = carve_moe_scratch(count, n_pairs, inter, hidden, 4);
  int32_t *offsets = m.offsets, *active = m.active, *src_token = m.src_token, *pair_row = m.pair_row;
  void* act = m.act;
  float* y_rows = static_cast<float*>(m.y);
  const Fp8ExpertTables tables = fp8_expert_tables_on_device(shard);
  const bool vec = aligned && hidden % 16 == 0 && inter % 16 == 0;  // 16 codes per 16-byte chunk
  // One token takes the router's pairs as they are (no permute kernel; cuda_moe.cpp); more the
  // permute's segments, the grid covering at most T·K experts (active lists them on the device).
  const bool pairs = n_tokens == 1 && static_cast<int64_t>(n_pairs) <= kSmallPairs;
  MoeRowSource rows;
  if (pairs) {
    rows = MoeRowSource::pairs(ids.ptr<const int32_t>(), shard.first, static_cast<int>(ids.cols()),
                               static_cast<int>(n_pairs));
  } else {
    CUDA_LAUNCH(launch_moe_permute_tiled(dev(ids), shard.first, count, offsets, src_token, pair_row, kMoeGemmTileM,
                                         nullptr, stream_, active, m.permute),
                "moe_permute");
    rows = MoeRowSource::segments(src_token, offsets, pair_row, active,
                                  static_cast<int>(std::min<size_t>(n_pairs, size_t(count))));
  }
  CUDA_LAUNCH(launch_moe_rowwise_gemms_fp8(dev(x), rows, count, tables, inter, vec, act, y_rows, stream_),
              "moe_rowwise_gemms_fp8");
  Tensor y(y_rows, DType::F32, {static_cast<int64_t>(n_pairs), hidden}, Device::CUDA);
  CUDA_LAUNCH(launch_moe_unpermute(dev(y), dev(weights), rows, count, dev(out), stream_, norm), "moe_unpermute");
}

// --moe-runner-backend cublas with FP8 experts: gather the rows, quantize them per expert segment,
// and run cuBLASLt's block-scaled GEMM per expert; the offsets come to the host first. cuBLASLt
// takes only row counts that are multiples of 4, so each expert's GEMM runs over its n rows padded
// to n4 = round_up(n, 4): the activation scales are laid out for n4 rows (their pad rows zero), the
// pad rows' codes are the next expert's rows (or zeroed slack after the last), and their product
// rows land on the next expert's rows, which its own GEMM (enqueued after) overwrites, or in the
// slack; so rows never mix and every expert takes the FP8 GEMM. False (out untouched) when
// cuBLASLt lacks an algorithm for one of the experts' GEMMs.
bool CudaBackend::moe_experts_fp8_lt(const Tensor& x, const Tensor& ids, const Tensor& weights,
                                     const ExpertShard& shard, Tensor out, const RowAddNorm* norm) {
  const int count = shard.count;
  const int64_t hidden = x.cols(), inter = shard.gate[0].dim(0);
  const int64_t kbh = hidden / 128, kbi = inter / 128;
  const int64_t ld_h = lt_w_scale_ld(hidden), ld_i = lt_w_scale_ld(inter);  // cuBLASLt's weight-scale rows
  ExpertRows r = permute_rows_to_host(ids, shard);
  const int64_t n_rows = r.rows();
  if (n_rows == 0) {
    zero_experts(out, norm);
    return true;
  }
  const std::vector<int32_t>& host_off = r.host_off;
  auto rows4 = [&](int e) { return (host_off[e + 1] - host_off[e] + 3) / 4 * 4; };

  // Rows (+3 of slack for the last expert's padding): xp [n, H] BF16, xq [n, H] e4m3 + segmented
  // scales, gate/up/act [n, I] BF16, aq [n, I] e4m3 + segmented scales, y [n, H] F32; then the
  // padded weight scales of the shard (when K/128 is not a multiple of 4): gate, up [count,
  // ceil(I/128), ld_h], down [count, ceil(H/128), ld_i].
  const int64_t sn_i = (inter + 127) / 128, sn_h = (hidden + 127) / 128, n_slack = n_rows + 3;
  const size_t xs_n = static_cast<size_t>(fp8_segment_scale_floats(n_rows, count, kbh));
  const size_t as_n = static_cast<size_t>(fp8_segment_scale_floats(n_rows, count, kbi));
  char *xp = nullptr, *gp = nullptr, *upr = nullptr, *act = nullptr, *y = nullptr;
  uint8_t *xq = nullptr, *aq = nullptr;
  float *xs = nullptr, *as = nullptr, *pg = nullptr, *pu = nullptr, *pd = nullptr;
  carve_workspace(
      [&](Bump& w) {
        r.take(w);
        xp = w.take<char>(n_rows * hidden * 2);
        xq = w.take<uint8_t>(n_slack * hidden);
        xs = w.take<float>(xs_n);
        gp = w.take<char>(n_slack * inter * 2);
        upr = w.take<char>(n_slack * inter * 2);
        act = w.take<char>(n_rows * inter * 2);
        aq = w.take<uint8_t>(n_slack * inter);
        as = w.take<float>(as_n);
        y = w.take<char>(n_slack * hidden * 4);
        if (ld_h != kbh) {
          pg = w.take<float>(count * sn_i * ld_h);
          pu = w.take<float>(count * sn_i * ld_h);
        }
        if (ld_i != kbi) pd = w.take<float>(count * sn_h * ld_i);
      },
      r.bytes);  // may move
  const Fp8ExpertTables tables = fp8_expert_tables_on_device(shard);
  if (pg != nullptr) {
    CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.gate_scale, count, sn_i, kbh, pg, ld_h, stream_), "pad");
    CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.up_scale, count, sn_i, kbh, pu, ld_h, stream_), "pad");
  }
  if (pd != nullptr)
    CUDA_LAUNCH(launch_fp8_pad_scales(nullptr, tables.down_scale, count, sn_h, kbi, pd, ld_i, stream_), "pad");
  auto scale_of = [&](const std::vector<Weight>& list, float* padded, int64_t sn, int64_t ld, int e) {
    return padded != nullptr ? padded + static_cast<int64_t>(e) * sn * ld : list[e].scale.ptr<const float>();
  };
  for (int e = 0; e < count; ++e) {  // before anything reaches out: every GEMM must have an algorithm
    const int64_t b = host_off[e], n4 = rows4(e);
    if (n4 == 0) continue;
    for (const Weight* w : {&shard.gate[e], &shard.up[e]})
      if (!fp8_lt_supported(n4, inter, hidden, DType::BF16, w->data, xq + b * hidden, gp + b * inter * 2)) return false;
    if (!fp8_lt_supported(n4, hidden, inter, DType::F32, shard.down[e].data, aq + b * inter, y + b * hidden * 4))
      return false;
  }
  // Pad rows read zero scales; the slack rows after the last expert zero codes.
  CUDA_CHECK(cudaMemsetAsync(xs, 0, xs_n * 4, stream_));
  CUDA_CHECK(cudaMemsetAsync(as, 0, as_n * 4, stream_));
  CUDA_CHECK(cudaMemsetAsync(xq + n_rows * hidden, 0, static_cast<size_t>(3 * hidden), stream_));
  CUDA_CHECK(cudaMemsetAsync(aq + n_rows * inter, 0, static_cast<size_t>(3 * inter), stream_));
  Tensor src_idx(r.src_token, DType::I32, {n_rows}, Device::CUDA);
  Tensor xpt(xp, DType::BF16, {n_rows, hidden}, Device::CUDA);
  CUDA_LAUNCH(launch_gather_rows(dev(x), dev(src_idx), dev(xpt), stream_), "gather_rows");
  CUDA_LAUNCH(launch_fp8_quantize_rows(dev(xpt), xq, xs, r.offsets, count, stream_, lt_quantize_layout(hidden)),
              "fp8_quantize_rows");
  for (int e = 0; e < count; ++e) {
    const int64_t b = host_off[e], n4 = rows4(e);
    if (n4 == 0) continue;
    const float* sx = xs + fp8_segment_scale_base(b, e, kbh);
    fp8_gemm_lt(xq + b * hidden, sx, n4, shard.gate[e].data, scale_of(shard.gate, pg, sn_i, ld_h, e), inter, hidden,
                gp + b * inter * 2, DType::BF16);
    fp8_gemm_lt(xq + b * hidden, sx, n4, shard.up[e].data, scale_of(shard.up, pu, sn_i, ld_h, e), inter, hidden,
                upr + b * inter * 2, DType::BF16);
  }
  Tensor gpt(gp, DType::BF16, {n_rows, inter}, Device::CUDA), upt(upr, DType::BF16, {n_rows, inter}, Device::CUDA);
  Tensor actt(act, DType::BF16, {n_rows, inter}, Device::CUDA);
  CUDA_LAUNCH(launch_silu_mul(dev(gpt), dev(upt), dev(actt), stream_), "silu_mul");
  CUDA_LAUNCH(launch_fp8_quantize_rows(dev(actt), aq, as, r.offsets, count, stream_, lt_quantize_layout(inter)),
              "fp8_quantize_rows");
  for (int e = 0; e < count; ++e) {
    const int64_t b = host_off[e], n4 = rows4(e);
    if (n4 == 0) continue;
    fp8_gemm_lt(aq + b * inter, as + fp8_segment_scale_base(b, e, kbi), n4, shard.down[e].data,
                scale_of(shard.down, pd, sn_h, ld_i, e), hidden, inter, y + b * hidden * 4, DType::F32);
  }
  Tensor yt(y, DType::F32, {n_rows, hidden}, Device::CUDA);
  CUDA_LAUNCH(launch_moe_unpermute(dev(yt), dev(weights), r.pair_row, dev(out), stream_, norm), "moe_unpermute");
  return true;
}

}  // namespace cpinfer::cuda
