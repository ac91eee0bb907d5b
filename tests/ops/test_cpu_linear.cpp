// CPU back-end: linear (all weight dtypes, FP8 with block scales, odd shapes, the blocked conversion
// path) and the MoE experts (full and partial shards, FP8 experts, determinism), against
// double-precision references.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <thread>

#include "backends/cpu/cpu_backend.h"
#include "ops_test_util.h"

namespace cpinfer::test {
namespace {

// Every case on each kernel set up to the CPU's best: AVX-512, AVX2 + FMA and the generic ones (an
// x86-64 CPU without AVX2/FMA). A set the CPU lacks runs the best it has (the case repeats).
class CpuLinear : public ::testing::TestWithParam<cpu::Kernels> {
 protected:
  std::unique_ptr<Backend> be = std::make_unique<CpuBackend>(GetParam(), /*fp8=*/true);
};
INSTANTIATE_TEST_SUITE_P(Kernels, CpuLinear,
                         ::testing::Values(cpu::Kernels::Avx512, cpu::Kernels::Avx2, cpu::Kernels::Generic),
                         [](const ::testing::TestParamInfo<cpu::Kernels>& i) {
                           return i.param == cpu::Kernels::Avx512 ? "avx512"
                                  : i.param == cpu::Kernels::Avx2 ? "avx2"
                                                                  : "generic";
                         });

// out[m, n] = Σ_k a[m, k] w[n, k], in double over the exact stored values.
std::vector<double> ref_linear(const HostTensor& a, const HostTensor& w, int64_t M, int64_t K, int64_t N) {
  std::vector<double> av = a.to_double(), wv = w.to_double(), out(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += av[m * K + k] * wv[n * K + k];
      out[m * N + n] = s;
    }
  return out;
}

TEST_P(CpuLinear, MatchesReference) {
  Rng rng(11);
  for (DType wt : {DType::F32, DType::BF16, DType::F16})
    for (int64_t M : {1, 2, 3, 17, 200})
      for (auto [K, N] : {std::pair<int64_t, int64_t>{16, 1}, {33, 7}, {64, 64}, {256, 300}}) {
        HostTensor a = rng.normal_tensor(DType::F32, {M, K});
        HostTensor w = rng.normal_tensor(wt, {N, K}, 0.1);
        HostTensor out(DType::F32, {M, N});
        out.poison();
        be->linear(a, w, out);
        EXPECT_TRUE(all_close(out, ref_linear(a, w, M, K, N), 1e-5,
                              std::string("linear w=") + dtype_str(wt) + " M=" + std::to_string(M) +
                                  " K=" + std::to_string(K) + " N=" + std::to_string(N)));
      }
}

TEST_P(CpuLinear, ManyWeightBlocksAnd3dInput) {
  // N*K above the 2M-float conversion block: the product is assembled from several sgemm calls.
  Rng rng(12);
  const int64_t K = 1024, N = 2100;
  HostTensor a = rng.normal_tensor(DType::F32, {3, 1, K});
  HostTensor w = rng.normal_tensor(DType::BF16, {N, K}, 0.05);
  HostTensor out(DType::F32, {3, 1, N});
  out.poison();
  be->linear(a, w, out);
  EXPECT_TRUE(all_close(out, ref_linear(a, w, 3, K, N), 1e-5, "blocked bf16 linear"));

  HostTensor out_bf(DType::BF16, {3, N});  // rounded output on request
  be->linear(a, w, out_bf);
  std::vector<double> r = ref_linear(a, w, 3, K, N);
  EXPECT_TRUE(all_close(out_bf, r, 1e-2, "bf16 out"));
}

TEST_P(CpuLinear, ShapeErrorsThrow) {
  HostTensor a(DType::F32, {3, 8}), w(DType::F32, {5, 9}), out(DType::F32, {3, 5}), w_ok(DType::F32, {5, 8});
  EXPECT_THROW(be->linear(a, w, out), Error);
  EXPECT_THROW(be->linear(a, w_ok, HostTensor(DType::F32, {3, 6})), Error);
  EXPECT_THROW(be->linear(a, w_ok, HostTensor(DType::I32, {3, 5})), Error);
  be->linear(a, w_ok, out);
}

struct MoeCase {
  int64_t T, H, I, E, K;
  DType wt;
};

struct MoeWeights {
  std::vector<HostTensor> gate, up, down;
  ExpertShard shard(int32_t E, int32_t first, int32_t count) const {
    ExpertShard s;
    s.n_experts = E;
    s.first = first;
    s.count = count;
    for (int32_t e = first; e < first + count; ++e) {
      s.gate.push_back(gate[e]);
      s.up.push_back(up[e]);
      s.down.push_back(down[e]);
    }
    return s;
  }
};

MoeWeights random_experts(Rng& rng, const MoeCase& c) {
  MoeWeights w;
  for (int64_t e = 0; e < c.E; ++e) {
    w.gate.push_back(rng.normal_tensor(c.wt, {c.I, c.H}, 0.2));
    w.up.push_back(rng.normal_tensor(c.wt, {c.I, c.H}, 0.2));
    w.down.push_back(rng.normal_tensor(c.wt, {c.H, c.I}, 0.2));
  }
  return w;
}

// Distinct random experts per token with positive weights.
void random_routing(Rng& rng, const MoeCase& c, HostTensor& ids, HostTensor& wts) {
  ids = HostTensor(DType::I32, {c.T, c.K});
  wts = HostTensor(DType::F32, {c.T, c.K});
  for (int64_t t = 0; t < c.T; ++t) {
    std::vector<int64_t> perm(static_cast<size_t>(c.E));
    for (int64_t e = 0; e < c.E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng.gen());
    for (int64_t k = 0; k < c.K; ++k) {
      ids.set(t * c.K + k, static_cast<double>(perm[k]));
      wts.set(t * c.K + k, rng.uniform(0.05, 1.0));
    }
  }
}

// Σ_k w[t,k] · down(silu(gate x) ⊙ up x) over the experts in [first, first+count).
std::vector<double> ref_moe(const HostTensor& x, const HostTensor& ids, const HostTensor& wts, const MoeWeights& w,
                            const MoeCase& c, int64_t first, int64_t count) {
  std::vector<double> out(static_cast<size_t>(c.T * c.H), 0.0), xv = x.to_double();
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t e = static_cast<int64_t>(ids.get(t * c.K + k));
      if (e < first || e >= first + count) continue;
      std::vector<double> act(static_cast<size_t>(c.I));
      for (int64_t i = 0; i < c.I; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < c.H; ++h) {
          g += xv[t * c.H + h] * w.gate[e].get(i * c.H + h);
          u += xv[t * c.H + h] * w.up[e].get(i * c.H + h);
        }
        act[i] = g / (1 + std::exp(-g)) * u;
      }
      for (int64_t h = 0; h < c.H; ++h) {
        double y = 0;
        for (int64_t i = 0; i < c.I; ++i) y += act[i] * w.down[e].get(h * c.I + i);
        out[t * c.H + h] += wts.get(t * c.K + k) * y;
      }
    }
  return out;
}

TEST_P(CpuLinear, MoeExpertsFullAndPartialShards) {
  Rng rng(13);
  for (MoeCase c : {MoeCase{1, 32, 24, 8, 2, DType::BF16}, MoeCase{17, 32, 24, 8, 2, DType::F32},
                    MoeCase{200, 64, 40, 16, 4, DType::BF16}, MoeCase{3, 16, 8, 4, 4, DType::F16}}) {
    MoeWeights w = random_experts(rng, c);
    HostTensor x = rng.normal_tensor(DType::F32, {c.T, c.H});
    HostTensor ids, wts;
    random_routing(rng, c, ids, wts);
    // Out is written, not added to: what it held before does not show.
    HostTensor out0 = rng.normal_tensor(DType::F32, {c.T, c.H});
    const std::vector<int64_t> firsts = {0, 1, c.E / 2};
    const std::vector<int64_t> counts = {c.E, c.E / 2, c.E - c.E / 2};
    for (size_t s = 0; s < firsts.size(); ++s) {
      HostTensor out = out0;
      be->moe_experts(
          x, ids, wts,
          w.shard(static_cast<int32_t>(c.E), static_cast<int32_t>(firsts[s]), static_cast<int32_t>(counts[s])), out);
      EXPECT_TRUE(all_close(out, ref_moe(x, ids, wts, w, c, firsts[s], counts[s]), 1e-5,
                            "moe T=" + std::to_string(c.T) + " shard " + std::to_string(firsts[s])));
    }
    // Expert parallelism: the two halves on two "ranks" add up to the whole.
    HostTensor lo = out0, hi = out0;
    be->moe_experts(x, ids, wts, w.shard(static_cast<int32_t>(c.E), 0, static_cast<int32_t>(c.E / 2)), lo);
    be->moe_experts(
        x, ids, wts,
        w.shard(static_cast<int32_t>(c.E), static_cast<int32_t>(c.E / 2), static_cast<int32_t>(c.E - c.E / 2)), hi);
    be->add(lo, hi);
    EXPECT_TRUE(all_close(lo, ref_moe(x, ids, wts, w, c, 0, c.E), 1e-5, "split shards"));
    // A shard that none of the tokens chose gives zeros.
    HostTensor none = out0;
    be->moe_experts(x, ids, wts, w.shard(static_cast<int32_t>(c.E), 0, 0), none);
    EXPECT_TRUE(all_close(none, std::vector<double>(static_cast<size_t>(c.T * c.H), 0.0), 0.0, "empty shard"));
  }
}

TEST_P(CpuLinear, MoeExpertsDeterministicAcrossThreadCounts) {
  Rng rng(14);
  MoeCase c{200, 64, 48, 8, 4, DType::BF16};
  MoeWeights w = random_experts(rng, c);
  HostTensor x = rng.normal_tensor(DType::F32, {c.T, c.H});
  HostTensor ids, wts;
  random_routing(rng, c, ids, wts);
  HostTensor a(DType::F32, {c.T, c.H}), b(DType::F32, {c.T, c.H});
  be->fill_zero(a);
  be->fill_zero(b);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  be->moe_experts(x, ids, wts, w.shard(8, 0, 8), a);
  omp_set_num_threads(std::max(2, saved));
  be->moe_experts(x, ids, wts, w.shard(8, 0, 8), b);
  omp_set_num_threads(saved);
  EXPECT_EQ(std::memcmp(a.t.data, b.t.data, a.t.nbytes()), 0);
}

// Decode: each expert's GEMMs are too small for a team of threads, so the threads take whole experts;
// the result matches the reference and is the same bit for bit on 1, 2 and 3 threads.
TEST_P(CpuLinear, MoeExpertsOfADecodeStepSplitOverThreads) {
  Rng rng(18);
  MoeCase c{2, 512, 384, 16, 8, DType::BF16};
  MoeWeights w = random_experts(rng, c);
  HostTensor x = rng.normal_tensor(DType::F32, {c.T, c.H});
  HostTensor ids, wts;
  random_routing(rng, c, ids, wts);
  const int saved = omp_get_max_threads();
  std::vector<HostTensor> outs;
  for (int threads : {1, 2, 3}) {
    omp_set_num_threads(threads);
    outs.emplace_back(DType::F32, std::initializer_list<int64_t>{c.T, c.H});
    be->fill_zero(outs.back());
    be->moe_experts(x, ids, wts, w.shard(16, 0, 16), outs.back());
  }
  omp_set_num_threads(saved);
  EXPECT_TRUE(all_close(outs[0], ref_moe(x, ids, wts, w, c, 0, c.E), 1e-5, "decode experts"));
  for (size_t i = 1; i < outs.size(); ++i)
    EXPECT_EQ(std::memcmp(outs[i].t.data, outs[0].t.data, outs[0].t.nbytes()), 0) << i + 1 << " threads";
}

// The thread count changes how the work is shared, never an element's summation order: a wide
// matrix (column panels), a narrow one over many rows (row chunks), BF16 and F32 weights.
TEST_P(CpuLinear, LinearDeterministicAcrossThreadCounts) {
  Rng rng(17);
  const int saved = omp_get_max_threads();
  for (auto [M, K, N, wt] : {std::tuple{64, 512, 1100, DType::BF16}, std::tuple{700, 256, 96, DType::F32},
                             std::tuple{333, 384, 520, DType::BF16}}) {
    HostTensor a = rng.normal_tensor(DType::F32, {M, K});
    HostTensor w = rng.normal_tensor(wt, {N, K}, 0.05);
    HostTensor one(DType::F32, {M, N});
    omp_set_num_threads(1);
    be->linear(a, w, one);
    for (int threads : {2, 3, 5}) {
      HostTensor many(DType::F32, {M, N});
      many.poison();
      omp_set_num_threads(threads);
      be->linear(a, w, many);
      EXPECT_EQ(std::memcmp(one.t.data, many.t.data, one.t.nbytes()), 0)
          << M << "x" << K << " · " << N << "x" << K << " on " << threads << " threads";
    }
  }
  omp_set_num_threads(saved);
}

// Context-parallel ranks of the local communicator are threads calling their back-ends at the same
// time: per-thread scratch and the thread budget must give exactly the serial results.
TEST_P(CpuLinear, ConcurrentCallersGetSerialResults) {
  constexpr int kCallers = 4;
  Rng rng(16);
  const int64_t M = 64, K = 512, N = 520;  // above the threshold for a team of threads
  MoeCase c{50, 64, 48, 8, 2, DType::BF16};
  MoeWeights experts = random_experts(rng, c);
  HostTensor w = rng.normal_tensor(DType::BF16, {N, K}, 0.05);
  std::vector<HostTensor> a, x, ids(kCallers), wts(kCallers), serial_lin, serial_moe;
  for (int i = 0; i < kCallers; ++i) {
    a.push_back(rng.normal_tensor(DType::F32, {M, K}));
    x.push_back(rng.normal_tensor(DType::F32, {c.T, c.H}));
    random_routing(rng, c, ids[i], wts[i]);
    serial_lin.emplace_back(DType::F32, std::initializer_list<int64_t>{M, N});
    serial_moe.emplace_back(DType::F32, std::initializer_list<int64_t>{c.T, c.H});
    be->linear(a[i], w, serial_lin[i]);
    be->fill_zero(serial_moe[i]);
    be->moe_experts(x[i], ids[i], wts[i], experts.shard(8, 0, 8), serial_moe[i]);
  }
  std::vector<HostTensor> lin = serial_lin, moe = serial_moe;
  std::vector<std::thread> threads;
  for (int i = 0; i < kCallers; ++i)
    threads.emplace_back([&, i] {
      std::unique_ptr<Backend> own = std::make_unique<CpuBackend>(GetParam(), true);  // one per rank, as the engine
      lin[i].poison();
      own->linear(a[i], w, lin[i]);
      own->fill_zero(moe[i]);
      own->moe_experts(x[i], ids[i], wts[i], experts.shard(8, 0, 8), moe[i]);
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < kCallers; ++i) {
    EXPECT_EQ(std::memcmp(lin[i].t.data, serial_lin[i].t.data, lin[i].t.nbytes()), 0) << "caller " << i;
    EXPECT_EQ(std::memcmp(moe[i].t.data, serial_moe[i].t.data, moe[i].t.nbytes()), 0) << "caller " << i;
  }
}

TEST_P(CpuLinear, MoeExpertsErrorsThrow) {
  Rng rng(15);
  MoeCase c{3, 16, 8, 4, 2, DType::F32};
  MoeWeights w = random_experts(rng, c);
  HostTensor x = rng.normal_tensor(DType::F32, {3, 16}), out(DType::F32, {3, 16});
  HostTensor ids, wts;
  random_routing(rng, c, ids, wts);
  ids.set(3, 4);  // expert id == E
  EXPECT_THROW(be->moe_experts(x, ids, wts, w.shard(4, 0, 4), out), Error);
  ids.set(3, 1);
  ExpertShard bad = w.shard(4, 0, 4);
  bad.down[2] = w.gate[2];  // [I, H] where [H, I] is expected
  EXPECT_THROW(be->moe_experts(x, ids, wts, bad, out), Error);
  ExpertShard outside = w.shard(4, 2, 2);
  outside.first = 3;  // [3, 5) is not inside [0, 4)
  EXPECT_THROW(be->moe_experts(x, ids, wts, outside, out), Error);
  be->moe_experts(x, ids, wts, w.shard(4, 0, 4), out);
}

// ---- FP8 weights: e4m3 codes with one F32 scale per 128x128 block. The reference multiplies the
// dequantized values fp32(code · scale) in double: the values transformers' FP8 path computes with
// (w.float() * scale_inv), not their BF16 rounding (which misses the tolerance by ~100x).

enum class Codes { All, Small };  // every finite code; only subnormals and the smallest normals
enum class Scales { F32, Bf16 };  // scales with a full fp32 mantissa; BF16-representable (BF16 files)

struct Fp8Weight {
  HostTensor codes;   // F8E4M3 [N, K]
  HostTensor scale;   // F32 [ceil(N / 128), ceil(K / 128)]
  HostTensor values;  // F32 [N, K]: fp32(code · scale)
  Weight weight() const {
    Weight w(codes.t);
    w.scale = scale.t;
    return w;
  }
};

Fp8Weight random_fp8(Rng& rng, int64_t N, int64_t K, Scales scales = Scales::F32, Codes codes = Codes::All) {
  const int64_t sn = (N + kFp8Block - 1) / kFp8Block, sk = (K + kFp8Block - 1) / kFp8Block;
  Fp8Weight w{HostTensor(DType::F8E4M3, {N, K}), HostTensor(DType::F32, {sn, sk}), HostTensor(DType::F32, {N, K})};
  for (int64_t i = 0; i < sn * sk; ++i) {
    // Per-block scales over two octaves around 2^-9 (weights of O(0.1)), each block its own.
    float s = static_cast<float>(std::ldexp(rng.uniform(1.0, 2.0), static_cast<int>(rng.integer(-10, -8))));
    if (codes == Codes::Small) s = static_cast<float>(rng.uniform(1.0, 2.0));
    if (scales == Scales::Bf16) s = bf16_to_f32(f32_to_bf16(s));
    w.scale.ptr<float>()[i] = s;
  }
  auto* q = w.codes.ptr<uint8_t>();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      uint8_t c = static_cast<uint8_t>(codes == Codes::Small ? rng.integer(0, 15) | (rng.integer(0, 1) << 7)
                                                             : rng.integer(0, 255));
      if ((c & 0x7f) == 0x7f) c = 0x3f;  // no NaN codes here (FP8NanCodesGiveNan)
      q[n * K + k] = c;
      const double s = w.scale.ptr<float>()[(n / kFp8Block) * sk + k / kFp8Block];
      w.values.ptr<float>()[n * K + k] = static_cast<float>(static_cast<double>(fp8_e4m3_to_f32(c)) * s);
    }
  return w;
}

// Decode (1 to 3 rows: tiles of exactly M rows on AVX-512, row by row on AVX2) and prefill (5: tiles
// of 4 rows; 17: of 6; 70: dequantized blocks + sgemm); N and K off multiples of 128 and of the 8- and
// 16-wide vectors; several scale blocks each way.
TEST_P(CpuLinear, Fp8MatchesReferenceOnTheFp32DequantizedValues) {
  Rng rng(21);
  for (Scales sc : {Scales::F32, Scales::Bf16})
    for (Codes codes : {Codes::All, Codes::Small})
      for (int64_t M : {1, 2, 3, 5, 17, 70})
        for (auto [K, N] : {std::pair<int64_t, int64_t>{16, 1}, {33, 7}, {130, 129}, {300, 257}, {517, 130}}) {
          const Fp8Weight w = random_fp8(rng, N, K, sc, codes);
          HostTensor a = rng.normal_tensor(DType::F32, {M, K});
          HostTensor out(DType::F32, {M, N});
          out.poison();
          be->linear(a, w.weight(), out);
          EXPECT_TRUE(all_close(out, ref_linear(a, w.values, M, K, N), 1e-5,
                                std::string("fp8 linear scales=") + (sc == Scales::F32 ? "f32" : "bf16") +
                                    (codes == Codes::Small ? " small codes" : "") + " M=" + std::to_string(M) +
                                    " K=" + std::to_string(K) + " N=" + std::to_string(N)));
        }
}

// Every code (NaN codes too) in every position of a row, every kernel set: each weight is exactly
// fp32(code · scale), bit for bit.
TEST_P(CpuLinear, Fp8DequantizesEveryCodeExactly) {
  Rng rng(22);
  const int64_t N = 130, K = 275;
  Fp8Weight w = random_fp8(rng, N, K);
  for (int64_t i = 0; i < N * K; ++i) w.codes.ptr<uint8_t>()[i] = static_cast<uint8_t>((i * 7 + i / K) % 256);
  std::vector<float> got(static_cast<size_t>(N * K));
  cpu::dequantize_fp8(w.weight(), 0, N, got.data(), GetParam());
  const int64_t sk = w.scale.t.dim(1);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t c = w.codes.ptr<uint8_t>()[n * K + k];
      const float s = w.scale.ptr<float>()[(n / kFp8Block) * sk + k / kFp8Block];
      const float want = fp8_e4m3_to_f32(c) * s, v = got[static_cast<size_t>(n * K + k)];
      if ((c & 0x7f) == 0x7f) {
        ASSERT_TRUE(std::isnan(v)) << "code " << int(c) << " at " << n << "," << k;
      } else {
        ASSERT_EQ(std::memcmp(&v, &want, 4), 0)
            << "code " << int(c) << " at " << n << "," << k << ": " << v << " != " << want;
      }
    }
  // The products read NaN codes as NaN too (transformers would compute NaN), whatever the kernel
  // (decode rows, tiles of 4 or 6 rows, blocks for sgemm): only the outputs of the weight rows with
  // a NaN code are NaN, their neighbours in a tile stay finite.
  Fp8Weight some_nan = random_fp8(rng, N, K);
  some_nan.codes.ptr<uint8_t>()[3] = 0xff;                // row 0
  some_nan.codes.ptr<uint8_t>()[5 * K + 200] = 0x7f;      // row 5, second scale block
  some_nan.codes.ptr<uint8_t>()[129 * K + K - 1] = 0xff;  // row 129, the K tail
  for (int64_t M : {1, 2, 4, 13, 70}) {
    HostTensor a = rng.normal_tensor(DType::F32, {M, K}), out(DType::F32, {M, N});
    be->linear(a, some_nan.weight(), out);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        const bool nan_row = n == 0 || n == 5 || n == 129;
        ASSERT_EQ(std::isnan(out.ptr<float>()[m * N + n]), nan_row) << "M=" << M << " m=" << m << " n=" << n;
      }
  }
}

// A block scale too large to fold into the AVX2 conversion (|scale| >= 2^120: no real checkpoint)
// takes the per-element path and stays exact; small codes keep the weights finite.
TEST_P(CpuLinear, Fp8HugeBlockScalesStayExact) {
  Rng rng(25);
  const int64_t N = 130, K = 300;
  Fp8Weight w = random_fp8(rng, N, K, Scales::F32, Codes::Small);
  w.scale.ptr<float>()[1] = 0x1p121f;  // block (0, 1)
  for (int64_t n = 0; n < 128; ++n)
    for (int64_t k = 128; k < 256; ++k)
      w.values.ptr<float>()[n * K + k] = fp8_e4m3_to_f32(w.codes.ptr<uint8_t>()[n * K + k]) * 0x1p121f;
  std::vector<float> got(static_cast<size_t>(N * K));
  cpu::dequantize_fp8(w.weight(), 0, N, got.data(), GetParam());
  EXPECT_EQ(std::memcmp(got.data(), w.values.t.data, got.size() * 4), 0);
  for (int64_t M : {1, 3, 9, 14, 70}) {
    HostTensor a = rng.normal_tensor(DType::F32, {M, K}), out(DType::F32, {M, N});
    be->linear(a, w.weight(), out);
    EXPECT_TRUE(all_close(out, ref_linear(a, w.values, M, K, N), 1e-5, "huge scale M=" + std::to_string(M)));
  }
}

struct Fp8Experts {
  std::vector<Fp8Weight> gate, up, down;
  MoeWeights values;  // the dequantized values, F32
  ExpertShard shard(int32_t E, int32_t first, int32_t count) const {
    ExpertShard s = values.shard(E, first, count);
    for (int32_t e = 0; e < count; ++e) {
      s.gate[e] = gate[first + e].weight();
      s.up[e] = up[first + e].weight();
      s.down[e] = down[first + e].weight();
    }
    return s;
  }
};

TEST_P(CpuLinear, Fp8MoeExpertsMatchReferenceOnFullAndPartialShards) {
  Rng rng(23);
  for (MoeCase c : {MoeCase{1, 136, 200, 6, 2, DType::F8E4M3}, MoeCase{3, 72, 136, 4, 2, DType::F8E4M3},
                    MoeCase{40, 136, 200, 6, 3, DType::F8E4M3}}) {
    Fp8Experts w;
    for (int64_t e = 0; e < c.E; ++e) {
      const Scales sc = e % 2 ? Scales::Bf16 : Scales::F32;
      w.gate.push_back(random_fp8(rng, c.I, c.H, sc));
      w.up.push_back(random_fp8(rng, c.I, c.H, sc));
      w.down.push_back(random_fp8(rng, c.H, c.I, sc));
      w.values.gate.push_back(w.gate.back().values);
      w.values.up.push_back(w.up.back().values);
      w.values.down.push_back(w.down.back().values);
    }
    HostTensor x = rng.normal_tensor(DType::F32, {c.T, c.H});
    HostTensor ids, wts;
    random_routing(rng, c, ids, wts);
    HostTensor out0 = rng.normal_tensor(DType::F32, {c.T, c.H});
    for (auto [first, count] : {std::pair<int64_t, int64_t>{0, c.E}, {1, c.E / 2}, {c.E / 2, c.E - c.E / 2}}) {
      HostTensor out = out0;
      be->moe_experts(x, ids, wts, w.shard(int32_t(c.E), int32_t(first), int32_t(count)), out);
      EXPECT_TRUE(all_close(out, ref_moe(x, ids, wts, w.values, c, first, count), 1e-5,
                            "fp8 moe T=" + std::to_string(c.T) + " shard " + std::to_string(first)));
    }
  }
}

TEST_P(CpuLinear, Fp8WeightErrorsThrow) {
  Rng rng(24);
  const Fp8Weight w = random_fp8(rng, 130, 200);
  HostTensor a = rng.normal_tensor(DType::F32, {2, 200}), out(DType::F32, {2, 130});
  be->linear(a, w.weight(), out);
  auto fails = [&](const Weight& bad, const char* msg) {
    try {
      be->linear(a, bad, out);
      ADD_FAILURE() << "accepted: " << msg;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(msg), std::string::npos) << e.what();
    }
  };
  fails(Weight(w.codes.t), "needs F32 block scales [2, 2]");  // the scale dropped
  Weight wrong = w.weight();
  wrong.scale = w.scale.t.view({4, 1});
  fails(wrong, "got [4, 1] F32");
  HostTensor s16(DType::BF16, {2, 2});
  wrong.scale = s16.t;
  fails(wrong, "got [2, 2] BF16");
  Weight float_with_scale(w.values.t);
  float_with_scale.scale = w.scale.t;
  fails(float_with_scale, "only F8_E4M3 weights take them");
  // Experts too.
  MoeCase c{2, 200, 130, 2, 1, DType::F8E4M3};
  HostTensor x = rng.normal_tensor(DType::F32, {2, 200}), ids, wts, y(DType::F32, {2, 200});
  random_routing(rng, c, ids, wts);
  ExpertShard s;
  s.n_experts = 2;
  s.count = 2;
  std::vector<Fp8Weight> down;  // the shard's views point into these
  down.reserve(2);
  for (int e = 0; e < 2; ++e) down.push_back(random_fp8(rng, 200, 130));
  for (int e = 0; e < 2; ++e) {
    s.gate.push_back(w.weight());
    s.up.push_back(w.weight());
    s.down.push_back(down[static_cast<size_t>(e)].weight());
  }
  be->moe_experts(x, ids, wts, s, y);
  s.up[1].scale = Tensor();
  EXPECT_THROW(be->moe_experts(x, ids, wts, s, y), Error);
}

}  // namespace
}  // namespace cpinfer::test
