#include "parallel/merge.h"

namespace cpinfer {

void split_diag_prefix(const std::vector<AttnBlock>& blocks, std::vector<AttnBlock>& diag,
                       std::vector<AttnBlock>& prefix) {
  diag = blocks;
  prefix = blocks;
  for (AttnBlock& a : diag) a.kv_begin = a.pos_begin;
  for (AttnBlock& a : prefix) a.kv_end = a.pos_begin;
}

void lse_merge(Backend& be, Tensor out, Tensor lse, const Tensor& out2, const Tensor& lse2) {
  be.attention_merge(out, lse, out2, lse2);
}

}  // namespace cpinfer
