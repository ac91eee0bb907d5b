// The per-call metadata of the cuDNN attention back-end (cudnn_attention.h), built on the device
// from the batch's own device copies so that a call needs no host-to-device copy.
#include "backends/cuda/cudnn_attention.h"

namespace cpinfer::cuda {
namespace {

// One CTA per block of the batch.
__global__ void cudnn_attention_meta_kernel(const int32_t* blocks, int n_blocks, const int32_t* block_table,
                                            int max_blocks_per_seq, int64_t row_elems, int64_t stats_row_elems,
                                            int pages, int64_t n_cache_pages, int32_t* seq_q, int32_t* seq_kv,
                                            int64_t* q_off, int64_t* stats_off, int32_t* page_table) {
  const int b = blockIdx.x;
  const int32_t* blk = blocks + static_cast<int64_t>(b) * kDevAttnBlockFields;
  const int32_t q_begin = blk[0], q_len = blk[1], pos_begin = blk[2], seq = blk[3];
  if (threadIdx.x == 0) {
    seq_q[b] = q_len;
    seq_kv[b] = pos_begin + q_len;
    q_off[b] = q_begin * row_elems;
    stats_off[b] = q_begin * stats_row_elems;
    if (b == n_blocks - 1) {
      q_off[n_blocks] = (static_cast<int64_t>(q_begin) + q_len) * row_elems;
      stats_off[n_blocks] = (static_cast<int64_t>(q_begin) + q_len) * stats_row_elems;
    }
  }
  const int32_t* row = block_table + static_cast<int64_t>(seq) * max_blocks_per_seq;
  for (int j = threadIdx.x; j < pages; j += blockDim.x) {
    const int32_t page = j < max_blocks_per_seq ? row[j] : 0;
    page_table[static_cast<int64_t>(b) * pages + j] = page >= 0 && page < n_cache_pages ? page : 0;
  }
}

}  // namespace

cudaError_t launch_cudnn_attention_meta(const DevAttnBatch& batch, int64_t row_elems, int64_t stats_row_elems,
                                        int pages, int64_t n_cache_pages, int32_t* seq_q, int32_t* seq_kv,
                                        int64_t* q_off, int64_t* stats_off, int32_t* page_table, cudaStream_t stream) {
  if (batch.n_blocks <= 0 || pages <= 0) return cudaErrorInvalidValue;
  cudnn_attention_meta_kernel<<<batch.n_blocks, 128, 0, stream>>>(
      batch.blocks, batch.n_blocks, batch.block_table, batch.max_blocks_per_seq, row_elems, stats_row_elems, pages,
      n_cache_pages, seq_q, seq_kv, q_off, stats_off, page_table);
  return cudaGetLastError();
}

}  // namespace cpinfer::cuda
