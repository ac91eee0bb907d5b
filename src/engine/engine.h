// One rank's engine: the loaded model, its KV cache and the forward steps (prefill of a batch of
// prompts, with context parallelism when enabled; decode) plus a lockstep generation loop. With
// several ranks every rank runs the same calls in the same order; rank 0 decides (samples, stops)
// and broadcasts its decisions.
#pragma once
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "kv/kv_cache.h"
#include "loader/config.h"
#include "loader/safetensors.h"
#include "model/causal_lm.h"
#include "parallel/plan.h"

namespace cpinfer {

struct FinishInfo;
struct SchedRequest;

struct EngineOptions {
  std::string device = "cpu";
  int device_index = 0;
  CpOptions cp;
  int kv_cache_tokens = 4096;  // capacity of the paged KV cache, in positions
  int block_size = 16;
  // KV cache element type: "auto" (the back-end's activation dtype) or "bf16".
  std::string kv_cache_dtype = "auto";
  bool quiet = false;  // no load log lines (tests)
  // When set, no checkpoint is read: random BF16 weights at this config's shape (a built-in name
  // such as "qwen3-30b-a3b" or a config.json path), built on the device (benchmarks).
  std::string random_weights;
  ModelOptions model;      // layer strategies (KV exchange overlap, MoE chunks, profiling)
  BackendOptions backend;  // kernel choices (--attention-backend, --moe-runner-backend)
};

struct GenerateOptions {
  int max_new_tokens = 16;
  SamplingParams sampling;
  bool ignore_eos = false;
  std::vector<int32_t> stop_ids;  // in addition to the model's EOS ids (unless ignore_eos)
};

struct GenerateResult {
  std::vector<int32_t> output_ids;
  std::string finish_reason;  // "length" or "stop"
  double ttft_s = 0;          // prefill + first token
  double decode_s = 0;        // the remaining tokens
};

class Engine {
 public:
  // model_dir: a Hub-format checkpoint directory (ignored with opt.random_weights).
  Engine(const std::string& model_dir, const EngineOptions& opt, ParallelCtx par = {});
  ~Engine();

  const ModelConfig& config() const { return cfg_; }
  CausalLM& model() { return *model_; }
  KvCache& cache() { return *cache_; }
  const EngineOptions& options() const { return opt_; }
  int rank() const { return par_.world_rank(); }
  // The rank's communicators (control: the step protocol's, set whenever world is).
  const ParallelCtx& parallel() const { return par_; }

  // Prefills prompts together (one forward). Creates a KV sequence per prompt (ids in seq_ids) and
  // returns each prompt's logits: [1, V] for Last, [len, V] for All, row-major.
  std::vector<std::vector<float>> prefill(const std::vector<std::span<const int32_t>>& prompts,
                                          std::vector<int>& seq_ids, LogitsWanted want = LogitsWanted::Last);
  // Appends tokens[i] to sequence seqs[i] (one forward) and returns the next-token logits of each.
  std::vector<std::vector<float>> decode(const std::vector<int>& seqs, const std::vector<int32_t>& tokens);
  void release(int seq);

  // Generates from one prompt through the server's loop (engine/scheduler.h over an EngineRunner,
  // one request): tokens are drawn on the back-end (Backend::sample); on_token runs on rank 0 for
  // every new token that is not a stop id and may return false to stop (e.g. a stop string). Every
  // rank calls generate; the others replay rank 0's steps (follow_steps) and return an empty result.
  GenerateResult generate(std::span<const int32_t> prompt, const GenerateOptions& gen,
                          const std::function<bool(int32_t)>& on_token = {});

  // The logits after every position of the prompt ([len, V], row-major) through the same loop as
  // generate (one request, the prompt in one forward). Every rank calls it; the others return {}.
  std::vector<float> prompt_logits(std::span<const int32_t> prompt);

  // Runs a forward of `work` (KV sequences already reserved) and returns logits grouped per
  // SeqWork entry.
  std::vector<std::vector<float>> run(const std::vector<SeqWork>& work);
  // The same forward with one token drawn on the device for every entry with LogitsWanted::Last
  // (rows[i] for work[i]; entries with None get -1 and their row is ignored; All is refused); -1
  // also where no logit is above -inf.
  std::vector<int32_t> run_sample(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows);

  // One request through the step loop (Scheduler over an EngineRunner: the prompt in one forward,
  // no prefix cache, one request at a time) on rank 0 while the other ranks replay its steps:
  // generate, prompt_logits and bench prefill (engine/bench_loop.h). Every rank calls it with the
  // same request; the scheduler's never_fits() refuses one that cannot fit, on every rank. Its
  // arrival is set when it is submitted. Returns how it ended (empty on the other ranks); throws
  // when it ended with an error.
  FinishInfo run_one(const std::shared_ptr<SchedRequest>& r);

 private:
  // The work of prefill (new KV sequences, ids checked, freed again if one does not fit) and of
  // decode (one position more per sequence), for run or run_sample.
  std::vector<SeqWork> prefill_work(const std::vector<std::span<const int32_t>>& prompts, std::vector<int>& seq_ids,
                                    LogitsWanted want);
  std::vector<SeqWork> decode_work(const std::vector<int>& seqs, const std::vector<int32_t>& tokens);

  EngineOptions opt_;
  ParallelCtx par_;
  ModelConfig cfg_;
  std::unique_ptr<Checkpoint> ckpt_;
  std::unique_ptr<Backend> be_;
  std::unique_ptr<CausalLM> model_;
  std::unique_ptr<KvCache> cache_;
};

}  // namespace cpinfer
