// config.json parsing (both dialects), validation errors, MoE layer selection and RoPE parameters.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include <nlohmann/json.hpp>

#include "loader/config.h"
#include "loader_test_util.h"

namespace cpinfer {
namespace {

using test::TempDir;
using test::write_text;

// Qwen3-30B-A3B's config.json as published on the hub (transformers 4.51 dialect).
const char* kQwen3MoeHub = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
  "moe_intermediate_size": 768, "norm_topk_prob": true, "num_attention_heads": 32, "num_experts": 128,
  "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": false,
  "rms_norm_eps": 1e-06, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
  "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": null, "tie_word_embeddings": false,
  "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": true, "use_sliding_window": false,
  "vocab_size": 151936
})";

// The same model as transformers 5 saves it.
const char* kQwen3MoeV5 = R"({
  "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "bos_token_id": 151643, "decoder_sparse_step": 1, "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": 128,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
  "max_position_embeddings": 40960, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
  "norm_topk_prob": true, "num_attention_heads": 32, "num_local_experts": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
  "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 32768},
  "tie_word_embeddings": false, "transformers_version": "5.0.0", "vocab_size": 151936
})";

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.num_experts, b.num_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.decoder_sparse_step, b.decoder_sparse_step);
  EXPECT_EQ(a.mlp_only_layers, b.mlp_only_layers);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.dtype, b.dtype);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.rope.type, b.rope.type);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.factor, b.rope.factor);
  EXPECT_EQ(a.rope.original_max_position_embeddings, b.rope.original_max_position_embeddings);
  EXPECT_EQ(a.rope.attention_factor, b.rope.attention_factor);
  EXPECT_EQ(a.rope.beta_fast, b.rope.beta_fast);
  EXPECT_EQ(a.rope.beta_slow, b.rope.beta_slow);
  EXPECT_EQ(a.rope.truncate, b.rope.truncate);
  RopeParams ra = a.rope_params(), rb = b.rope_params();
  EXPECT_EQ(ra.inv_freq, rb.inv_freq);
  EXPECT_EQ(ra.attention_factor, rb.attention_factor);
}

TEST(Config, Qwen3MoeHubConfig) {
  ModelConfig c = parse_config(kQwen3MoeHub, "config.json");
  EXPECT_EQ(c.architecture, "Qwen3MoeForCausalLM");
  EXPECT_EQ(c.head_dim, 128);  // from the file, not hidden/heads = 64
  EXPECT_EQ(c.num_experts, 128);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, std::vector<int32_t>{151645});
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_EQ(c.rope.theta, 1e6);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 32768);
  for (int l = 0; l < 48; ++l) EXPECT_TRUE(c.is_moe_layer(l)) << l;
  RopeParams r = c.rope_params();
  ASSERT_EQ(r.inv_freq.size(), 64u);
  EXPECT_NEAR(r.attention_factor, 0.1 * std::log(4.0) + 1.0, 1e-7);  // 1.1386
  EXPECT_EQ(r.inv_freq[0], 1.0f);
}

TEST(Config, BothDialectsParseToTheSameConfig) {
  expect_same(parse_config(kQwen3MoeHub, "hub/config.json"), parse_config(kQwen3MoeV5, "v5/config.json"));
  // Plain (unscaled) RoPE in both spellings.
  std::string hub = kQwen3MoeHub, v5 = kQwen3MoeV5;
  const std::string hub_yarn = R"({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})";
  hub.replace(hub.find(hub_yarn), hub_yarn.size(), "null");
  v5.replace(v5.find(R"("rope_type": "yarn")"),
             std::string(R"("rope_type": "yarn", "factor": 4.0,
                      "original_max_position_embeddings": 32768)")
                 .size(),
             R"("rope_type": "default")");
  ModelConfig a = parse_config(hub, "hub"), b = parse_config(v5, "v5");
  EXPECT_EQ(a.rope.type, "default");
  expect_same(a, b);
}

TEST(Config, DefaultsWhenOptionalFieldsAreAbsent) {
  ModelConfig c = parse_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "max_position_embeddings": 1024})",
                               "config.json");
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_TRUE(c.eos_token_ids.empty());
}

TEST(Config, DenseQwen3) {
  ModelConfig c = parse_config(R"({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "max_position_embeddings": 1024, "rope_theta": 1000000, "tie_word_embeddings": true,
    "eos_token_id": [5, 7]})",
                               "config.json");
  EXPECT_EQ(c.num_experts, 0);
  EXPECT_FALSE(c.is_moe_layer(0));
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{5, 7}));
  EXPECT_EQ(c.rope.theta, 1e6);
}

TEST(Config, IsMoeLayerFollowsSparseStepAndMlpOnlyLayers) {
  ModelConfig c = parse_config(R"({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "num_experts": 8,
    "num_experts_per_tok": 2, "moe_intermediate_size": 32, "max_position_embeddings": 1024,
    "decoder_sparse_step": 2, "mlp_only_layers": [3]})",
                               "config.json");
  std::vector<bool> moe;
  for (int l = 0; l < 6; ++l) moe.push_back(c.is_moe_layer(l));
  // (l+1) % 2 == 0 -> layers 1, 3, 5; layer 3 is forced dense.
  EXPECT_EQ(moe, (std::vector<bool>{false, true, false, false, false, true}));
}

TEST(Config, GenerationConfigEosComesFirstAndExtends) {
  TempDir dir;
  write_text(dir.file("config.json"), test::tiny_config_json());
  write_text(dir.file("generation_config.json"), R"({"bos_token_id": 1, "eos_token_id": [3, 2], "do_sample": true})");
  ModelConfig c = load_config(dir.path());
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{3, 2}));
  write_text(dir.file("generation_config.json"), R"({"eos_token_id": 4})");
  EXPECT_EQ(load_config(dir.path()).eos_token_ids, (std::vector<int32_t>{4, 2}));
}

// ---- RoPE values. The expected numbers come from tests/loader/rope_reference.py, which
// evaluates the transformers 5 formulas by hand (pure Python, float32 rounding after each tensor
// op like torch) and, on the GPU machine, checks them against transformers itself.
// Config: head_dim 16 (8 frequencies), max_position_embeddings 8192.

ModelConfig rope_config(const std::string& rope_json, bool v5 = false) {
  return parse_config(std::string(R"({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100,
    "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16, "num_experts": 4,
    "num_experts_per_tok": 2, "moe_intermediate_size": 8, "max_position_embeddings": 8192, )") +
                          (v5 ? "\"rope_parameters\": " : "\"rope_theta\": 10000.0, \"rope_scaling\": ") + rope_json +
                          "}",
                      "config.json");
}

void expect_inv_freq(const RopeParams& r, const std::vector<float>& want) {
  ASSERT_EQ(r.inv_freq.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_NEAR(r.inv_freq[i], want[i], 1e-7 * std::abs(want[i])) << "inv_freq[" << i << "]";
}

TEST(Rope, DefaultAndLinear) {
  // inv_freq[i] = 1 / 10000^(2i/16); linear divides by factor 2.
  expect_inv_freq(rope_config("null").rope_params(),
                  {1.000000000e+00f, 3.162277639e-01f, 1.000000015e-01f, 3.162277862e-02f, 9.999999776e-03f,
                   3.162277862e-03f, 1.000000047e-03f, 3.162277862e-04f});
  RopeParams lin = rope_config(R"({"rope_type": "linear", "factor": 2.0})").rope_params();
  expect_inv_freq(lin, {5.000000000e-01f, 1.581138819e-01f, 5.000000075e-02f, 1.581138931e-02f, 4.999999888e-03f,
                        1.581138931e-03f, 5.000000237e-04f, 1.581138931e-04f});
  EXPECT_EQ(lin.attention_factor, 1.0f);
}

TEST(Rope, YarnMatchesHandComputedValues) {
  // theta 1e4, factor 4, original 2048: correction dims (16 ln(2048/(2π·32)))/(2 ln 1e4) = 2.016 ->
  // floor 2 and (16 ln(2048/2π))/(2 ln 1e4) = 5.026 -> ceil 6; the ramp (i-2)/4 keeps i <= 2 at
  // the original frequency, i >= 6 at frequency/4, blends 3..5; attention_factor = 0.1 ln 4 + 1.
  const std::vector<float> want = {1.000000000e+00f, 3.162277639e-01f, 1.000000015e-01f, 2.569350600e-02f,
                                   6.249999627e-03f, 1.383496565e-03f, 2.500000119e-04f, 7.905694656e-05f};
  for (bool v5 : {false, true}) {
    ModelConfig c = v5 ? rope_config(
                             R"({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 2048})",
                             true)
                       : rope_config(R"({"type": "yarn", "factor": 4, "original_max_position_embeddings": 2048})");
    RopeParams r = c.rope_params();
    expect_inv_freq(r, want);
    EXPECT_FLOAT_EQ(r.attention_factor, 1.138629436111989f);
  }
}

TEST(Rope, YarnWithoutTruncateAndWithMscale) {
  // theta 1e6, factor 8, original 4096, beta_fast 16, truncate false (fractional ramp bounds),
  // attention_factor = (0.1·1·ln 8 + 1) / (0.1·0.5·ln 8 + 1).
  RopeParams r = rope_config(R"({"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
      "original_max_position_embeddings": 4096, "beta_fast": 16, "truncate": false, "mscale": 1.0,
      "mscale_all_dim": 0.5})",
                             true)
                     .rope_params();
  expect_inv_freq(r, {1.000000000e+00f, 1.778279394e-01f, 3.162277862e-02f, 3.008378437e-03f, 1.250000059e-04f,
                      2.222849253e-05f, 3.952846782e-06f, 7.029266840e-07f});
  EXPECT_FLOAT_EQ(r.attention_factor, 1.094179988101349f);
}

TEST(Rope, YarnExplicitAttentionFactorAndDefaultOriginalLength) {
  ModelConfig c = rope_config(R"({"rope_type": "yarn", "factor": 2.0, "attention_factor": 0.75})");
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);  // max_position_embeddings
  EXPECT_EQ(c.rope_params().attention_factor, 0.75f);
}

// config.json exactly as transformers 5.17 save_pretrained wrote it (tests/loader/make_hf_tiny.py),
// with the inv_freq / attention_scaling its Qwen3MoeRotaryEmbedding computed.
TEST(Config, TransformersV5SavedConfigFixture) {
  const std::string dir = std::string(CPINFER_SOURCE_DIR) + "/tests/loader/fixtures/hf_tiny_v5";
  ModelConfig c = load_config(dir);
  EXPECT_EQ(c.num_experts, 4);  // num_local_experts
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.mlp_only_layers, std::vector<int>{1});
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_EQ(c.bos_token_id, -1);  // null in the file
  EXPECT_EQ(c.rope.type, "yarn");
  EXPECT_EQ(c.rope.original_max_position_embeddings, 2048);
  std::ifstream in(dir + "/expected_rope.json");
  nlohmann::json want = nlohmann::json::parse(in);
  RopeParams r = c.rope_params();
  EXPECT_EQ(r.inv_freq, want["inv_freq"].get<std::vector<float>>());  // bitwise
  EXPECT_FLOAT_EQ(r.attention_factor, want["attention_scaling"].get<float>());
}

// ---- errors: each names config.json and the field.

TEST(ConfigErrors, MissingDirectoryAndFile) {
  EXPECT_ERROR_HAS(load_config("/nonexistent/cpinfer-model"), "'/nonexistent/cpinfer-model'", "does not exist");
  TempDir dir;
  EXPECT_ERROR_HAS(load_config(dir.path()), "missing config.json", dir.path());
}

TEST(ConfigErrors, NotJson) {
  TempDir dir;
  write_text(dir.file("config.json"), "{\"vocab_size\": 12,");
  EXPECT_ERROR_HAS(load_config(dir.path()), dir.file("config.json"), "not valid JSON");
  write_text(dir.file("config.json"), "[1, 2]");
  EXPECT_ERROR_HAS(load_config(dir.path()), "config.json", "must be a JSON object");
}

TEST(ConfigErrors, BadGenerationConfig) {
  TempDir dir;
  write_text(dir.file("config.json"), test::tiny_config_json());
  write_text(dir.file("generation_config.json"), "{oops");
  EXPECT_ERROR_HAS(load_config(dir.path()), "generation_config.json", "not valid JSON");
}

std::string tiny_with(const std::string& from, const std::string& to) {
  std::string s = test::tiny_config_json();
  size_t at = s.find(from);
  EXPECT_NE(at, std::string::npos) << from;
  return s.replace(at, from.size(), to);
}

TEST(ConfigErrors, UnknownArchitecture) {
  EXPECT_ERROR_HAS(parse_config(tiny_with("Qwen3MoeForCausalLM", "MistralForCausalLM"), "m/config.json"),
                   "m/config.json", "architecture 'MistralForCausalLM' is not supported");
}

TEST(ConfigErrors, MissingRequiredField) {
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"hidden_size\"", "\"hidden_sizes\""), "m/config.json"), "m/config.json",
                   "'hidden_size' is missing");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"num_experts\"", "\"n_experts\""), "m/config.json"), "'num_experts'",
                   "missing");
}

TEST(ConfigErrors, WrongFieldType) {
  EXPECT_ERROR_HAS(
      parse_config(tiny_with("\"num_attention_heads\": 4", "\"num_attention_heads\": \"4\""), "m/config.json"),
      "m/config.json", "'num_attention_heads' must be an integer", "\"4\"");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"norm_topk_prob\": true", "\"norm_topk_prob\": 1"), "m/config.json"),
                   "'norm_topk_prob' must be true or false");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"rms_norm_eps\": 1e-6", "\"rms_norm_eps\": \"small\""), "m/config.json"),
                   "'rms_norm_eps' must be a number");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"head_dim\": 8", "\"head_dim\": 8.5"), "m/config.json"),
                   "'head_dim' must be an integer");
}

TEST(ConfigErrors, InvalidValues) {
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"), "c.json"),
                   "c.json", "num_attention_heads (4) must be a multiple of num_key_value_heads (3)");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 5"), "c.json"),
                   "num_experts_per_tok (5) must be between 1 and num_experts (4)");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"hidden_size\": 16", "\"hidden_size\": -16"), "c.json"),
                   "hidden_size must be positive");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"mlp_only_layers\": [1]", "\"mlp_only_layers\": [7]"), "c.json"),
                   "mlp_only_layers entry 7");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"intermediate_size\": 12", "\"intermediate_size\": 0"), "c.json"),
                   "layer 1 is a dense MLP layer", "intermediate_size");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"rope_scaling\": null",
                                          "\"rope_scaling\": {\"rope_type\": \"dynamic\", "
                                          "\"factor\": 2.0}"),
                                "c.json"),
                   "c.json", "rope type 'dynamic'", "not supported");
  EXPECT_ERROR_HAS(parse_config(tiny_with("\"eos_token_id\": 2", "\"eos_token_id\": 999"), "c.json"),
                   "eos_token_id 999");
  EXPECT_ERROR_HAS(
      parse_config(tiny_with("\"num_experts\": 4", "\"num_experts\": 4, \"num_local_experts\": 8"), "c.json"),
      "disagree");
}

}  // namespace
}  // namespace cpinfer
