#include "common.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "core/log.h"

namespace cpinfer {

void EngineFlags::add_to(CLI::App* app, bool model_required) {
  auto* m = app->add_option("--model-path", model_path,
                            "Model directory as published on the Hub (config.json, *.safetensors, tokenizer.json)");
  if (model_required) m->required();
  app->add_option("--device", device, "Back-end: cpu or cuda")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--device-index", device_index, "First GPU ordinal (rank r uses device-index + r)")
      ->capture_default_str();
  app->add_option("--attn-cp-size", attn_cp_size, "Context-parallel size: ranks that split one long prompt")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  auto* ws = app->add_option("--world-size", world_size,
                             "Number of ranks W the model spans (default: --attn-cp-size, or the mpirun size). "
                             "The W / attn-cp-size ranks with the same CP rank form an attention tensor-parallel "
                             "group: each computes a share of the attention heads (and of the dense MLP width), "
                             "holds only its kv heads' KV cache, and o_proj's partial sums are all-reduced over it; "
                             "MoE experts are sharded over all W ranks")
                 ->check(CLI::Range(0, 4096));
  // SGLang's name for the same number: tp_size = attn_cp_size x attn_tp_size ranks.
  app->add_option("--tp-size", world_size, "SGLang's name of --world-size (attention TP size = tp-size / attn-cp-size)")
      ->check(CLI::Range(0, 4096))
      ->excludes(ws);
  app->add_option("--ep-size", ep_size,
                  "Ranks the MoE experts are sharded over: the whole world (default) or 1 (every rank holds "
                  "all experts; more memory, no MoE communication)")
      ->check(CLI::Range(0, 4096));
  app->add_flag("--enable-prefill-cp", enable_prefill_cp, "Split long prompts over the CP ranks (zigzag)");
  app->add_option("--cp-min-tokens", cp_min_tokens,
                  "Prompts shorter than this are not split (default: 2 x attn-cp-size)")
      ->check(CLI::Range(0, 1 << 30));
  app->add_flag("--kv-shard", kv_shard,
                "Shard the KV cache over the CP ranks: each keeps only the positions it computes (ring "
                "attention for prefill, partial attention + LSE merge for decode) instead of a full copy");
  app->add_option("--kv-interleave", kv_interleave,
                  "With --kv-shard: positions per rank, round-robin, of decode tokens and unsplit prompts")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app->add_option("--comm", comm, "Communicator between ranks: local (threads) or mpi (under mpirun)")
      ->check(CLI::IsMember({"local", "mpi"}))
      ->capture_default_str();
  app->add_option("--comm-timeout", comm_timeout_s, "Seconds a collective waits for a peer before failing")
      ->check(CLI::Range(1, 86400))
      ->capture_default_str();
  app->add_option(
         "--kv-cache-tokens", kv_cache_tokens,
         "KV cache capacity in positions, per rank (default: generate/logits/bench: what the request needs; serve: "
         "--context-length, else 32768; with --kv-shard the share of one rank)")
      ->check(CLI::Range(0, 1 << 30));
  app->add_option("--page-size", block_size, "Positions per KV cache block")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app->add_option("--kv-cache-dtype", kv_cache_dtype,
                  "KV cache element type: auto (the activations': fp32 on the cpu, as transformers' fp32 forward; bf16 "
                  "on cuda) or bf16 (on the cpu half the KV memory and half the bytes a decode step reads; keys and "
                  "values rounded to BF16)")
      ->check(CLI::IsMember({"auto", "bf16"}))
      ->capture_default_str();
  app->add_option(
         "--attention-backend", backend.attention,
         "CUDA prefill attention: auto (on Hopper the warp-specialized kernel for page sizes that are "
         "powers of two >= 8, wgmma for others; mma.sync elsewhere), cudnn (every call cuDNN takes), "
         "ws (in two passes: the row max only on the tiles that need it, docs/attention.md), ws-1pass (ws in one pass, "
         "for comparison), wgmma or mma")
      ->check(CLI::IsMember({"auto", "cudnn", "ws", "ws-1pass", "wgmma", "mma"}))
      ->capture_default_str();
  app->add_option(
         "--moe-runner-backend", backend.moe,
         "CUDA expert GEMMs of batches above the decode sizes: auto (warp-specialized grouped wgmma on Hopper, "
         "mma.sync "
         "elsewhere), mma, wgmma, wgmma128, wgmma-ws (warp-specialized) or cublas (per expert, for comparison)")
      ->check(CLI::IsMember({"auto", "mma", "wgmma", "wgmma128", "wgmma-ws", "cublas"}))
      ->capture_default_str();
  app->add_option("--fp8-weights", backend.fp8,
                  "Weights of an FP8 checkpoint: auto (kept as FP8, 1 byte per weight, where the back-end computes "
                  "with them: the CPU and compute capability 9.0 GPUs; dequantized to BF16 at load elsewhere) or bf16 "
                  "(always dequantized to BF16)")
      ->check(CLI::IsMember({"auto", "bf16"}))
      ->capture_default_str();
  app->add_flag("!--disable-pdl", backend.pdl,
                "CUDA: launch every kernel after the previous one has ended, instead of letting the decode-path "
                "kernels start under its tail (programmatic dependent launch, compute capability 9.0)");
  app->add_flag("--disable-cuda-graph", disable_cuda_graph,
                "Enqueue every decode step's kernels one by one instead of replaying a recorded CUDA graph");
  app->add_option("--cuda-graph-max-bs", cuda_graph_max_bs,
                  "Largest decode batch run as a CUDA graph (larger ones run without); graphs apply at a world size "
                  "of 1")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
}

LaunchOptions EngineFlags::launch() const {
  LaunchOptions l;
  l.comm = comm;
  l.world_size = world_size;
  l.cp_size = attn_cp_size;
  l.ep_size = ep_size;
  l.timeout_s = comm_timeout_s;
  l.gpu = device == "cuda";
  l.gpu_base = device_index;
  return l;
}

EngineOptions EngineFlags::engine(int needed, int64_t prefill_forwards) const {
  EngineOptions o;
  o.device = device;
  o.device_index = device_index;
  o.cp.cp_size = attn_cp_size;
  o.cp.enable_prefill_cp = enable_prefill_cp;
  o.cp.min_tokens = cp_min_tokens;
  o.cp.kv_shard = kv_shard;
  o.cp.kv_interleave = kv_interleave;
  o.block_size = block_size;
  o.kv_cache_dtype = kv_cache_dtype;
  o.backend = backend;
  o.model.decode_graphs = disable_cuda_graph ? DecodeGraphMode::Off : DecodeGraphMode::On;
  o.model.cuda_graph_max_bs = cuda_graph_max_bs;
  o.random_weights = random_weights;
  if (kv_shard && attn_cp_size > 1)
    needed = static_cast<int>(std::min<int64_t>(
        needed, KvCache::shard_positions_bound(needed, prefill_forwards, attn_cp_size, kv_interleave)));
  int want = kv_cache_tokens > 0 ? kv_cache_tokens : needed;
  o.kv_cache_tokens = ((want + block_size - 1) / block_size) * block_size;
  return o;
}

void EngineFlags::add_random_weights_to(CLI::App* app) {
  app->add_option("--random-weights", random_weights,
                  "Random weights instead of a checkpoint: qwen3-30b-a3b, qwen3-30b-a3b-fp8 (FP8 linear layers) or a "
                  "config.json path (with the Qwen3 "
                  "tokenizer unless --tokenizer-path)");
  app->add_option("--tokenizer-path", tokenizer_path,
                  "Directory with tokenizer.json and tokenizer_config.json (default: the model's; with "
                  "--random-weights the Qwen3 tokenizer scripts/setup.sh extracts)");
}

void EngineFlags::check_model_source() const {
  CPI_CHECK(model_path.empty() != random_weights.empty(), "give exactly one of --model-path and --random-weights");
}

std::string EngineFlags::tokenizer_dir() const {
  if (!tokenizer_path.empty()) return tokenizer_path;
  return random_weights.empty() ? model_path : default_tokenizer_dir();
}

std::string default_tokenizer_dir() {
  if (const char* env = std::getenv("CPINFER_TOKENIZER_DIR"); env && *env) return env;
  return std::string(CPINFER_SOURCE_DIR) + "/build/qwen3-tokenizer";
}

std::vector<int> parse_positive_list(const std::string& s, const char* flag) {
  std::vector<int> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    int v = 0;
    size_t used = 0;
    try {
      v = std::stoi(item, &used);
    } catch (...) {
      used = 0;
    }
    CPI_CHECK(used == item.size() && used > 0 && v > 0, flag, ": '", item, "' is not a positive integer");
    out.push_back(v);
  }
  CPI_CHECK(!out.empty(), flag, " is empty");
  return out;
}

namespace {
int32_t parse_id(const std::string& item) {
  int32_t v = 0;
  auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
  CPI_CHECK(!item.empty() && ec == std::errc() && p == item.data() + item.size() && v >= 0, "--input-ids: '", item,
            "' is not a non-negative token id (expected e.g. 1,2,3)");
  return v;
}
}  // namespace

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  if (!s.empty() && s[0] == '@') {
    // "@PATH": the ids from a file (a long prompt's list outgrows one command-line argument, 128 KiB
    // on Linux), separated there by commas and/or white space.
    std::ifstream in(s.substr(1), std::ios::binary);
    CPI_CHECK(in, "--input-ids: cannot read '", s.substr(1), "'");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::replace(text.begin(), text.end(), ',', ' ');
    std::istringstream words(text);
    for (std::string w; words >> w;) ids.push_back(parse_id(w));
    CPI_CHECK(!ids.empty(), "--input-ids: '", s.substr(1), "' holds no token ids");
    return ids;
  }
  size_t i = 0;
  while (i <= s.size()) {
    size_t j = s.find(',', i);
    if (j == std::string::npos) j = s.size();
    std::string item = s.substr(i, j - i);
    while (!item.empty() && item.front() == ' ') item.erase(item.begin());
    while (!item.empty() && item.back() == ' ') item.pop_back();
    ids.push_back(parse_id(item));
    i = j + 1;
  }
  CPI_CHECK(!ids.empty(), "--input-ids is empty");
  return ids;
}

}  // namespace cpinfer
