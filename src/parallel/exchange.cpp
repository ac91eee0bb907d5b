#include "parallel/exchange.h"

namespace cpinfer {

std::vector<size_t> rank_bytes(const std::vector<int64_t>& rows_per_rank, size_t row_bytes, int64_t rows_factor) {
  std::vector<size_t> bytes(rows_per_rank.size());
  for (size_t r = 0; r < rows_per_rank.size(); ++r) bytes[r] = size_t(rows_factor * rows_per_rank[r]) * row_bytes;
  return bytes;
}

int64_t first_row_of(const std::vector<int64_t>& rows_per_rank, int rank) {
  int64_t row = 0;
  for (int r = 0; r < rank; ++r) row += rows_per_rank[size_t(r)];
  return row;
}

void sync_for(Backend& be, Communicator& comm) {
  if (!comm.queued()) be.sync();
}

Communicator::Ticket gather_rows_start(Communicator& comm, const Tensor& local, Tensor all,
                                       const std::vector<int64_t>& rows_per_rank, int64_t rows_factor) {
  const std::vector<size_t> bytes = rank_bytes(rows_per_rank, all.row_bytes(), rows_factor);
  return comm.all_gatherv_start(local.data, bytes[size_t(comm.rank())], all.data, bytes);
}

void gather_rows(Communicator& comm, const Tensor& local, Tensor all, const std::vector<int64_t>& rows_per_rank,
                 int64_t rows_factor) {
  const std::vector<size_t> bytes = rank_bytes(rows_per_rank, all.row_bytes(), rows_factor);
  comm.all_gatherv(local.data, bytes[size_t(comm.rank())], all.data, bytes);
}

void reduce_rows(Communicator& comm, const Tensor& partial, Tensor out, const std::vector<int64_t>& rows_per_rank) {
  std::vector<size_t> counts(rows_per_rank.size());
  for (size_t r = 0; r < rows_per_rank.size(); ++r) counts[r] = size_t(rows_per_rank[r] * partial.cols());
  comm.reduce_scatterv_sum(partial.data, out.data, counts, partial.dtype);
}

void store_gathered_kv(Backend& be, const Tensor& kv_all, const std::vector<int64_t>& rows_per_rank,
                       const Tensor& slots_all, const KvLayer& cache, int64_t n_kv_heads, int64_t head_dim,
                       int skip_rank) {
  int64_t row = 0, slot_row = 0;
  for (size_t r = 0; r < rows_per_rank.size(); ++r) {
    const int64_t n = rows_per_rank[r];
    if (n > 0 && int(r) != skip_rank) {
      Tensor seg = kv_all.slice(row, 2 * n);
      be.kv_store(seg.slice(0, n).view({n, n_kv_heads, head_dim}), seg.slice(n, n).view({n, n_kv_heads, head_dim}),
                  slots_all.slice(slot_row, n), cache);
    }
    row += 2 * n;
    slot_row += n;
  }
}

}  // namespace cpinfer
