#include "engine/engine.h"

#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/log.h"
#include "engine/launch.h"
#include "engine/runner.h"
#include "engine/scheduler.h"
#include "engine/stop.h"
#include "model/random_weights.h"
#include "model/registry.h"

namespace cpinfer {

namespace {
double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A progress bar on stderr, only when it is a terminal and the load takes more than a moment.
struct LoadProgress {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  bool tty = isatty(STDERR_FILENO);
  bool shown = false;
  void operator()(size_t done, size_t total) {
    if (!tty || total == 0 || seconds_since(t0) < 1.0) return;
    int pct = static_cast<int>(100.0 * double(done) / double(total));
    std::fprintf(stderr, "\r[cpinfer] loading weights %3d%% (%.1f / %.1f GiB)", pct, done / 1073741824.0,
                 total / 1073741824.0);
    shown = true;
    if (done >= total) std::fprintf(stderr, "\n");
  }
  ~LoadProgress() {
    if (shown) std::fprintf(stderr, "\n");
  }
};
}  // namespace

Engine::Engine(const std::string& model_dir, const EngineOptions& opt, ParallelCtx par) : opt_(opt), par_(par) {
  if (!par_.control) par_.control = par_.world;  // host communicators carry decisions themselves
  auto t0 = std::chrono::steady_clock::now();
  const bool random = !opt.random_weights.empty();
  cfg_ = random ? random_model_config(opt.random_weights) : load_config(model_dir);
  CPI_CHECK(opt.cp.cp_size == par_.cp_size(), "--attn-cp-size ", opt.cp.cp_size, " but the CP group has ",
            par_.cp_size(), " ranks");
  CPI_CHECK(opt.kv_cache_dtype == "auto" || opt.kv_cache_dtype == "bf16", "unknown KV cache dtype '",
            opt.kv_cache_dtype, "' (auto or bf16)");
  // Rank r drives GPU device_index + its local rank (one process may hold several GPU ranks).
  be_ = make_backend(opt.device,
                     opt.device == "cuda" ? local_device(opt.device_index, par_.world_rank()) : opt.device_index,
                     opt.backend);
  // Each rank loads only its share of the experts (all of them when they are replicated).
  const int shard = par_.replicate_experts ? 0 : par_.world_rank();
  const int n_shards = par_.replicate_experts ? 1 : par_.world_size();
  // With attention TP each rank loads only its heads' slices of the attention (and dense MLP) weights.
  const TpShard tp{par_.attn_tp_rank(), par_.attn_tp_size()};
  ModelWeights w;
  if (random) {
    w = random_weights(cfg_, *be_, shard, n_shards, 0, tp);
  } else {
    ckpt_ = std::make_unique<Checkpoint>(Checkpoint::open(model_dir));
    LoadProgress progress;
    w = load_weights(
        *ckpt_, cfg_, *be_, shard, n_shards,
        [&](size_t done, size_t total) {
          if (par_.world_rank() == 0 && !opt.quiet) progress(done, total);
        },
        tp);
  }
  size_t weight_bytes = w.bytes;
  model_ = make_model(cfg_, std::move(w), *be_, par_, opt.model);
  CPI_CHECK(opt.block_size > 0 && opt.kv_cache_tokens > 0, "KV cache needs positive --kv-cache-tokens");
  int n_blocks = (opt.kv_cache_tokens + opt.block_size - 1) / opt.block_size;
  KvCacheShape kv = model_->kv_shape(n_blocks, opt.block_size);
  if (opt.kv_cache_dtype == "bf16") kv.dtype = DType::BF16;
  cache_ = std::make_unique<KvCache>(*be_, kv);
  if (opt.cp.kv_shard && par_.cp_size() > 1) cache_->enable_shard(par_.cp_rank(), par_.cp_size(), opt.cp.kv_interleave);
  if (par_.world_rank() == 0 && !opt.quiet) {
    int n_moe = 0;
    for (int l = 0; l < static_cast<int>(cfg_.num_hidden_layers); ++l) n_moe += cfg_.is_moe_layer(l) ? 1 : 0;
    log_info("loaded ", cfg_.architecture, " from ", random ? "random weights (" + opt.random_weights + ")" : model_dir,
             ": ", cfg_.num_hidden_layers, " layers (", n_moe, " MoE, ", cfg_.num_experts, " experts top-",
             cfg_.num_experts_per_tok, "), hidden ", cfg_.hidden_size, ", vocab ", cfg_.vocab_size, ", weights ",
             dtype_name(model_->weight_dtype()), " ", weight_bytes / 1048576.0, " MiB on rank 0 of ", par_.world_size(),
             ", device ", be_->name(), ", ", seconds_since(t0), " s");
    if (tp.size > 1)
      log_info("attention tensor parallelism: ", tp.size, " ranks per TP group (", par_.world_size(), " ranks / CP ",
               par_.cp_size(), "), each with ", cfg_.num_attention_heads / tp.size, " of ", cfg_.num_attention_heads,
               " q heads and ", cache_->shape().n_kv_heads, " of ", cfg_.num_key_value_heads, " kv heads");
    log_info("KV cache: ", n_blocks * opt.block_size, " positions in blocks of ", opt.block_size, ", ",
             cache_->shape().bytes() / 1048576.0, " MiB ", dtype_name(cache_->shape().dtype),
             tp.size > 1 ? " per rank (its kv heads)" : "");
  }
}

Engine::~Engine() = default;

std::vector<std::vector<float>> Engine::run(const std::vector<SeqWork>& work) {
  ForwardPlan plan = make_plan(work, *cache_, par_.cp_rank(), opt_.cp);
  std::vector<float> logits = model_->forward(plan, *cache_);
  record_shard(plan, work, *cache_);
  for (const SeqWork& w : work) cache_->set_length(w.kv_seq, w.n_cached + static_cast<int>(w.tokens.size()));
  // Regroup the gathered rows (rank-major) per sequence, in position order.
  const size_t V = static_cast<size_t>(cfg_.vocab_size);
  std::vector<std::vector<std::pair<int32_t, size_t>>> rows(work.size());
  for (size_t i = 0; i < plan.logit_rows_all.size(); ++i)
    rows[plan.logit_rows_all[i].seq].push_back({plan.logit_rows_all[i].pos, i});
  std::vector<std::vector<float>> out(work.size());
  for (size_t s = 0; s < work.size(); ++s) {
    std::sort(rows[s].begin(), rows[s].end());
    out[s].resize(rows[s].size() * V);
    for (size_t j = 0; j < rows[s].size(); ++j)
      std::copy_n(logits.begin() + rows[s][j].second * V, V, out[s].begin() + j * V);
  }
  return out;
}

std::vector<int32_t> Engine::run_sample(const std::vector<SeqWork>& work, const std::vector<SampleRow>& rows) {
  CPI_CHECK(rows.size() == work.size(), "run_sample: ", rows.size(), " sampling rows for ", work.size(), " sequences");
  for (const SeqWork& w : work)
    CPI_CHECK(w.logits != LogitsWanted::All, "run_sample draws from the last position only (LogitsWanted::All given)");
  ForwardPlan plan = make_plan(work, *cache_, par_.cp_rank(), opt_.cp);
  std::vector<SampleRow> plan_rows;
  for (const LogitRow& r : plan.logit_rows_all) plan_rows.push_back(rows[r.seq]);
  std::vector<int32_t> drawn = model_->forward_sample(plan, *cache_, plan_rows);
  record_shard(plan, work, *cache_);
  for (const SeqWork& w : work) cache_->set_length(w.kv_seq, w.n_cached + static_cast<int>(w.tokens.size()));
  std::vector<int32_t> out(work.size(), -1);
  for (size_t i = 0; i < plan.logit_rows_all.size(); ++i) out[plan.logit_rows_all[i].seq] = drawn[i];
  return out;
}

std::vector<SeqWork> Engine::prefill_work(const std::vector<std::span<const int32_t>>& prompts,
                                          std::vector<int>& seq_ids, LogitsWanted want) {
  seq_ids.clear();
  std::vector<SeqWork> work;
  for (auto p : prompts) {
    CPI_CHECK(!p.empty(), "empty prompt");
    for (int32_t id : p)
      CPI_CHECK(id >= 0 && id < cfg_.vocab_size, "token id ", id, " outside the vocabulary [0, ", cfg_.vocab_size, ")");
    int seq = cache_->add_sequence();
    seq_ids.push_back(seq);
    if (!cache_->can_reserve(seq, static_cast<int>(p.size()))) {
      for (int s : seq_ids) cache_->free_sequence(s);
      seq_ids.clear();
      CPI_FAIL("prompt of ", p.size(), " tokens does not fit the KV cache (", cache_->n_free_blocks() * opt_.block_size,
               " free positions); raise --kv-cache-tokens");
    }
    cache_->reserve(seq, static_cast<int>(p.size()));
    work.push_back(SeqWork{seq, 0, p, want});
  }
  return work;
}

std::vector<SeqWork> Engine::decode_work(const std::vector<int>& seqs, const std::vector<int32_t>& tokens) {
  CPI_CHECK(seqs.size() == tokens.size(), "decode: ", seqs.size(), " sequences but ", tokens.size(), " tokens");
  std::vector<SeqWork> work;
  for (size_t i = 0; i < seqs.size(); ++i) {
    int n = cache_->length(seqs[i]);
    cache_->reserve(seqs[i], n + 1);
    work.push_back(SeqWork{seqs[i], n, std::span<const int32_t>(&tokens[i], 1), LogitsWanted::Last});
  }
  return work;
}

std::vector<std::vector<float>> Engine::prefill(const std::vector<std::span<const int32_t>>& prompts,
                                                std::vector<int>& seq_ids, LogitsWanted want) {
  return run(prefill_work(prompts, seq_ids, want));
}

std::vector<std::vector<float>> Engine::decode(const std::vector<int>& seqs, const std::vector<int32_t>& tokens) {
  return run(decode_work(seqs, tokens));
}

void Engine::release(int seq) { cache_->free_sequence(seq); }

// One request through the server's loop (Scheduler over an EngineRunner) on rank 0: the same
// admission, prefill, sampling rows, stop rule and multi-rank step protocol as `serve`; the other
// ranks replay rank 0's steps until it is done. The scheduler's never_fits() is the one check of
// context length and KV capacity; every rank makes it, so a request that can never fit is refused
// on every rank. Returns how the request ended (empty on the other ranks).
FinishInfo Engine::run_one(const std::shared_ptr<SchedRequest>& r) {
  CPI_CHECK(!r->prompt.empty(), "empty prompt");
  for (int32_t id : r->prompt)
    CPI_CHECK(id >= 0 && id < cfg_.vocab_size, "token id ", id, " outside the vocabulary [0, ", cfg_.vocab_size, ")");
  Communicator* control = par_.control && par_.control->size() > 1 ? par_.control : nullptr;
  EngineRunner runner(*this, control);
  SchedulerOptions so;
  so.chunked_prefill_size = 0;  // the prompt in one forward
  so.max_running_requests = 1;
  so.context_length = INT32_MAX;
  so.decode_reserve_tokens = 0;  // never_fits() checked the whole request; decode reserves step by step
  so.radix_cache = false;
  so.log_interval_s = 0;
  Scheduler sched(runner, so);
  const std::string why = sched.never_fits(static_cast<int>(r->prompt.size()), r->max_tokens);
  CPI_CHECK(why.empty(), why);
  // Sequences the caller keeps in the cache (Engine::prefill) are not the scheduler's to evict.
  const int need = static_cast<int>(r->prompt.size()) + r->max_tokens;
  const int64_t free_positions = int64_t(cache_->n_free_blocks()) * opt_.block_size;
  CPI_CHECK(cache_->positions_bound(need, so.max_prefill_forwards(need)) <= free_positions, "prompt (",
            r->prompt.size(), " tokens) + max_tokens (", r->max_tokens, ") exceed the KV cache (", free_positions,
            " free positions", cache_->sharded() ? " per CP rank" : "", "); raise --kv-cache-tokens");
  if (rank() != 0) {
    follow_steps(*this, *control);
    return {};
  }
  FinishInfo finished;
  r->on_finish = [&](const FinishInfo& f) { finished = f; };
  try {
    r->arrival = std::chrono::steady_clock::now();
    sched.submit(r);
    const std::atomic<bool> stop{true};  // run until the request is done
    sched.run(stop, std::chrono::milliseconds::max());
  } catch (...) {
    runner.shutdown();
    throw;
  }
  runner.shutdown();
  if (finished.reason == "error") CPI_FAIL(finished.error);
  return finished;
}

GenerateResult Engine::generate(std::span<const int32_t> prompt, const GenerateOptions& gen,
                                const std::function<bool(int32_t)>& on_token) {
  CPI_CHECK(gen.max_new_tokens >= 1, "max_new_tokens must be >= 1, got ", gen.max_new_tokens);
  gen.sampling.validate();
  auto r = std::make_shared<SchedRequest>();
  r->prompt.assign(prompt.begin(), prompt.end());
  r->max_tokens = gen.max_new_tokens;
  r->sampling = gen.sampling;
  r->stop_ids = stop_token_ids(gen.stop_ids, cfg_, gen.ignore_eos);
  const auto t0 = std::chrono::steady_clock::now();
  auto t_first = t0;
  r->on_token = [&](int32_t t) {
    if (r->output.size() == 1) t_first = std::chrono::steady_clock::now();
    return on_token ? on_token(t) : true;  // a stop id never comes here
  };
  const FinishInfo finished = run_one(r);
  if (rank() != 0) return {};
  GenerateResult res;
  res.output_ids = r->output;
  if (t_first == t0) t_first = std::chrono::steady_clock::now();  // the first token was a stop id
  res.finish_reason = finished.reason;
  res.ttft_s = std::chrono::duration<double>(t_first - t0).count();
  res.decode_s = seconds_since(t_first);
  return res;
}

std::vector<float> Engine::prompt_logits(std::span<const int32_t> prompt) {
  auto r = std::make_shared<SchedRequest>();
  r->prompt.assign(prompt.begin(), prompt.end());
  r->max_tokens = 1;  // the loop draws one token after the prompt; it is not returned
  r->sampling.temperature = 0.0f;
  std::vector<float> rows;
  const size_t vocab = static_cast<size_t>(cfg_.vocab_size);
  r->on_prompt_logits = [&](int pos, std::span<const float> row) {
    CPI_CHECK(rows.size() == static_cast<size_t>(pos) * vocab && row.size() == vocab, "prompt logits out of order");
    rows.insert(rows.end(), row.begin(), row.end());
  };
  run_one(r);
  if (rank() != 0) return {};
  CPI_CHECK(rows.size() == prompt.size() * vocab, "prompt logits: ", rows.size() / vocab, " rows for ", prompt.size(),
            " positions");
  return rows;
}

}  // namespace cpinfer
