// The op contract (ops/contract.h) on its own: it reads shapes, dtypes and the host copies of the
// attention metadata only, so these tests hand it tensors without memory on a device no back-end
// here has — what each back-end relies on before its own "supported?" checks.
#include <gtest/gtest.h>

#include <string>

#include "core/check.h"
#include "ops/contract.h"

namespace cpinfer::test {
namespace {

Tensor shape(DType dt, std::initializer_list<int64_t> dims) { return Tensor(nullptr, dt, dims, Device::CUDA); }

// The error text of f(), or "" when it does not throw.
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

struct AttnCase {
  Tensor q = shape(DType::BF16, {8, 4, 16}), out = shape(DType::BF16, {8, 4, 16}), lse = shape(DType::F32, {8, 4});
  KvLayer cache{shape(DType::BF16, {3, 16, 2, 16}), shape(DType::BF16, {3, 16, 2, 16})};
  AttnBatch batch;
  AttnCase() {
    batch.blocks = {AttnBlock{0, 8, 32, 0}};  // rows 0..7 at positions 32..39: pages 0..2
    batch.block_table = {0, 1, 2};
    batch.max_blocks_per_seq = 3;
    batch.max_q_len = 8;
  }
  std::string run(bool check_entries = true) const {
    return error_of([&] { contract::attention(q, batch, cache, 0.25f, out, lse, check_entries); });
  }
};

TEST(OpContract, AttentionHostMetadata) {
  AttnCase c;
  EXPECT_EQ(c.run(), "");
  AttnCase bad_entry = c;
  bad_entry.batch.block_table = {0, 99, 2};  // page 1 -> block 99 of a 3-block cache
  EXPECT_NE(bad_entry.run().find("block_table[0, 1] = 99"), std::string::npos) << bad_entry.run();
  // A back-end whose kernels read a bad entry as an empty page may skip the O(entries) scan.
  EXPECT_EQ(bad_entry.run(/*check_entries=*/false), "");
  AttnCase overlap = c;
  overlap.batch.blocks = {AttnBlock{0, 5, 32, 0}, AttnBlock{4, 4, 36, 0}};
  EXPECT_NE(overlap.run(false).find("belongs to two blocks"), std::string::npos);
  AttnCase no_seq = c;
  no_seq.batch.blocks = {AttnBlock{0, 8, 32, 1}};
  EXPECT_NE(no_seq.run(false).find("names sequence 1"), std::string::npos);
  AttnCase short_table = c;
  short_table.batch.blocks = {AttnBlock{0, 8, 41, 0}};  // keys up to 48: a 4th page
  EXPECT_NE(short_table.run(false).find("per sequence"), std::string::npos);
  AttnCase heads = c;
  heads.q = shape(DType::BF16, {8, 3, 16});
  heads.out = heads.q;
  heads.lse = shape(DType::F32, {8, 3});
  EXPECT_NE(heads.run().find("multiple of cache kv heads"), std::string::npos);
  AttnCase lse = c;
  lse.lse = shape(DType::BF16, {8, 4});
  EXPECT_NE(lse.run().find("lse"), std::string::npos);
  AttnCase negative = c;  // refused before anything is sized by it
  negative.q = shape(DType::BF16, {-8, 4, 16});
  negative.out = negative.q;
  EXPECT_NE(negative.run().find("negative dimension"), std::string::npos);
  AttnCase keys = c;
  keys.batch.blocks = {AttnBlock{0, 8, 32, 0, 20, 19}};
  EXPECT_NE(keys.run().find("kv_begin <= kv_end"), std::string::npos);
}

TEST(OpContract, OtherOps) {
  const Tensor x = shape(DType::BF16, {5, 32}), w = shape(DType::BF16, {32});
  EXPECT_EQ(error_of([&] { contract::rms_norm("rms_norm", x, w, 1e-6f, x); }), "");
  EXPECT_NE(error_of([&] { contract::rms_norm("rms_norm", x, shape(DType::BF16, {31}), 1e-6f, x); }).find("rms_norm"),
            std::string::npos);
  const Tensor r32 = shape(DType::F32, {5, 32});
  EXPECT_NE(error_of([&] { contract::rms_norm("add_rms_norm", x, w, 1e-6f, x, &r32); }).find("residual"),
            std::string::npos);
  EXPECT_NE(error_of([&] { contract::rms_norm("rms_norm", x, w, -1.0f, x); }).find("eps"), std::string::npos);

  const Tensor logits = shape(DType::BF16, {5, 8}), ids = shape(DType::I32, {5, 2}), wts = shape(DType::F32, {5, 2});
  EXPECT_EQ(error_of([&] { contract::moe_route(logits, 2, ids, wts); }), "");
  EXPECT_NE(error_of([&] { contract::moe_route(logits, 9, ids, wts); }).find("top_k"), std::string::npos);
  EXPECT_NE(error_of([&] {
              contract::moe_route(logits, 2, shape(DType::I64, {5, 2}), wts);
            }).find("ids"),
            std::string::npos);

  const KvLayer cache{shape(DType::BF16, {3, 16, 2, 16}), shape(DType::BF16, {3, 16, 2, 16})};
  const Tensor k = shape(DType::BF16, {6, 2, 16}), slots = shape(DType::I32, {6});
  EXPECT_EQ(error_of([&] { contract::kv_store(k, k, slots, cache); }), "");
  EXPECT_NE(error_of([&] { contract::kv_store(k, k, shape(DType::I32, {5}), cache); }).find("slots"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              contract::kv_store(shape(DType::BF16, {6, 2, 8}), shape(DType::BF16, {6, 2, 8}), slots, cache);
            }).find("cache's Hkv and D"),
            std::string::npos);

  const Tensor a = shape(DType::BF16, {5, 32}), wt = shape(DType::BF16, {16, 32}), y = shape(DType::BF16, {5, 16});
  EXPECT_EQ(error_of([&] { contract::linear(a, wt, y); }), "");
  EXPECT_NE(error_of([&] { contract::linear(a, shape(DType::BF16, {16, 31}), y); }).find("linear"), std::string::npos);
  EXPECT_NE(error_of([&] { contract::linear(a, wt, shape(DType::BF16, {4, 16})); }).find("out"), std::string::npos);
  const Tensor table = shape(DType::BF16, {100, 32}), tok = shape(DType::I32, {5});
  EXPECT_EQ(error_of([&] { contract::embedding(table, tok, a); }), "");
  EXPECT_NE(error_of([&] { contract::embedding(table, shape(DType::F32, {5}), a); }).find("ids"), std::string::npos);
  EXPECT_NE(error_of([&] { contract::add(a, shape(DType::F32, {5, 32})); }).find("'b' is F32"), std::string::npos);
  EXPECT_NE(error_of([&] { contract::silu_mul(a, a, shape(DType::BF16, {5, 31})); }).find("out"), std::string::npos);

  const Tensor o = shape(DType::BF16, {4, 2, 8}), l = shape(DType::F32, {4, 2});
  EXPECT_EQ(error_of([&] { contract::attention_merge(o, l, o, l); }), "");
  EXPECT_NE(error_of([&] {
              contract::attention_merge(o, l, shape(DType::F32, {4, 2, 8}), l);
            }).find("out2"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              contract::attention_merge(o, shape(DType::F32, {4, 3}), o, l);
            }).find("lse"),
            std::string::npos);
}

TEST(OpContract, MoeExpertsRowsAndConvert) {
  // Two local experts [2, 4) of 6, width 8, hidden 16; 5 tokens, top-2.
  ExpertShard shard;
  shard.n_experts = 6, shard.first = 2, shard.count = 2;
  for (int e = 0; e < 2; ++e) {
    shard.gate.push_back(shape(DType::BF16, {8, 16}));
    shard.up.push_back(shape(DType::BF16, {8, 16}));
    shard.down.push_back(shape(DType::BF16, {16, 8}));
  }
  const Tensor x = shape(DType::BF16, {5, 16}), ids = shape(DType::I32, {5, 2}), w = shape(DType::F32, {5, 2});
  auto moe = [&](const ExpertShard& sh, const Tensor& xx, const Tensor& ii, const Tensor& ww, const Tensor& out) {
    return error_of([&] { contract::moe_experts(xx, ii, ww, sh, out); });
  };
  EXPECT_EQ(moe(shard, x, ids, w, x), "");
  EXPECT_EQ(moe(shard, x, ids, w, shape(DType::F32, {5, 16})), "") << "F32 partial sums are allowed";
  EXPECT_NE(moe(shard, x, ids, w, shape(DType::BF16, {5, 15})).find("same shape"), std::string::npos);
  EXPECT_NE(moe(shard, x, shape(DType::I64, {5, 2}), w, x).find("ids"), std::string::npos);
  EXPECT_NE(moe(shard, x, ids, shape(DType::F32, {5, 3}), x).find("weights"), std::string::npos);
  ExpertShard outside = shard;
  outside.first = 5;
  EXPECT_NE(moe(outside, x, ids, w, x).find("not inside"), std::string::npos);
  ExpertShard missing = shard;
  missing.down.pop_back();
  EXPECT_NE(moe(missing, x, ids, w, x).find("down matrices"), std::string::npos);
  ExpertShard widths = shard;
  widths.gate[1] = shape(DType::BF16, {12, 16});
  widths.up[1] = shape(DType::BF16, {12, 16});
  widths.down[1] = shape(DType::BF16, {16, 12});
  EXPECT_NE(moe(widths, x, ids, w, x).find("expert 3"), std::string::npos) << "one width for every expert";
  ExpertShard ints = shard;
  ints.up[0] = shape(DType::I32, {8, 16});
  EXPECT_NE(moe(ints, x, ids, w, x).find("'up'"), std::string::npos);

  const Tensor src = shape(DType::BF16, {10, 6}), idx = shape(DType::I32, {4}), sel = shape(DType::BF16, {4, 6});
  EXPECT_EQ(error_of([&] { contract::gather_rows(src, idx, sel); }), "");
  EXPECT_EQ(error_of([&] { contract::scatter_rows(sel, idx, src); }), "");
  EXPECT_NE(error_of([&] { contract::gather_rows(src, shape(DType::I32, {3}), sel); }).find("one index per row"),
            std::string::npos);
  EXPECT_NE(error_of([&] { contract::scatter_rows(sel, shape(DType::I32, {5}), src); }).find("one index per row"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              contract::gather_rows(src, idx, shape(DType::F32, {4, 6}));
            }).find("'out' is F32"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              contract::gather_rows(src, idx, shape(DType::BF16, {4, 7}));
            }).find("one row shape"),
            std::string::npos);
  EXPECT_EQ(error_of([&] {
              contract::gather_rows(shape(DType::F32, {10, 3, 2}), idx, shape(DType::F32, {4, 3, 2}));
            }),
            "");
  EXPECT_NE(error_of([&] { contract::gather_rows(src, shape(DType::F32, {4}), sel); }).find("idx"), std::string::npos);

  EXPECT_EQ(error_of([&] { contract::convert(src, shape(DType::F32, {60})); }), "");
  EXPECT_EQ(error_of([&] { contract::convert(idx, shape(DType::I32, {2, 2})); }), "") << "same dtype: a copy";
  EXPECT_NE(error_of([&] { contract::convert(src, shape(DType::F32, {59})); }).find("element counts"),
            std::string::npos);
  EXPECT_NE(error_of([&] { contract::convert(idx, shape(DType::F32, {4})); }).find("cannot convert"),
            std::string::npos);
}

}  // namespace
}  // namespace cpinfer::test
