// The overlapped CP attention in two halves merged by log-sum-exp: each local query block attends
// first to its diagonal (the keys this rank computed, available before the exchange finishes),
// then to its prefix (the keys of the other ranks), and the two partial outputs are merged.
#pragma once
#include <vector>

#include "ops/backend.h"

namespace cpinfer {

// diag: every block over keys [pos_begin, ...) (its own); prefix: over keys [.., pos_begin) (empty
// for a block at position 0: out 0, lse -inf).
void split_diag_prefix(const std::vector<AttnBlock>& blocks, std::vector<AttnBlock>& diag,
                       std::vector<AttnBlock>& prefix);

// out, lse := the merge of (out, lse) and (out2, lse2) over disjoint key sets (Backend::attention_merge).
void lse_merge(Backend& be, Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2);

}  // namespace cpinfer
