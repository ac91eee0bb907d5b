// CudaBackend::attention (prefill and decode: which kernel runs, the split-K workspace) and
// attention_merge (the LSE merge of CP's partial attentions).
#include <algorithm>

#include "backends/cuda/cuda_args.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "backends/cuda/kernels/kernels.h"
#include "ops/contract.h"

namespace cpinfer::cuda {

void CudaBackend::attention(const Tensor& q, const AttnBatch& batch, const KvLayer& cache, float scale, Tensor out,
                            Tensor lse) {
  const char* op = "attention";
  // Block-table entries are checked on the host when there are few (tests, short batches): the
  // model calls attention once per layer with the same batch, and a large decode batch would pay
  // O(entries) per layer. The kernels treat an entry outside the cache as empty, so a bad table
  // never faults either way.
  constexpr size_t kMaxHostCheckedEntries = size_t{1} << 16;
  contract::attention(q, batch, cache, scale, out, lse, batch.block_table.size() <= kMaxHostCheckedEntries);
  check_on_device(q, op, "q");
  check_on_device(out, op, "out");
  check_on_device(cache.k, op, "cache.k");
  check_on_device(cache.v, op, "cache.v");
  check_on_device(batch.dev_blocks, op, "batch.dev_blocks");
  check_on_device(batch.dev_block_table, op, "batch.dev_block_table");
  if (lse.defined()) check_on_device(lse, op, "lse");
  check_dtype(batch.dev_blocks, DType::I32, op, "batch.dev_blocks");
  check_dtype(batch.dev_block_table, DType::I32, op, "batch.dev_block_table");
  check_act(q, op, "q");
  check_act(cache.k, op, "cache.k");
  check_dtype(cache.v, cache.k.dtype, op, "cache.v");
  const int64_t t = q.dim(0), hq = q.dim(1), d = q.dim(2);
  CPI_CHECK(d <= 256, "attention: head_dim ", d, " > 256 is not supported on CUDA");
  static_assert(kDevAttnBlockFields == kAttnBlockFields, "the kernels read AttnBlock rows of kAttnBlockFields");
  const int64_t n_blocks = batch.dev_blocks.dim(0);
  CPI_CHECK(batch.dev_blocks.ndim == 2 && batch.dev_blocks.dim(1) == kAttnBlockFields, "attention: dev_blocks ",
            batch.dev_blocks.shape_str(), " must be [n_blocks, ", kAttnBlockFields, "]");
  CPI_CHECK(batch.dev_block_table.ndim == 2 && batch.dev_block_table.dim(1) == batch.max_blocks_per_seq,
            "attention: dev_block_table ", batch.dev_block_table.shape_str(), " must be [n_seqs, ",
            batch.max_blocks_per_seq, "]");
  // The device copies must describe what the contract checked on the host copies.
  CPI_CHECK(static_cast<int64_t>(batch.blocks.size()) == n_blocks, "attention: batch.blocks has ", batch.blocks.size(),
            " entries but dev_blocks has ", n_blocks);
  const int64_t n_seqs = batch.dev_block_table.dim(0);
  CPI_CHECK(static_cast<int64_t>(batch.block_table.size()) == n_seqs * batch.max_blocks_per_seq,
            "attention: batch.block_table has ", batch.block_table.size(), " entries but dev_block_table is ",
            batch.dev_block_table.shape_str());
  const int64_t bs = cache.block_size();
  CPI_CHECK(cache.k.dim(0) > 0, "attention: the KV cache ", cache.k.shape_str(), " is empty");
  int32_t max_q = 0;
  int64_t max_keys = 0;  // longest key range: the generic kernel splits it
  for (const AttnBlock& b : batch.blocks) {
    // Blocks without queries too: the kernels index the table by seq before they see q_len.
    CPI_CHECK(b.seq >= 0 && b.seq < n_seqs, "attention: a block names sequence ", b.seq, " of ", n_seqs);
    max_q = std::max(max_q, b.q_len);
    if (b.q_len > 0)
      max_keys = std::max(max_keys, std::min<int64_t>(b.kv_end, int64_t{b.pos_begin} + b.q_len) - b.kv_begin);
  }
  CPI_CHECK(batch.max_q_len >= max_q, "attention: batch.max_q_len ", batch.max_q_len,
            " is smaller than the largest block q_len ", max_q);
  if (n_blocks == 0 || t == 0) return;
  DeviceGuard g(device_);
  const bool flash = d == 128 && q.dtype == DType::BF16 && cache.k.dtype == DType::BF16 && max_q > 1;
  if (flash && prefill_kernel_ == PrefillKernel::Cudnn && attention_cudnn(q, batch, cache, scale, out, lse))
    return;  // else the own kernel
  if (flash) {
    switch (own_prefill_kernel(bs)) {
      case PrefillKernel::Ws:
        CUDA_LAUNCH(launch_attention_ws(dev(q), dev(batch), dev(cache), scale, dev(out), dev(lse), attn_sched_, stream_,
                                        ws_cfg_),
                    "attention_ws");
        break;
      case PrefillKernel::Wgmma:
        CUDA_LAUNCH(launch_attention_wgmma(dev(q), dev(batch), dev(cache), scale, dev(out), dev(lse), stream_),
                    "attention_wgmma");
        break;
      case PrefillKernel::MmaSync:
      case PrefillKernel::Auto:   // (own_prefill_kernel answers neither Auto
      case PrefillKernel::Cudnn:  // nor Cudnn)
        CUDA_LAUNCH(launch_attention_flash(dev(q), dev(batch), dev(cache), scale, dev(out), dev(lse), stream_),
                    "attention_flash");
        break;
    }
  } else {
    // Decode (and head dims without a tensor-core kernel): split-K over the keys, partials in the
    // workspace, merged by LSE. The GQA decode kernel where it applies, else the generic one.
    // A bound given for the launch (a captured decode graph) sizes the splits for every step it serves.
    CPI_CHECK(batch.key_bound == 0 || batch.key_bound >= max_keys, "attention: key_bound ", batch.key_bound,
              " is below the longest key range ", max_keys);
    const int keys = static_cast<int>(std::max<int64_t>(max_keys, batch.key_bound));
    const bool gqa = attention_decode_supported(dev(q), dev(cache), max_q);
    const int n_splits =
        gqa ? attention_decode_splits(static_cast<int>(n_blocks), static_cast<int>(cache.k.dim(2)), keys, n_sms_)
            : attention_generic_splits(static_cast<int>(t), static_cast<int>(hq), keys);
    float* part = nullptr;
    if (n_splits > 1)
      part = static_cast<float*>(workspace(static_cast<size_t>(t * hq) * n_splits * (d + 2) * sizeof(float)));
    if (gqa) {
      CUDA_LAUNCH(
          launch_attention_decode(dev(q), dev(batch), dev(cache), scale, dev(out), dev(lse), n_splits, part, stream_),
          "attention_decode");
    } else {
      CUDA_LAUNCH(launch_attention_generic(dev(q), dev(batch), dev(cache), scale, dev(out), dev(lse), n_splits, keys,
                                           part, stream_),
                  "attention_generic");
    }
  }
}

void CudaBackend::attention_merge(Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) {
  const char* op = "attention_merge";
  contract::attention_merge(out, lse, out2, lse2);
  check_on_device(out, op, "out");
  check_on_device(lse, op, "lse");
  check_on_device(out2, op, "out2");
  check_on_device(lse2, op, "lse2");
  check_act(out, op, "out");
  DeviceGuard g(device_);
  CUDA_LAUNCH(launch_attention_merge(dev(out), dev(lse), dev(out2), dev(lse2), stream_), "attention_merge");
}

}  // namespace cpinfer::cuda
