// Context-parallel data movement the layers call: row all-gathers over a CP group (K‖V of the
// prefill, hidden rows for sharded experts, logit rows), the partial-sum reduce back to the row
// owners, and the store of exchanged K/V into the paged cache. Rows are laid out rank-major: rank
// r's rows_per_rank[r] rows follow those of ranks 0..r-1.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "ops/backend.h"

namespace cpinfer {

// Bytes of each rank's rows: rows_per_rank[r] * rows_factor * row_bytes.
std::vector<size_t> rank_bytes(const std::vector<int64_t>& rows_per_rank, size_t row_bytes, int64_t rows_factor = 1);
// First row of rank `rank` in the rank-major layout.
int64_t first_row_of(const std::vector<int64_t>& rows_per_rank, int rank);

// Host communicators read device buffers themselves: the work queued so far must be done first.
// Stream-ordered (device) communicators need no host wait.
void sync_for(Backend& be, Communicator& comm);

// all[rank-major rows] = every rank's `local` rows; local [rows_per_rank[me] * rows_factor, C],
// all [Σ rows_per_rank * rows_factor, C]. start: returns a ticket to join (the host communicators
// finish before returning). The caller has synced for `comm` (sync_for).
Communicator::Ticket gather_rows_start(Communicator& comm, const Tensor& local, Tensor all,
                                       const std::vector<int64_t>& rows_per_rank, int64_t rows_factor = 1);
void gather_rows(Communicator& comm, const Tensor& local, Tensor all, const std::vector<int64_t>& rows_per_rank,
                 int64_t rows_factor = 1);

// out = this rank's rows of Σ over ranks of `partial` ([Σ rows, H], rank-major); out [rows_per_rank[me], H].
void reduce_rows(Communicator& comm, const Tensor& partial, Tensor out, const std::vector<int64_t>& rows_per_rank);

// Writes the exchanged K/V of every rank into `cache`. kv_all holds, per rank r in order, its n_r K
// rows then its n_r V rows ([Hkv * D] each, n_r = rows_per_rank[r]); slots_all [Σ n_r] the cache
// slots in the same rank-major order. Rank `skip_rank` (-1: none) is skipped: it stored its own.
void store_gathered_kv(Backend& be, const Tensor& kv_all, const std::vector<int64_t>& rows_per_rank,
                       const Tensor& slots_all, const KvLayer& cache, int64_t n_kv_heads, int64_t head_dim,
                       int skip_rank);

}  // namespace cpinfer
