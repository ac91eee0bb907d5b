// attention_bench: times the CUDA back-end's causal prefill attention (the tensor-core kernel
// behind CudaBackend::attention) at the Qwen3-30B-A3B attention shape: 32 query / 4 kv heads,
// head_dim 128, one sequence of S tokens, paged KV written through the kv_store kernel.
// Fresh random bf16 inputs per size; CUDA-event timing, warm-up, median of --reps runs, with the
// median SM clock and board power (W) read (NVML) after each run and the share of runs the power
// limit held the clock down ("capped"): long runs settle lower than short ones, so compare
// throughputs at their clocks. (The board averages its power reading over a while: for short runs
// the W column lags.)
// FLOPs counted causal-halved: 2 GEMMs x 2 FLOP x S² x D x Hq / 2.
//
//   attention_bench [--seq 4096,16384,32768] [--reps 20] [--block-size 64]
//                   [--kernel mma,wgmma,ws,ws-1pass,cudnn|all] [--ws-kv-group G] [--ws-stages 2|3] [--cp C]
//                   [--ascending-pages] [--json]
// By default every kernel this machine has runs: mma.sync, on Hopper wgmma and ws (the
// warp-specialized kernel), and cuDNN's fused attention (backends/cuda/cudnn_attention.h, through
// the same paged layout and metadata as the engine) where libcudnn.so.9 loads. Each size also
// reports the largest difference of every other kernel's output from the first one's.
// cuDNN's time includes the small kernel that builds its per-call metadata, as in the engine.
// --ws-kv-group G, --ws-stages S: the ws kernel's AttentionWsConfig (work order in groups of G KV
// heads; K/V pipeline depth). ws runs in two passes, the first finding rows' maxima only where it
// must (AttentionWsConfig::two_pass, as the engine runs it); ws-1pass (by name only) is the ws
// kernel in one pass, finding them on every tile.
// --ascending-pages: the block table in page order (a fresh prompt's layout in a new KvCache)
// instead of reversed; cuDNN then reads K/V as one strided run (its dense graph, "cudnn-dense").
// --cp C also times the parts context parallelism over C ranks splits the attention of rank 0's
// last zigzag block (n = S / 2C queries at position P = S - n) into: the whole block (cp-full,
// keys [0, P + i]), its diagonal (cp-diag, kv_begin = P), its prefix (cp-prefix, kv_end = P, no
// causal mask) and their log-sum-exp merge (cp-merge, reported in GB/s), with the largest
// difference of the merged output from cp-full. The four are timed in turn, round after round, so
// that each sees the same clock. cuDNN takes no key ranges: for it only cp-full.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/cuda/cudnn_attention.h"
#include "backends/cuda/kernels/kernels.h"
#include "bench_util.cuh"
#include "gpu_clock.h"

using cpinfer::DType;
using cpinfer::cuda::DevAttnBatch;
using cpinfer::cuda::DevKv;
using cpinfer::cuda::DevTensor;

namespace {

constexpr const char* kBenchName = "attention_bench";

DevTensor view(void* p, DType dt, std::initializer_list<int64_t> dims) {
  DevTensor t;
  t.data = p;
  t.dtype = dt;
  for (int64_t d : dims) t.shape[t.ndim++] = d;
  return t;
}

struct Result {
  int64_t seq;
  std::string kernel, part;
  double ms, tflops;       // tflops: GB/s for cp-merge
  double max_diff = -1.0;  // causal: vs mma.sync, when both ran; cp-merge: vs cp-full
  unsigned mhz = 0;        // median SM clock read after each timed run (0: NVML not loaded)
  double capped = 0.0;     // share of the timed runs after which the power limit held the clock
  unsigned watts = 0;      // median board power read after each timed run (0: unknown)
};

// The median time of a launch's timed runs and the clock they ran at.
struct Timing {
  double ms;
  unsigned mhz;
  double capped;
  unsigned watts;
};

int* g_sched = nullptr;  // the ws kernel's work counter
cpinfer::cuda::AttentionWsConfig g_ws_cfg;

// cuDNN's path, created on first use; its scratch grows to the largest call.
struct Cudnn {
  std::unique_ptr<cpinfer::cuda::CudnnAttention> att;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  cpinfer::cuda::CudnnAttention& get() {
    if (!att) att = std::make_unique<cpinfer::cuda::CudnnAttention>(0);
    return *att;
  }
  // "" when cuDNN takes the call (and the scratch is ready), else why not.
  cpinfer::cuda::CudnnCall call;  // of the last prepared call: dense (consecutive pages) or paged
  std::string prepare(const DevTensor& q, const DevAttnBatch& b, const int32_t* host_blocks, const int32_t* host_table,
                      const DevKv& c, const DevTensor& o, const DevTensor& l) {
    std::string why = get().check(q, b, host_blocks, host_table, c, o, l, &call);
    if (!why.empty()) return why;
    const size_t need = att->workspace_bytes(q, b, c, call);
    if (need > ws_bytes) {
      BENCH_CHECK(cudaFree(ws));
      BENCH_CHECK(cudaMalloc(&ws, need));
      ws_bytes = need;
    }
    return "";
  }
};
Cudnn g_cudnn;

cudaError_t run_kernel(const std::string& kernel, const DevTensor& q, const DevAttnBatch& b, const DevKv& c,
                       float scale, const DevTensor& o, const DevTensor& l, cudaStream_t stream) {
  if (kernel == "ws") return cpinfer::cuda::launch_attention_ws(q, b, c, scale, o, l, g_sched, stream, g_ws_cfg);
  if (kernel == "ws-1pass") {
    cpinfer::cuda::AttentionWsConfig cfg = g_ws_cfg;
    cfg.two_pass = false;
    return cpinfer::cuda::launch_attention_ws(q, b, c, scale, o, l, g_sched, stream, cfg);
  }
  if (kernel == "wgmma") return cpinfer::cuda::launch_attention_wgmma(q, b, c, scale, o, l, stream);
  if (kernel == "cudnn") {
    try {
      g_cudnn.att->run(q, b, c, g_cudnn.call, scale, o, l, g_cudnn.ws, g_cudnn.ws_bytes, stream);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: %s\n", kBenchName, e.what());
      return cudaErrorUnknown;
    }
    return cudaGetLastError();
  }
  return cpinfer::cuda::launch_attention_flash(q, b, c, scale, o, l, stream);
}

std::vector<float> to_host_bf16(const void* p, int64_t n) {
  std::vector<__nv_bfloat16> raw(n);
  cudaMemcpy(raw.data(), p, n * 2, cudaMemcpyDeviceToHost);
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = __bfloat162float(raw[i]);
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> seqs = {4096, 16384, 32768};
  int reps = 20, block_size = 64, cp = 0;
  bool json = false, ascending = false;
  std::vector<std::string> kernels;  // default: every kernel this machine has
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--json") {
      json = true;
    } else if (a == "--ascending-pages") {
      ascending = true;
    } else if (a == "--kernel" && i + 1 < argc) {
      kernels.clear();
      const std::string list = argv[++i];
      for (size_t p = 0; p < list.size();) {
        const size_t q = list.find(',', p);
        kernels.push_back(list.substr(p, q - p));
        p = q == std::string::npos ? list.size() : q + 1;
      }
      for (const std::string& k : kernels)
        if (k != "mma" && k != "wgmma" && k != "ws" && k != "ws-1pass" && k != "cudnn" && k != "all") {
          std::fprintf(stderr, "attention_bench: unknown kernel '%s' (mma, wgmma, ws, ws-1pass, cudnn, all)\n",
                       k.c_str());
          return 2;
        }
    } else if (a == "--reps" && i + 1 < argc) {
      reps = std::max(10, std::atoi(argv[++i]));
    } else if (a == "--ws-stages" && i + 1 < argc) {
      g_ws_cfg.stages = std::atoi(argv[++i]);
    } else if (a == "--ws-kv-group" && i + 1 < argc) {
      g_ws_cfg.kv_heads_per_group = std::max(0, std::atoi(argv[++i]));
    } else if (a == "--cp" && i + 1 < argc) {
      cp = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--block-size" && i + 1 < argc) {
      block_size = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--seq" && i + 1 < argc) {
      seqs.clear();
      std::string list = argv[++i];
      for (size_t p = 0; p < list.size();) {
        size_t q = list.find(',', p);
        seqs.push_back(std::atoll(list.substr(p, q - p).c_str()));
        p = q == std::string::npos ? list.size() : q + 1;
      }
    } else {
      std::fprintf(
          stderr,
          "usage: attention_bench [--seq 4096,16384] [--reps N>=10] [--block-size B] "
          "[--kernel mma,wgmma,ws,ws-1pass,cudnn|all] [--ws-kv-group G] [--ws-stages 2|3] [--cp C] [--ascending-pages] "
          "[--json]\n");
      return 2;
    }
  }
  int n_dev = 0;
  if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev == 0) {
    std::fprintf(stderr, "attention_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  const bool hopper = prop.major == 9 && prop.minor == 0;
  const bool explicit_cudnn = kernels.size() == 1 && kernels[0] == "cudnn";
  if (kernels.empty() || kernels[0] == "all") {
    kernels = {"mma"};
    if (hopper) kernels.insert(kernels.end(), {"wgmma", "ws"});
    kernels.push_back("cudnn");
  }
  if (std::find(kernels.begin(), kernels.end(), "cudnn") != kernels.end() && !g_cudnn.get().available()) {
    std::fprintf(stderr, "%s: %s\n", kBenchName, g_cudnn.att->unavailable_reason().c_str());
    if (explicit_cudnn) return 1;
    kernels.erase(std::find(kernels.begin(), kernels.end(), "cudnn"));
  }
  if (g_cudnn.att && g_cudnn.att->available())
    std::fprintf(stderr, "%s: cuDNN %d loaded\n", kBenchName, g_cudnn.att->version());
  BENCH_CHECK(cudaMalloc(&g_sched, cpinfer::cuda::kAttnWsScratchInts * sizeof(int)));
  BENCH_CHECK(cudaMemset(g_sched, 0, cpinfer::cuda::kAttnWsScratchInts * sizeof(int)));
  const int64_t hq = 32, hkv = 4, d = 128;
  cudaStream_t stream;
  BENCH_CHECK(cudaStreamCreate(&stream));
  cudaEvent_t ev0, ev1;
  BENCH_CHECK(cudaEventCreate(&ev0));
  BENCH_CHECK(cudaEventCreate(&ev1));
  std::vector<Result> results;
  const GpuClock clock;
  // The launches' median times over `reps` rounds after 3 warm-ups; each round runs every launch
  // once, in turn, so that parts compared with each other run under the same clock (a long run of
  // one part and then of another would compare the later one at the clock the first left).
  auto interleaved = [&](std::vector<std::function<cudaError_t()>> launches) {
    for (int i = 0; i < 3; ++i)
      for (auto& launch : launches) BENCH_CHECK(launch());
    const size_t n = launches.size();
    std::vector<std::vector<float>> times(n);
    std::vector<ClockSamples> clk(n);
    for (int r = 0; r < reps; ++r)
      for (size_t k = 0; k < n; ++k) {
        BENCH_CHECK(cudaEventRecord(ev0, stream));
        BENCH_CHECK(launches[k]());
        BENCH_CHECK(cudaEventRecord(ev1, stream));
        BENCH_CHECK(cudaEventSynchronize(ev1));
        float ms = 0;
        BENCH_CHECK(cudaEventElapsedTime(&ms, ev0, ev1));
        times[k].push_back(ms);
        clk[k].read(clock);
      }
    std::vector<Timing> out;
    for (size_t k = 0; k < n; ++k) {
      std::sort(times[k].begin(), times[k].end());
      out.push_back({times[k][reps / 2], clk[k].median_mhz(), clk[k].capped_share(), clk[k].median_w()});
    }
    return out;
  };
  auto median_ms = [&](std::function<cudaError_t()> launch) { return interleaved({std::move(launch)})[0]; };
  for (int64_t s : seqs) {
    const int64_t n_pages = (s + block_size - 1) / block_size;
    void *q, *out, *k, *v, *ck, *cv, *lse, *slots, *table, *blocks, *out2, *lse2;
    BENCH_CHECK(cudaMalloc(&q, s * hq * d * 2));
    BENCH_CHECK(cudaMalloc(&out, s * hq * d * 2));
    BENCH_CHECK(cudaMalloc(&k, s * hkv * d * 2));
    BENCH_CHECK(cudaMalloc(&v, s * hkv * d * 2));
    BENCH_CHECK(cudaMalloc(&ck, n_pages * block_size * hkv * d * 2));
    BENCH_CHECK(cudaMalloc(&cv, n_pages * block_size * hkv * d * 2));
    BENCH_CHECK(cudaMalloc(&lse, s * hq * 4));
    BENCH_CHECK(cudaMalloc(&slots, s * 4));
    BENCH_CHECK(cudaMalloc(&table, n_pages * 4));
    constexpr int kF = cpinfer::cuda::kDevAttnBlockFields;
    BENCH_CHECK(cudaMalloc(&blocks, 4 * kF * 4));
    BENCH_CHECK(cudaMalloc(&out2, s * hq * d * 2));  // cp-prefix output
    BENCH_CHECK(cudaMalloc(&lse2, s * hq * 4));
    const uint32_t seed = static_cast<uint32_t>(s * 7919);
    fill_random_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(q), s * hq * d, seed + 1, 2.0f);
    fill_random_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(k), s * hkv * d, seed + 2, 2.0f);
    fill_random_bf16<<<1024, 256, 0, stream>>>(static_cast<__nv_bfloat16*>(v), s * hkv * d, seed + 3, 1.0f);
    BENCH_CHECK(cudaGetLastError());
    // Pages in reverse order, so that the paged read is exercised (not one contiguous run), or with
    // --ascending-pages in order (a fresh prompt's layout: cuDNN then runs its dense graph).
    std::vector<int32_t> h_table(n_pages), h_slots(s);
    for (int64_t p = 0; p < n_pages; ++p) h_table[p] = static_cast<int32_t>(ascending ? p : n_pages - 1 - p);
    for (int64_t i = 0; i < s; ++i)
      h_slots[i] = static_cast<int32_t>(h_table[i / block_size] * block_size + i % block_size);
    // Rows (q_begin, q_len, pos_begin, seq, kv_begin, kv_end): the whole sequence, causal; then the
    // --cp block of n queries at position P (its q and out views start at row P): whole, diagonal,
    // prefix.
    const int32_t n_cp = static_cast<int32_t>(cp > 0 ? std::max<int64_t>(1, s / (2 * cp)) : 1);
    const int32_t pos_cp = static_cast<int32_t>(s) - n_cp;
    const int32_t h_blocks[4 * kF] = {0,      static_cast<int32_t>(s),
                                      0,      0,
                                      0,      INT32_MAX,
                                      0,      n_cp,
                                      pos_cp, 0,
                                      0,      INT32_MAX,
                                      0,      n_cp,
                                      pos_cp, 0,
                                      pos_cp, INT32_MAX,
                                      0,      n_cp,
                                      pos_cp, 0,
                                      0,      pos_cp};
    BENCH_CHECK(cudaMemcpy(table, h_table.data(), n_pages * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(slots, h_slots.data(), s * 4, cudaMemcpyHostToDevice));
    BENCH_CHECK(cudaMemcpy(blocks, h_blocks, sizeof(h_blocks), cudaMemcpyHostToDevice));
    DevKv cache{view(ck, DType::BF16, {n_pages, block_size, hkv, d}),
                view(cv, DType::BF16, {n_pages, block_size, hkv, d})};
    BENCH_CHECK(cpinfer::cuda::launch_kv_store(view(k, DType::BF16, {s, hkv, d}), view(v, DType::BF16, {s, hkv, d}),
                                               view(slots, DType::I32, {s}), cache, stream));
    DevAttnBatch batch;
    batch.blocks = static_cast<const int32_t*>(blocks);
    batch.n_blocks = 1;
    batch.block_table = static_cast<const int32_t*>(table);
    batch.max_blocks_per_seq = static_cast<int>(n_pages);
    batch.max_q_len = static_cast<int>(s);
    batch.max_kv_len = static_cast<int>(s);
    const DevTensor qt = view(q, DType::BF16, {s, hq, d}), ot = view(out, DType::BF16, {s, hq, d});
    const DevTensor lt = view(lse, DType::F32, {s, hq});
    const float scale = 1.0f / std::sqrt(static_cast<float>(d));
    // The mma.sync output every other kernel is compared with.
    std::vector<float> ref;
    if (kernels != std::vector<std::string>{"mma"}) {
      BENCH_CHECK(run_kernel("mma", qt, batch, cache, scale, ot, lt, stream));
      ref = to_host_bf16(out, s * hq * d);
    }
    for (const std::string& kernel : kernels) {
      if (kernel == "cudnn") {
        const std::string why = g_cudnn.prepare(qt, batch, h_blocks, h_table.data(), cache, ot, lt);
        if (!why.empty()) {
          std::fprintf(stderr, "%s: S=%lld: cuDNN refuses: %s\n", kBenchName, static_cast<long long>(s), why.c_str());
          continue;
        }
      }
      BENCH_CHECK(cudaMemset(out, 0xff, s * hq * d * 2));
      const Timing tm = median_ms([&] { return run_kernel(kernel, qt, batch, cache, scale, ot, lt, stream); });
      const double flops = 4.0 * static_cast<double>(s) * s * d * hq / 2.0;
      Result r{s, kernel == "cudnn" && g_cudnn.call.dense ? "cudnn-dense" : kernel, "causal", tm.ms,
               flops / (tm.ms * 1e-3) / 1e12};
      r.mhz = tm.mhz;
      r.capped = tm.capped;
      r.watts = tm.watts;
      if (kernel != "mma" && !ref.empty()) {
        const std::vector<float> got = to_host_bf16(out, s * hq * d);
        double mx = 0.0;
        for (size_t i = 0; i < got.size(); ++i)
          mx = std::max(mx, std::isfinite(got[i]) ? std::fabs(static_cast<double>(got[i]) - ref[i]) : 1e30);
        r.max_diff = mx;
      }
      results.push_back(r);
      if (cp == 0) continue;
      // The --cp block: whole into rows [0, n) of out, diagonal into rows [P, P + n), prefix into
      // out2; the merge folds out2 into rows [P, P + n) and is compared with rows [0, n).
      const int64_t n = n_cp, P = pos_cp;
      const DevTensor qb = view(static_cast<__nv_bfloat16*>(q) + P * hq * d, DType::BF16, {n, hq, d});
      const DevTensor whole_o = view(out, DType::BF16, {n, hq, d}), whole_l = view(lse, DType::F32, {n, hq});
      const DevTensor diag_o = view(static_cast<__nv_bfloat16*>(out) + P * hq * d, DType::BF16, {n, hq, d});
      const DevTensor diag_l = view(static_cast<float*>(lse) + P * hq, DType::F32, {n, hq});
      const DevTensor pre_o = view(out2, DType::BF16, {n, hq, d}), pre_l = view(lse2, DType::F32, {n, hq});
      DevAttnBatch part = batch;
      part.max_q_len = n_cp;
      auto run_part = [&](int row, const DevTensor& o, const DevTensor& l) {
        part.blocks = static_cast<const int32_t*>(blocks) + row * kF;
        return run_kernel(kernel, qb, part, cache, scale, o, l, stream);
      };
      const double unit = 4.0 * static_cast<double>(n) * d * hq;  // FLOPs per key of every query
      if (kernel == "cudnn") {                                    // no key ranges: the whole block only
        part.blocks = static_cast<const int32_t*>(blocks) + kF;
        const std::string why = g_cudnn.prepare(qb, part, h_blocks + kF, h_table.data(), cache, whole_o, whole_l);
        if (!why.empty()) {
          std::fprintf(stderr, "%s: S=%lld cp-full: cuDNN refuses: %s\n", kBenchName, static_cast<long long>(s),
                       why.c_str());
          continue;
        }
        const Timing whole = median_ms([&] { return run_part(1, whole_o, whole_l); });
        results.push_back({s, kernel, "cp-full", whole.ms, unit * (P + n / 2.0) / (whole.ms * 1e-3) / 1e12, -1.0,
                           whole.mhz, whole.capped, whole.watts});
        continue;
      }
      BENCH_CHECK(run_part(1, whole_o, whole_l));
      BENCH_CHECK(run_part(2, diag_o, diag_l));
      BENCH_CHECK(run_part(3, pre_o, pre_l));
      BENCH_CHECK(cpinfer::cuda::launch_attention_merge(diag_o, diag_l, pre_o, pre_l, stream));
      const std::vector<float> whole = to_host_bf16(out, n * hq * d);
      const std::vector<float> merged = to_host_bf16(diag_o.data, n * hq * d);
      double merge_diff = 0.0;
      for (size_t i = 0; i < whole.size(); ++i) {
        const double diff = std::isfinite(merged[i]) ? std::fabs(static_cast<double>(merged[i]) - whole[i]) : 1e30;
        merge_diff = std::max(merge_diff, diff);
      }
      // Timed in turn, round after round (the merge folds the prefix into the diagonal's output in
      // place; each round recomputes both).
      const std::vector<Timing> tms =
          interleaved({[&] { return run_part(1, whole_o, whole_l); }, [&] { return run_part(2, diag_o, diag_l); },
                       [&] { return run_part(3, pre_o, pre_l); },
                       [&] { return cpinfer::cuda::launch_attention_merge(diag_o, diag_l, pre_o, pre_l, stream); }});
      const double merge_bytes = 3.0 * n * hq * (d * 2 + 4);
      const double work[4] = {unit * (P + n / 2.0) / 1e12, unit * (n / 2.0) / 1e12, unit * P / 1e12, merge_bytes / 1e9};
      const char* parts[4] = {"cp-full", "cp-diag", "cp-prefix", "cp-merge"};
      for (int k = 0; k < 4; ++k)
        results.push_back({s, kernel, parts[k], tms[k].ms, work[k] / (tms[k].ms * 1e-3), k == 3 ? merge_diff : -1.0,
                           tms[k].mhz, tms[k].capped, tms[k].watts});
    }
    for (void* p : {q, out, k, v, ck, cv, lse, slots, table, blocks, out2, lse2}) BENCH_CHECK(cudaFree(p));
  }
  if (json) {
    std::printf(
        "{\"device\": \"%s\", \"hq\": %lld, \"hkv\": %lld, \"head_dim\": %lld, \"block_size\": %d, \"results\": [",
        prop.name, static_cast<long long>(hq), static_cast<long long>(hkv), static_cast<long long>(d), block_size);
    for (size_t i = 0; i < results.size(); ++i)
      std::printf(
          "%s{\"S\": %lld, \"kernel\": \"%s\", \"part\": \"%s\", \"ms\": %.4f, \"%s\": %.1f, "
          "\"sm_mhz\": %u, \"power_capped\": %.2f, \"watts\": %u}",
          i ? ", " : "", static_cast<long long>(results[i].seq), results[i].kernel.c_str(), results[i].part.c_str(),
          results[i].ms, results[i].part == "cp-merge" ? "gbps" : "tflops", results[i].tflops, results[i].mhz,
          results[i].capped, results[i].watts);
    std::printf("]}\n");
  } else {
    std::printf("attention prefill (causal, Hq=%lld Hkv=%lld D=%lld, block_size %d) on %s, median of %d\n",
                static_cast<long long>(hq), static_cast<long long>(hkv), static_cast<long long>(d), block_size,
                prop.name, reps);
    if (cp > 0)
      std::printf("--cp %d: rank 0's last zigzag block of S/%d queries; cp-merge in GB/s, max|d| vs cp-full\n", cp,
                  2 * cp);
    std::printf("%8s %8s %10s %10s %10s %6s %6s %6s %12s\n", "S", "kernel", "part", "ms", "TFLOP/s", "MHz", "capped",
                "W", "max|d-1st|");
    for (const Result& r : results) {
      std::printf("%8lld %8s %10s %10.3f %10.1f %6u %6.2f %6u", static_cast<long long>(r.seq), r.kernel.c_str(),
                  r.part.c_str(), r.ms, r.tflops, r.mhz, r.capped, r.watts);
      if (r.max_diff >= 0) std::printf(" %12.3e", r.max_diff);
      std::printf("\n");
    }
  }
  g_cudnn.att.reset();  // before the CUDA runtime tears down at exit
  BENCH_CHECK(cudaFree(g_cudnn.ws));
  return 0;
}
