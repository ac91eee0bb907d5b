// Flags shared by the cpinfer subcommands and the helpers that turn them into engine options.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/launch.h"

namespace cpinfer {

struct EngineFlags {
  std::string model_path;
  std::string device = "cpu";
  int device_index = 0;
  int attn_cp_size = 1;
  int world_size = 0;  // --world-size, or SGLang's --tp-size (the same number)
  int ep_size = 0;
  bool enable_prefill_cp = false;
  int cp_min_tokens = 0;
  bool kv_shard = false;
  int kv_interleave = 1;
  std::string comm = "local";
  int comm_timeout_s = 300;
  int kv_cache_tokens = 0;
  int block_size = 16;
  std::string kv_cache_dtype = "auto";
  BackendOptions backend;  // --attention-backend, --moe-runner-backend, --fp8-weights, --disable-pdl
  bool disable_cuda_graph = false;
  int cuda_graph_max_bs = 256;
  // --random-weights / --tokenizer-path (generate, serve): random weights at a config's shape and a
  // tokenizer from elsewhere, so that a real-shape model runs without its checkpoint on disk.
  std::string random_weights;
  std::string tokenizer_path;

  void add_to(CLI::App* app, bool model_required = true);
  void add_random_weights_to(CLI::App* app);
  // Exactly one of --model-path and --random-weights; throws cpinfer::Error otherwise.
  void check_model_source() const;
  // --tokenizer-path, else the model directory, else (random weights) default_tokenizer_dir().
  std::string tokenizer_dir() const;
  LaunchOptions launch() const;
  // kv_cache_tokens when given, else `needed` (with --kv-shard: one rank's share of a sequence of
  // `needed` tokens written by `prefill_forwards` prefill forwards) rounded up to whole blocks.
  EngineOptions engine(int needed, int64_t prefill_forwards = 1) const;
};

// The Qwen3 tokenizer scripts/setup.sh extracts: $CPINFER_TOKENIZER_DIR, else build/qwen3-tokenizer.
std::string default_tokenizer_dir();

// "1,8,32" -> {1, 8, 32} for list flags (--seq, --batch, ...); throws cpinfer::Error naming the flag
// and the item that is not a positive integer.
std::vector<int> parse_positive_list(const std::string& s, const char* flag);

// "1,2,3" -> {1, 2, 3}, "@PATH" -> the same read from a file; throws cpinfer::Error naming the bad
// item (or the file it cannot read).
std::vector<int32_t> parse_ids(const std::string& s);

// Each subcommand registers its flags on `app` and returns what to run once parsing succeeded.
using CommandFn = std::function<int()>;
struct Command {
  CLI::App* app;
  CommandFn run;
};
Command add_generate_command(CLI::App& app);
Command add_logits_command(CLI::App& app);
Command add_demo_model_command(CLI::App& app);
Command add_bench_command(CLI::App& app);
// `cpinfer bench decode`, registered under `bench`; returns what runs it.
CommandFn add_bench_decode_command(CLI::App* bench);
Command add_serve_command(CLI::App& app);

// The demo checkpoint `cpinfer demo-model` writes (random weights, real Qwen3 tokenizer); serve
// uses it when no --model-path is given. Throws cpinfer::Error when the tokenizer files are missing.
struct DemoModelSpec {
  std::string out;
  std::string tokenizer_dir;  // empty: $CPINFER_TOKENIZER_DIR or build/qwen3-tokenizer
  uint64_t seed = 0;
  int layers = 4;
  int hidden = 256;
  int experts = 16;
  int heads = 4;      // query heads
  int kv_heads = 2;   // key/value heads (divides heads)
  int head_dim = 64;  // per head
  bool fp8 = false;   // linear weights as fine-grained FP8 (e4m3, 128x128 block scales)
};
void write_demo_model(const DemoModelSpec& spec);

}  // namespace cpinfer
