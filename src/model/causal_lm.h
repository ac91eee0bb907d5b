// The interface every model family implements (Qwen3-MoE, dense Qwen3, Llama 3, ...): the engine
// builds models through the registry (model/registry.h) and drives them only through this class.
#pragma once
#include <cstdint>
#include <vector>

#include "kv/kv_cache.h"
#include "layers/options.h"
#include "loader/config.h"
#include "ops/backend.h"
#include "parallel/context.h"
#include "parallel/plan.h"

namespace cpinfer {

class DecodeGraphs;

class CausalLM {
 public:
  virtual ~CausalLM() = default;

  virtual const ModelConfig& config() const = 0;
  virtual Backend& backend() = 0;
  virtual const ParallelCtx& parallel() const = 0;
  // Options may change between forwards (benchmarks toggle elide_comm and profiling).
  virtual ModelOptions& options() = 0;
  virtual const ForwardProfile& last_profile() const = 0;
  // Bytes of weights this rank holds and the storage dtype of most of them, the linear layers'
  // (for the load log line: an FP8 checkpoint kept FP8 says F8_E4M3, its norms and embeddings stay
  // BF16).
  virtual size_t weight_bytes() const = 0;
  virtual DType weight_dtype() const = 0;

  // The model's decode graphs (model/decode_graph.h: their counters), nullptr when it has none.
  virtual const DecodeGraphs* decode_graphs() const { return nullptr; }

  // Shape of the paged KV cache this model needs (dtype = back-end activation dtype).
  virtual KvCacheShape kv_shape(int n_blocks, int block_size) const = 0;

  // Runs this rank's rows of `plan`, writes the K/V of every row of the CP group into `cache` (each
  // rank's cache ends up holding all of them) and returns the logits of plan.logit_rows_all, on
  // every rank of the CP group: [R_all, vocab] fp32, row-major. All ranks of the world must call
  // forward together with plans built from the same inputs.
  virtual std::vector<float> forward(const ForwardPlan& plan, KvCache& cache) = 0;
  // The same forward, then one token drawn on the device for each logit row (rows[i] for
  // plan.logit_rows_all[i]; Backend::sample): only the ids come back to the host. Every rank of the
  // CP group draws the same tokens.
  virtual std::vector<int32_t> forward_sample(const ForwardPlan& plan, KvCache& cache,
                                              const std::vector<SampleRow>& rows) = 0;
};

}  // namespace cpinfer
