// Run-time choices of the layers (set once through EngineOptions::model, or by benchmarks between
// forwards) and the per-forward time profile they fill.
#pragma once

namespace cpinfer {

// How the K/V exchange of a CP prefill meets the attention. Overlapped: each rank stores its own
// K/V, starts the exchange, computes every local block's diagonal attention (its own keys)
// meanwhile, then the prefix (the other ranks' keys) and merges the two by log-sum-exp. Auto:
// overlapped when the CP communicator is stream-ordered (NCCL), sequential otherwise (host
// communicators finish the exchange before returning, so splitting would only add work).
enum class KvOverlap { Auto, On, Off };

// Decode steps as CUDA graphs (model/decode_graph.h). On: on back-ends that record graphs, at one
// rank. Off: every step enqueues its ops (--disable-cuda-graph). Eager (tests): the same padded
// batches as On, run without graphs, so a replay can be compared bit for bit, on any back-end.
enum class DecodeGraphMode { Off, On, Eager };

struct ModelOptions {
  DecodeGraphMode decode_graphs = DecodeGraphMode::On;
  int cuda_graph_max_bs = 256;  // larger decode batches run without a graph (--cuda-graph-max-bs)
  KvOverlap kv_overlap = KvOverlap::Auto;
  // Chunks of the sharded-expert MoE pipeline (gather of chunk c+1 and reduce of chunk c-1 overlap
  // the experts of chunk c). 0: the default, 1 (no pipelining; see MoE::chunks() for why); tests
  // and `bench prefill --moe-chunks` set others.
  int moe_chunks = 0;
  // Benchmarks only: skip every collective (the results are wrong; the kernels are the same), so
  // that the exposed communication time is the difference to a normal run.
  bool elide_comm = false;
  // Time each kind of work (synchronizes the device after every op group, so slows the forward).
  bool profiling = false;
};

// Wall time per kind of work in one forward; filled only when profiling. moe_s holds a MoE layer's
// adds and norms too where the block runs between them (MoE::run_between_norms); other_s the rest
// of the norms, embeddings and gathers.
struct ForwardProfile {
  double attention_s = 0, moe_s = 0, dense_gemm_s = 0, comm_s = 0, other_s = 0;
  double total() const { return attention_s + moe_s + dense_gemm_s + comm_s + other_s; }
  void add(const ForwardProfile& o) {
    attention_s += o.attention_s;
    moe_s += o.moe_s;
    dense_gemm_s += o.dense_gemm_s;
    comm_s += o.comm_s;
    other_s += o.other_s;
  }
};

}  // namespace cpinfer
