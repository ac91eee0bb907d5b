// Decode steps replayed as recorded graphs (CUDA graphs; SGLang's and vLLM's CUDA-graph runners):
// a decode step enqueues ~15 ops per layer, and at small batches launching them costs more than
// running them. A batch of n sequences is padded to its bucket (decode_graph_batch) and its block
// table to a power-of-two width (decode_graph_width); each (bucket, width) is recorded once, after
// an eager warm-up run of the same padded step that grows every scratch buffer and workspace it
// touches, and from then on each step refills the graph's input buffer (token ids, positions,
// slots, logit rows, attention blocks, block table: one upload) and replays it. Padding rows embed
// token 0, store no K/V (slot -1) and attend to no key (empty key range); their logits are dropped.
// The attention launch is sized for the width's key count (AttnBatch::key_bound), so one graph
// serves every context up to it. A graph is recorded again after the back-end freed device memory
// (Backend::memory_epoch: a buffer it points at may be gone).
//
// Applies at one rank (a world of one), when every block of the plan is one query of its own
// sequence over all its keys, up to ModelOptions::cuda_graph_max_bs sequences, not while profiling.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <utility>

#include "layers/attention.h"
#include "layers/options.h"
#include "ops/backend.h"
#include "parallel/plan.h"

namespace cpinfer {

// A forward's per-step metadata already on the device (DecoderLM uploads nothing when given it).
struct StepInputs {
  Tensor ids;        // [T] I32 token ids
  Tensor logit_idx;  // [R] I32 rows whose logits are wanted
  AttnInputs attn;
};

// Batch bucket of n decode sequences: 1, 2, 4, 8, then multiples of 8 up to 64, of 16 up to 128,
// of 32 up to 256, of 64 beyond; capped at max_bs. 0 when n > max_bs or n < 1.
int decode_graph_batch(int n, int max_bs);
// Block-table width bucket: the next power of two >= max_blocks, at least 8.
int decode_graph_width(int max_blocks);
// `plan` (a decode plan decode_graph_applies to) padded to `batch` rows and a table of `width`
// blocks per row.
ForwardPlan pad_decode_plan(const ForwardPlan& plan, int batch, int width);
// Whether `plan` is a decode step a graph can run (see the top of this file; world size aside).
bool decode_graph_applies(const ForwardPlan& plan, int max_bs);

class DecodeGraphs {
 public:
  // Runs a padded plan's layers and returns its logits on the device ([R, V] F32, scratch that
  // outlives the call); `in` holds its inputs.
  using Forward = std::function<Tensor(const ForwardPlan& plan, const StepInputs& in)>;
  struct Stats {
    int64_t captures = 0;      // graphs recorded
    int64_t replays = 0;       // steps run by a graph
    int64_t padded_eager = 0;  // steps run padded without a graph (DecodeGraphMode::Eager)
  };

  DecodeGraphs(Backend& be, const ModelOptions& opt) : be_(be), opt_(opt) {}
  ~DecodeGraphs();

  // Whether run() takes `plan` at a world of `world_size` ranks under the current options.
  bool applies(const ForwardPlan& plan, int world_size) const;
  // Runs `plan` (applies() is true) padded, by graph (recorded first when needed) and returns the
  // logits of its own rows, [n, V] F32 on the device, valid until the next forward.
  Tensor run(const ForwardPlan& plan, const Forward& forward);
  const Stats& stats() const { return stats_; }
  size_t size() const { return graphs_.size(); }

 private:
  struct Entry {
    Buffer inputs;  // the graph's input buffer, refilled before every replay
    StepInputs dev;
    std::unique_ptr<OpGraph> graph;
    Tensor logits;  // [batch, V] where the graph leaves its logits
  };
  Entry& entry(int batch, int width);

  Backend& be_;
  const ModelOptions& opt_;
  std::map<std::pair<int, int>, Entry> graphs_;  // by (batch bucket, table width)
  uint64_t epoch_ = 0;                           // be_.memory_epoch() the graphs were recorded under
  bool failed_ = false;                          // a recording failed: eager from then on
  Stats stats_;
};

}  // namespace cpinfer
