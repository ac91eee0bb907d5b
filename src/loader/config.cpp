#include "loader/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <numbers>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"

namespace cpinfer {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Typed access to one JSON object of a config file; every error names the file and the field.
// A null value counts as absent, as it does for transformers (e.g. "rope_scaling": null).
class Fields {
 public:
  Fields(const json& obj, std::string label, std::string prefix = "")
      : obj_(obj), label_(std::move(label)), prefix_(std::move(prefix)) {}

  const json* find(const char* key) const {
    auto it = obj_.find(key);
    return it == obj_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return find(key) != nullptr; }

  int64_t integer(const char* key) const {
    const json* v = find(key);
    CPI_CHECK(v != nullptr, label_, ": required field '", prefix_, key, "' is missing");
    return as_integer(*v, key);
  }
  int64_t integer(const char* key, int64_t def) const { return has(key) ? integer(key) : def; }
  std::optional<int64_t> opt_integer(const char* key) const {
    return has(key) ? std::optional<int64_t>(integer(key)) : std::nullopt;
  }

  double number(const char* key) const {
    const json* v = find(key);
    CPI_CHECK(v != nullptr, label_, ": required field '", prefix_, key, "' is missing");
    CPI_CHECK(v->is_number(), label_, ": field '", prefix_, key, "' must be a number, got ", json_brief(*v));
    const double x = v->get<double>();
    // The forward pass uses these as float: 1e308 would become inf (rope_theta: RoPE silently off).
    CPI_CHECK(std::isfinite(x) && std::fabs(x) <= std::numeric_limits<float>::max(), label_, ": field '", prefix_, key,
              "' = ", json_brief(*v), " is out of the range of a 32-bit float (|x| <= 3.4e38)");
    return x;
  }
  double number(const char* key, double def) const { return has(key) ? number(key) : def; }
  std::optional<double> opt_number(const char* key) const {
    return has(key) ? std::optional<double>(number(key)) : std::nullopt;
  }

  bool boolean(const char* key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    CPI_CHECK(v->is_boolean(), label_, ": field '", prefix_, key, "' must be true or false, got ", json_brief(*v));
    return v->get<bool>();
  }

  std::string string(const char* key, const std::string& def) const {
    const json* v = find(key);
    if (!v) return def;
    CPI_CHECK(v->is_string(), label_, ": field '", prefix_, key, "' must be a string, got ", json_brief(*v));
    return v->get<std::string>();
  }

  // An int or a list of ints (token ids).
  std::vector<int64_t> int_list(const char* key) const {
    const json* v = find(key);
    if (!v) return {};
    if (!v->is_array()) return {as_integer(*v, key)};
    std::vector<int64_t> out;
    for (const json& x : *v) out.push_back(as_integer(x, key));
    return out;
  }

  const std::string& label() const { return label_; }

 private:
  int64_t as_integer(const json& v, const char* key) const {
    CPI_CHECK(v.is_number_integer(), label_, ": field '", prefix_, key, "' must be an integer, got ", json_brief(v));
    if (v.is_number_unsigned()) {
      CPI_CHECK(v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), label_, ": field '", prefix_, key,
                "' is out of range: ", json_brief(v));
    }
    return v.get<int64_t>();
  }

  const json& obj_;
  std::string label_;
  std::string prefix_;
};

constexpr uint64_t kMaxConfigBytes = uint64_t(16) << 20;  // config.json, generation_config.json

// Bounds far above any real model, checked before anything is sized from these fields: a corrupt
// "num_hidden_layers": 2147483647 must be one clear error, not std::bad_alloc after seconds.
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxWidth = int64_t(1) << 20;  // hidden, intermediate and expert widths
constexpr int64_t kMaxVocab = int64_t(1) << 24;  // token ids are int32
constexpr int64_t kMaxHeads = 1024;              // attention / KV heads
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxExperts = 65536;
constexpr int64_t kMaxPositions = int64_t(1) << 30;  // positions are int32 in the kernels

void check_bound(int64_t v, int64_t max, const std::string& label, const char* key) {
  CPI_CHECK(v <= max, label, ": ", key, " = ", v, " exceeds cpinfer's limit of ", max,
            " (a corrupt config.json? no supported model comes near it)");
}

int to_int(int64_t v, const std::string& label, const char* key) {
  CPI_CHECK(v >= INT32_MIN && v <= INT32_MAX, label, ": field '", key, "' = ", v, " is out of range");
  return static_cast<int>(v);
}

void parse_rope(const Fields& top, ModelConfig& cfg) {
  const std::string& label = top.label();
  // transformers 5 standardization: `rope_scaling` (legacy) wins over `rope_parameters`, the
  // top-level `rope_theta` fills in a missing theta, and yarn's original length defaults to
  // max_position_embeddings (a top-level original_max_position_embeddings takes priority).
  const json* dict = top.find("rope_scaling");
  const char* dict_name = "rope_scaling";
  if (dict == nullptr || (dict->is_object() && dict->empty())) {
    dict = top.find("rope_parameters");
    dict_name = "rope_parameters";
  }
  json empty = json::object();
  if (dict == nullptr) dict = &empty;
  CPI_CHECK(dict->is_object(), label, ": field '", dict_name, "' must be an object, got ", json_brief(*dict));
  // Per-layer-type dicts (keys are layer types): Qwen3 attention is all full attention.
  if (dict->contains("full_attention") && (*dict)["full_attention"].is_object()) {
    dict = &(*dict)["full_attention"];
    dict_name = "rope_parameters.full_attention";
  }
  Fields rope(*dict, label, std::string(dict_name) + ".");
  RopeConfig& r = cfg.rope;
  r.type = rope.string("rope_type", rope.string("type", "default"));
  r.theta = rope.has("rope_theta") ? rope.number("rope_theta") : top.number("rope_theta", 10000.0);
  CPI_CHECK(r.theta > 1.0 && std::isfinite(r.theta), label, ": rope_theta must be > 1, got ", r.theta);
  double partial = rope.has("partial_rotary_factor") ? rope.number("partial_rotary_factor")
                                                     : top.number("partial_rotary_factor", 1.0);
  CPI_CHECK(partial == 1.0, label, ": partial_rotary_factor ", partial,
            " is not supported (Qwen3 rotates the whole head)");

  if (r.type == "default") return;
  if (r.type == "linear") {
    r.factor = rope.number("factor");
    CPI_CHECK(r.factor > 0 && std::isfinite(r.factor), label, ": ", dict_name, ".factor must be positive, got ",
              r.factor);
    return;
  }
  if (r.type == "llama3") {
    r.factor = rope.number("factor");
    r.low_freq_factor = rope.number("low_freq_factor");
    r.high_freq_factor = rope.number("high_freq_factor");
    r.original_max_position_embeddings = rope.integer("original_max_position_embeddings");
    CPI_CHECK(r.factor > 0 && std::isfinite(r.factor), label, ": ", dict_name, ".factor must be positive, got ",
              r.factor);
    CPI_CHECK(r.low_freq_factor > 0 && r.high_freq_factor > r.low_freq_factor && std::isfinite(r.high_freq_factor),
              label, ": ", dict_name, ": need 0 < low_freq_factor < high_freq_factor, got ", r.low_freq_factor, " and ",
              r.high_freq_factor);
    CPI_CHECK(r.original_max_position_embeddings > 0, label, ": ", dict_name,
              ".original_max_position_embeddings must be positive, got ", r.original_max_position_embeddings);
    return;
  }
  CPI_CHECK(r.type == "yarn", label, ": rope type '", r.type, "' in '", dict_name,
            "' is not supported (supported: default, linear, yarn, llama3)");
  if (top.has("original_max_position_embeddings"))
    r.original_max_position_embeddings = top.integer("original_max_position_embeddings");
  else
    r.original_max_position_embeddings = rope.integer("original_max_position_embeddings", cfg.max_position_embeddings);
  CPI_CHECK(r.original_max_position_embeddings > 0, label, ": original_max_position_embeddings must be positive, got ",
            r.original_max_position_embeddings);
  // A null factor means "the ratio of the two lengths" (DeepSeek-V3 style).
  r.factor = rope.has("factor") ? rope.number("factor")
                                : static_cast<double>(cfg.max_position_embeddings) /
                                      static_cast<double>(r.original_max_position_embeddings);
  CPI_CHECK(r.factor > 0 && std::isfinite(r.factor), label, ": ", dict_name, ".factor must be positive, got ",
            r.factor);
  r.attention_factor = rope.opt_number("attention_factor");
  // transformers uses `get("beta_fast") or 32`: 0 and null both mean the default.
  double bf = rope.number("beta_fast", 0.0), bs = rope.number("beta_slow", 0.0);
  r.beta_fast = bf != 0.0 ? bf : 32.0;
  r.beta_slow = bs != 0.0 ? bs : 1.0;
  r.truncate = rope.boolean("truncate", true);
  r.mscale = rope.opt_number("mscale");
  r.mscale_all_dim = rope.opt_number("mscale_all_dim");
}

}  // namespace

ModelConfig parse_config(const std::string& text, const std::string& label) {
  json root = parse_json_unique_keys(text, label);
  CPI_CHECK(root.is_object(), label, ": top level must be a JSON object, got ", json_brief(root));
  Fields f(root, label);
  ModelConfig c;

  c.model_type = f.string("model_type", "");
  if (const json* a = f.find("architectures")) {
    CPI_CHECK(a->is_array() && !a->empty() && (*a)[0].is_string(), label,
              ": field 'architectures' must be a non-empty list of strings, got ", json_brief(*a));
    c.architecture = (*a)[0].get<std::string>();
  } else if (c.model_type == "qwen3_moe") {
    c.architecture = "Qwen3MoeForCausalLM";
  } else if (c.model_type == "qwen3") {
    c.architecture = "Qwen3ForCausalLM";
  } else if (c.model_type == "llama") {
    c.architecture = "LlamaForCausalLM";
  } else {
    CPI_FAIL(label, ": required field 'architectures' is missing (and model_type '", c.model_type,
             "' does not name a supported model)");
  }
  const bool moe = c.architecture == "Qwen3MoeForCausalLM";
  const bool llama = c.architecture == "LlamaForCausalLM";
  CPI_CHECK(moe || llama || c.architecture == "Qwen3ForCausalLM", label, ": architecture '", c.architecture,
            "' is not supported (cpinfer runs Qwen3MoeForCausalLM, Qwen3ForCausalLM and LlamaForCausalLM)");
  if (llama) {
    // The decoder has no bias terms and SwiGLU MLPs (what Llama 3 checkpoints use).
    CPI_CHECK(!f.boolean("attention_bias", false), label, ": attention_bias true is not supported");
    CPI_CHECK(!f.boolean("mlp_bias", false), label, ": mlp_bias true is not supported");
    const std::string act = f.string("hidden_act", "silu");
    CPI_CHECK(act == "silu", label, ": hidden_act '", act, "' is not supported (silu)");
  }

  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.num_hidden_layers = to_int(f.integer("num_hidden_layers"), label, "num_hidden_layers");
  c.num_attention_heads = to_int(f.integer("num_attention_heads"), label, "num_attention_heads");
  c.num_key_value_heads = to_int(f.integer("num_key_value_heads", c.num_attention_heads), label, "num_key_value_heads");
  c.max_position_embeddings = f.integer("max_position_embeddings");
  c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.intermediate_size = f.integer("intermediate_size", 0);

  CPI_CHECK(c.vocab_size > 0, label, ": vocab_size must be positive, got ", c.vocab_size);
  CPI_CHECK(c.hidden_size > 0, label, ": hidden_size must be positive, got ", c.hidden_size);
  CPI_CHECK(c.num_hidden_layers > 0, label, ": num_hidden_layers must be positive, got ", c.num_hidden_layers);
  CPI_CHECK(c.num_attention_heads > 0, label, ": num_attention_heads must be positive, got ", c.num_attention_heads);
  CPI_CHECK(c.num_key_value_heads > 0, label, ": num_key_value_heads must be positive, got ", c.num_key_value_heads);
  CPI_CHECK(c.num_attention_heads % c.num_key_value_heads == 0, label, ": num_attention_heads (", c.num_attention_heads,
            ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")");
  CPI_CHECK(c.max_position_embeddings > 0, label, ": max_position_embeddings must be positive, got ",
            c.max_position_embeddings);
  CPI_CHECK(c.rms_norm_eps > 0 && std::isfinite(c.rms_norm_eps), label, ": rms_norm_eps must be positive, got ",
            c.rms_norm_eps);
  CPI_CHECK(c.intermediate_size >= 0, label, ": intermediate_size must be positive, got ", c.intermediate_size);
  CPI_CHECK(static_cast<float>(c.rms_norm_eps) > 0, label, ": rms_norm_eps ", c.rms_norm_eps,
            " is 0 as a 32-bit float");
  check_bound(c.vocab_size, kMaxVocab, label, "vocab_size");
  check_bound(c.hidden_size, kMaxWidth, label, "hidden_size");
  check_bound(c.intermediate_size, kMaxWidth, label, "intermediate_size");
  check_bound(c.num_hidden_layers, kMaxLayers, label, "num_hidden_layers");
  check_bound(c.num_attention_heads, kMaxHeads, label, "num_attention_heads");
  check_bound(c.num_key_value_heads, kMaxHeads, label, "num_key_value_heads");
  check_bound(c.max_position_embeddings, kMaxPositions, label, "max_position_embeddings");

  // head_dim comes from the file (Qwen3-30B-A3B: 128, not hidden/heads = 64).
  if (f.has("head_dim")) {
    c.head_dim = to_int(f.integer("head_dim"), label, "head_dim");
  } else {
    CPI_CHECK(c.hidden_size % c.num_attention_heads == 0, label, ": head_dim is absent and hidden_size (",
              c.hidden_size, ") is not a multiple of num_attention_heads (", c.num_attention_heads, ")");
    c.head_dim = static_cast<int>(c.hidden_size / c.num_attention_heads);
  }
  check_bound(c.head_dim, kMaxHeadDim, label, "head_dim");
  CPI_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, label, ": head_dim must be positive and even (RoPE pairs), got ",
            c.head_dim);

  if (moe) {
    const bool v4 = f.has("num_experts"), v5 = f.has("num_local_experts");
    CPI_CHECK(v4 || v5, label, ": required field 'num_experts' (or 'num_local_experts') is missing");
    int64_t e4 = v4 ? f.integer("num_experts") : 0, e5 = v5 ? f.integer("num_local_experts") : 0;
    CPI_CHECK(!(v4 && v5) || e4 == e5, label, ": num_experts (", e4, ") and num_local_experts (", e5, ") disagree");
    c.num_experts = to_int(v5 ? e5 : e4, label, "num_experts");
    c.num_experts_per_tok = to_int(f.integer("num_experts_per_tok"), label, "num_experts_per_tok");
    c.moe_intermediate_size = f.integer("moe_intermediate_size");
    c.decoder_sparse_step = to_int(f.integer("decoder_sparse_step", 1), label, "decoder_sparse_step");
    c.norm_topk_prob = f.boolean("norm_topk_prob", false);
    if (const json* m = f.find("mlp_only_layers")) {
      CPI_CHECK(m->is_array(), label, ": field 'mlp_only_layers' must be a list of layer indices, got ",
                json_brief(*m));
      for (const json& x : *m) {
        CPI_CHECK(x.is_number_integer(), label, ": field 'mlp_only_layers' must hold integers, got ", json_brief(x));
        int64_t l = x.get<int64_t>();
        CPI_CHECK(l >= 0 && l < c.num_hidden_layers, label, ": mlp_only_layers entry ", l, " is not a layer (0..",
                  c.num_hidden_layers - 1, ")");
        c.mlp_only_layers.push_back(static_cast<int>(l));
      }
    }
    CPI_CHECK(c.num_experts > 0, label, ": num_experts must be positive, got ", c.num_experts);
    check_bound(c.num_experts, kMaxExperts, label, "num_experts");
    check_bound(c.moe_intermediate_size, kMaxWidth, label, "moe_intermediate_size");
    CPI_CHECK(c.num_experts_per_tok > 0 && c.num_experts_per_tok <= c.num_experts, label, ": num_experts_per_tok (",
              c.num_experts_per_tok, ") must be between 1 and num_experts (", c.num_experts, ")");
    CPI_CHECK(c.moe_intermediate_size > 0, label, ": moe_intermediate_size must be positive, got ",
              c.moe_intermediate_size);
    CPI_CHECK(c.decoder_sparse_step >= 1, label, ": decoder_sparse_step must be >= 1, got ", c.decoder_sparse_step);
  }
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    if (!c.is_moe_layer(l)) {
      CPI_CHECK(c.intermediate_size > 0, label, ": layer ", l,
                " is a dense MLP layer but 'intermediate_size' is missing or not positive");
      break;
    }
  }

  if (f.has("torch_dtype"))
    c.dtype = f.string("torch_dtype", "");
  else
    c.dtype = f.string("dtype", "");
  std::vector<int64_t> bos = f.int_list("bos_token_id");
  if (!bos.empty()) c.bos_token_id = static_cast<int32_t>(bos[0]);
  for (int64_t id : f.int_list("eos_token_id")) {
    CPI_CHECK(id >= 0 && id < c.vocab_size, label, ": eos_token_id ", id, " is outside the vocabulary (", c.vocab_size,
              ")");
    c.eos_token_ids.push_back(static_cast<int32_t>(id));
  }

  parse_rope(f, c);
  c.quant = parse_quantization_config(root, label);
  return c;
}

ModelConfig load_config(const std::string& dir) {
  std::error_code ec;
  CPI_CHECK(fs::is_directory(dir, ec), "model directory '", dir, "' does not exist or is not a directory");
  const std::string path = (fs::path(dir) / "config.json").string();
  CPI_CHECK(fs::exists(path, ec), "missing config.json in ", dir, " (expected ", path, ")");
  auto read = [](const std::string& p) { return read_regular_file(p, kMaxConfigBytes); };
  ModelConfig c = parse_config(read(path), path);

  // generation_config.json: its eos ids are what generation stops on; config.json's are kept too.
  const std::string gen_path = (fs::path(dir) / "generation_config.json").string();
  if (fs::exists(gen_path, ec)) {
    json g = parse_json_unique_keys(read(gen_path), gen_path);
    CPI_CHECK(g.is_object(), gen_path, ": top level must be a JSON object");
    Fields gf(g, gen_path);
    std::vector<int32_t> eos;
    for (int64_t id : gf.int_list("eos_token_id")) {
      CPI_CHECK(id >= 0 && id < c.vocab_size, gen_path, ": eos_token_id ", id, " is outside the vocabulary (",
                c.vocab_size, ")");
      eos.push_back(static_cast<int32_t>(id));
    }
    for (int32_t id : c.eos_token_ids)
      if (std::find(eos.begin(), eos.end(), id) == eos.end()) eos.push_back(id);
    c.eos_token_ids = std::move(eos);
    std::vector<int64_t> bos = gf.int_list("bos_token_id");
    if (c.bos_token_id < 0 && !bos.empty()) c.bos_token_id = static_cast<int32_t>(bos[0]);
  }
  return c;
}

bool ModelConfig::is_moe_layer(int layer) const {
  if (num_experts <= 0 || decoder_sparse_step <= 0) return false;
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), layer) != mlp_only_layers.end()) return false;
  return (layer + 1) % decoder_sparse_step == 0;
}

// Mirrors transformers 5 modeling_rope_utils (_compute_default_rope_parameters,
// _compute_linear_scaling_rope_parameters, _compute_yarn_parameters). torch does the tensor math
// in float32 one op at a time, so each step below rounds to float in the same order; scalar
// (Python) math stays in double. This file is built with -ffp-contract=off so no FMA merges two
// roundings into one.
RopeParams ModelConfig::rope_params() const {
  const int dim = head_dim;  // partial_rotary_factor is 1 (checked while parsing)
  const int half = dim / 2;
  // pos_freqs[i] = base ** (float(2i) / dim), pow evaluated in float32 by torch; double pow
  // rounded once to float is the correctly rounded float result.
  std::vector<float> pos_freqs(half);
  const float base_f = static_cast<float>(rope.theta);
  for (int i = 0; i < half; ++i) {
    float expo = static_cast<float>(2 * i) / static_cast<float>(dim);
    pos_freqs[i] = static_cast<float>(std::pow(static_cast<double>(base_f), static_cast<double>(expo)));
  }
  RopeParams p;
  p.inv_freq.resize(half);
  if (rope.type == "default" || rope.type == "linear") {
    for (int i = 0; i < half; ++i) p.inv_freq[i] = 1.0f / pos_freqs[i];
    if (rope.type == "linear") {
      const float factor_f = static_cast<float>(rope.factor);
      for (float& x : p.inv_freq) x /= factor_f;
    }
    p.attention_factor = 1.0f;
    return p;
  }
  if (rope.type == "llama3") {
    // transformers _compute_llama3_parameters over the default inv_freq, float32 tensor ops with
    // Python scalars rounded to float: `2 * pi / inv_freq` is reciprocal(inv_freq) * float(2 pi).
    const float factor = static_cast<float>(rope.factor);
    const double old_len = static_cast<double>(rope.original_max_position_embeddings);
    const float low_wavelen = static_cast<float>(old_len / rope.low_freq_factor);
    const float high_wavelen = static_cast<float>(old_len / rope.high_freq_factor);
    const float two_pi = static_cast<float>(2.0 * std::numbers::pi);
    const float width = static_cast<float>(rope.high_freq_factor - rope.low_freq_factor);
    for (int i = 0; i < half; ++i) {
      const float inv = 1.0f / pos_freqs[i];
      const float wavelen = (1.0f / inv) * two_pi;
      const float llama = wavelen > low_wavelen ? inv / factor : inv;
      const float smooth =
          ((1.0f / wavelen) * static_cast<float>(old_len) - static_cast<float>(rope.low_freq_factor)) / width;
      const float smoothed = (1.0f - smooth) * llama / factor + smooth * llama;
      const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      p.inv_freq[i] = medium ? smoothed : llama;
    }
    p.attention_factor = 1.0f;
    return p;
  }
  CPI_CHECK(rope.type == "yarn", "rope type '", rope.type, "' is not supported (default, linear, yarn, llama3)");

  const double factor = rope.factor;
  auto get_mscale = [](double scale, double m) { return scale <= 1.0 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
  double attention_factor;
  if (rope.attention_factor) {
    attention_factor = *rope.attention_factor;
  } else if (rope.mscale.value_or(0.0) != 0.0 && rope.mscale_all_dim.value_or(0.0) != 0.0) {
    attention_factor = get_mscale(factor, *rope.mscale) / get_mscale(factor, *rope.mscale_all_dim);
  } else {
    attention_factor = get_mscale(factor, 1.0);
  }

  const double orig = static_cast<double>(rope.original_max_position_embeddings);
  auto correction_dim = [&](double num_rotations) {
    return (dim * std::log(orig / (num_rotations * 2.0 * std::numbers::pi))) / (2.0 * std::log(rope.theta));
  };
  double low = correction_dim(rope.beta_fast);
  double high = correction_dim(rope.beta_slow);
  if (rope.truncate) {
    low = std::floor(low);
    high = std::ceil(high);
  }
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp

  const float low_f = static_cast<float>(low);
  const float width_f = static_cast<float>(high - low);
  const float factor_f = static_cast<float>(factor);
  for (int i = 0; i < half; ++i) {
    float ramp = (static_cast<float>(i) - low_f) / width_f;
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float extrapolation_factor = 1.0f - ramp;
    const float inv_extra = 1.0f / pos_freqs[i];
    const float inv_inter = 1.0f / (factor_f * pos_freqs[i]);
    const float a = inv_inter * (1.0f - extrapolation_factor);
    const float b = inv_extra * extrapolation_factor;
    p.inv_freq[i] = a + b;
  }
  p.attention_factor = static_cast<float>(attention_factor);
  return p;
}

}  // namespace cpinfer
