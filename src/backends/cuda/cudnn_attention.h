// cuDNN's fused scaled-dot-product attention as a second prefill-attention back-end, over the
// engine's own layout (kernels/kernels.h device views): q/out [T, Hq, D] BF16 with the AttnBlocks
// back to back (ragged Q), the paged cache [n_pages, block_size, Hkv, D] BF16 read through each
// block's row of the block table (pages in any order), GQA, causal with the queries at positions
// pos_begin.. of their sequence, and lse [T, Hq] F32 (natural log of the softmax denominator,
// scale included).
//
// cuDNN is loaded at run time (dlopen("libcudnn.so.9")): a binary built with this file runs where
// cuDNN is absent, and then available() is false with the reason. Shapes cuDNN cannot take (key
// ranges kv_begin > 0 / finite kv_end, blocks out of order, other dtypes, a graph cuDNN rejects)
// are refused by check() before any launch; the caller keeps its own kernel for them.
//
// Cache contract: cuDNN's kernels read whole pages, and page 0 for table entries past a block's
// last page, and mask the scores there; a non-finite value in such a masked slot still reaches
// P·V as 0·NaN. Every slot of the cache must hold a finite value: the engine's KvCache zeroes a
// device cache when it allocates it. The own kernels never read outside a block's key range.
//
// The graph is cuDNN 9's composite SDPA pattern (matmul, scale, padding and bottom-right causal
// masks, softmax with stats, matmul) over paged K/V: in cuDNN 9.19 the single SDPA_FWD operation
// has no causal mask (that arrives with 9.21). Execution plans are cached per shape bucket (the
// largest query and key lengths rounded up to at most 25% more), so a new prompt length reuses a
// plan. The per-call metadata (sequence lengths, ragged offsets, per-block page tables) is built on
// the device by one small kernel from the batch's device copies: no host synchronization and no
// host-to-device copy per call.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "backends/cuda/kernels/kernels.h"

namespace cpinfer::cuda {

// How run() reads K/V for a call check() accepted: through the page tables, or (dense) as one
// strided run of the cache from first_page on — a single fresh sequence whose pages are
// consecutive, the layout of a prompt prefilled into a new KvCache. cuDNN has faster engines for
// the dense graph (no page tables, no ragged offsets).
struct CudnnCall {
  bool dense = false;
  int64_t first_page = 0;
};

class CudnnAttention {
 public:
  // Loads cuDNN and creates a handle on `device` (made current here). Never throws for a missing
  // or unusable library: available() is false then.
  explicit CudnnAttention(int device);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  bool available() const;
  // "cuDNN not available: <reason>" when !available(), else "".
  const std::string& unavailable_reason() const;
  // cudnnGetVersion() of the loaded library (e.g. 91900), 0 when none was loaded.
  int version() const;

  // Whether run() takes this call: "" when it does, else the reason. host_blocks is the host copy
  // of batch.blocks ([batch.n_blocks, kDevAttnBlockFields] I32, the AttnBlock fields); host_table,
  // when not null, the host copy of the block table ([n_seqs, max_blocks_per_seq]), which lets a
  // single fresh sequence on consecutive pages take the dense graph (*call says which). lse may be
  // undefined. The first call for a shape bucket builds its execution plan (slow: up to seconds);
  // later calls, supported or not, are answered from the cache.
  std::string check(const DevTensor& q, const DevAttnBatch& batch, const int32_t* host_blocks,
                    const int32_t* host_table, const DevKv& cache, const DevTensor& out, const DevTensor& lse,
                    CudnnCall* call);
  // Scratch run() needs for a call check() accepted with `call`.
  size_t workspace_bytes(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, const CudnnCall& call);
  // Enqueues the attention on `stream` (a call check() accepted; throws otherwise or when cuDNN
  // fails). workspace: device memory of at least workspace_bytes(...) bytes, 256-byte aligned.
  void run(const DevTensor& q, const DevAttnBatch& batch, const DevKv& cache, const CudnnCall& call, float scale,
           const DevTensor& out, const DevTensor& lse, void* workspace, size_t workspace_size, cudaStream_t stream);

  // Plans built so far (successful and refused), for tests and logs.
  int plans_built() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ---- kernels/cudnn_attention_meta.cu: the per-call metadata of one cuDNN call, from the batch's
// device copies, for b = 0 .. n_blocks - 1:
//   seq_q[b] = q_len, seq_kv[b] = pos_begin + q_len (the causal key count),
//   q_off[b] = q_begin · row_elems (q_off[n_blocks] = end of the last block), stats_off likewise
//   with stats_row_elems, page_table[b, 0 .. pages) = the block table row of the block's sequence
//   (entries past max_blocks_per_seq or outside [0, n_cache_pages) read as page 0, so cuDNN never
//   addresses memory outside the cache).
cudaError_t launch_cudnn_attention_meta(const DevAttnBatch& batch, int64_t row_elems, int64_t stats_row_elems,
                                        int pages, int64_t n_cache_pages, int32_t* seq_q, int32_t* seq_kv,
                                        int64_t* q_off, int64_t* stats_off, int32_t* page_table, cudaStream_t stream);

}  // namespace cpinfer::cuda
