// The op contract of ops/backend.h checked once, for every back-end: shapes, ranks, dtypes the
// interface allows and scalar arguments. A back-end calls the validator of an op first, then
// checks only what it alone cannot do ("supported?": e.g. a head_dim its kernels lack) and what
// needs its memory (index values on the host). Every failure throws cpinfer::Error naming the op
// and the argument.
#pragma once
#include "ops/backend.h"

namespace cpinfer::contract {

// q [T, Hq, D], k [T, Hkv, D] of one float dtype; norm weights [D] float, or both undefined (RoPE
// only, no q/k norm); positions [T] I32 (I64 accepted for host-side back-ends); rope.inv_freq [D/2]; eps finite, >= 0;
// D even.
void qk_norm_rope(const Tensor& q, const Tensor& k, const Tensor& q_norm_w, const Tensor& k_norm_w, float eps,
                  const Tensor& positions, const RopeParams& rope);

}  // namespace cpinfer::contract
