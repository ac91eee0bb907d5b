// The real ModelRunner: rank 0's Engine, and with several ranks the lockstep protocol that keeps
// the others in step. Rank 0 records every KV cache call (add/reserve/free) and, at each forward,
// broadcasts them with the step's work (sequence, cached length, tokens) over the control
// communicator (ParallelCtx::control: host memory, the same ranks as world); the other ranks
// replay the calls in the same order (so block ids match) and run the same forward. When idle,
// rank 0 broadcasts an empty step now and then so that the others' collectives do not time out;
// a shutdown step ends them.
#pragma once
#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "engine/engine.h"
#include "engine/scheduler.h"

namespace cpinfer {

class EngineRunner : public ModelRunner {
 public:
  // control: ParallelCtx::control (host memory); nullptr or size 1 for a single rank.
  EngineRunner(Engine& engine, Communicator* control);
  int add_sequence() override;
  void reserve(int seq, int n_tokens) override;
  void free_sequence(int seq) override;
  bool shares_blocks() const override { return true; }
  std::vector<CachedPage> cached_pages(int seq, int n_pages) const override {
    return engine_.cache().cached_pages(seq, n_pages);
  }
  void adopt_prefix(int seq, std::span<const CachedPage* const> path) override;
  int blocks_to_adopt(std::span<const CachedPage* const> path, int n_tokens) const override {
    return engine_.cache().blocks_to_adopt(engine_.cache().adoption(path), n_tokens);
  }
  int adopted_positions(std::span<const CachedPage* const> path) const override;
  void retain_block(int32_t ref) override;
  void release_block(int32_t ref) override;
  void reserve_synthetic(int seq, int n_tokens) override;
  std::vector<int32_t> run(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows) override;
  // The logits come to the host (Engine::run) and the token is drawn there with Backend::sample's
  // reference algorithm (the same draw as the device's, up to float rounding at a boundary).
  std::vector<int32_t> run_logprobs(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows,
                                    const std::vector<int>& top_n, std::vector<TokenLogprob>& logprobs,
                                    std::vector<std::vector<float>>& all_rows) override;
  void idle() override;
  int block_size() const override { return engine_.cache().block_size(); }
  int n_blocks() const override { return engine_.cache().n_blocks(); }
  int n_free_blocks() const override { return engine_.cache().n_free_blocks(); }
  int kv_ranks() const override { return engine_.cache().sharded() ? engine_.cache().shard_size() : 1; }
  int n_free_blocks_on(int rank) const override { return engine_.cache().n_free_blocks_on(rank); }
  bool kv_sharded() const override { return engine_.cache().sharded(); }
  int blocks_to_grow(int seq, int n_tokens) const override {
    return seq < 0 ? engine_.cache().blocks_needed_new(n_tokens) : engine_.cache().blocks_needed(seq, n_tokens);
  }
  int room_tokens(int seq, int free_blocks) const override { return engine_.cache().room_tokens(seq, free_blocks); }
  int64_t positions_bound(int64_t n_tokens, int64_t prefill_forwards) const override {
    return engine_.cache().positions_bound(n_tokens, prefill_forwards);
  }
  // Ends the other ranks' follow_steps loops. Call once, after the last step.
  void shutdown();

 private:
  void broadcast_step(int32_t kind, const std::vector<SeqWork>& work);
  void record(int32_t op, int32_t seq, int32_t a = 0, int32_t b = 0);
  Engine& engine_;
  Communicator* control_;
  std::vector<int32_t> ops_;  // cache calls since the last broadcast
};

// Ranks other than 0: receive and replay steps (over the control communicator) until rank 0's
// shutdown step.
void follow_steps(Engine& engine, Communicator& control);

// Step messages, exposed for tests: [kind, n_ops, ops..., n_work, (seq, n_cached, logits, n, tokens...)...]
enum StepKind : int32_t { kStepRun = 1, kStepShutdown = 2, kStepRunLogits = 3 };
// Ops are quadruples (op, seq, a, b): kOpReserve (seq, n_tokens), kOpShare (seq, block, rank),
// kOpRetain / kOpRelease (-, block, rank), kOpCopyTail (seq, ref of the source, rows),
// kOpAdopt (seq, rank, n): the KvCache calls of the same names; kOpSynthetic (seq, n_tokens):
// reserve and set_length (ModelRunner::reserve_synthetic).
enum CacheOp : int32_t {
  kOpAdd = 1,
  kOpReserve = 2,
  kOpFree = 3,
  kOpShare = 4,
  kOpRetain = 5,
  kOpRelease = 6,
  kOpCopyTail = 7,
  kOpAdopt = 8,
  kOpSynthetic = 9
};

}  // namespace cpinfer
