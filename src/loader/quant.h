// Quantized checkpoints. One format so far: fine-grained FP8, as Qwen publishes Qwen3-*-FP8 (and
// DeepSeek-V3 its weights): config.json carries
//   "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
//                           "weight_block_size": [128, 128], "modules_to_not_convert": [...]}
// and each quantized linear weight W [N, K] is stored as `X.weight` in float8 e4m3 with
// `X.weight_scale_inv` [ceil(N / bn), ceil(K / bk)] (F32 or BF16, whatever the file says): the
// weight is W[n, k] = fp8(X.weight[n, k]) · scale_inv[n / bn, k / bk]. Norms, embeddings, the
// router and the LM head stay BF16.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/dtype.h"

namespace cpinfer {

struct TensorInfo;

struct QuantConfig {
  bool fp8 = false;     // fine-grained FP8 weights
  int64_t block_n = 0;  // weight_block_size: rows and columns of W per scale
  int64_t block_k = 0;
  std::vector<std::string> not_converted;  // modules_to_not_convert, as the file lists them
};

// Reads config.json's "quantization_config" (absent or null: no quantization). Refuses with an
// error naming `label` what cpinfer cannot run: other methods (awq, gptq, ...), other FP8 formats
// (e5m2), static activation scales, per-tensor scales (no weight_block_size), block sizes other
// than 128 x 128 (the FP8 GEMMs' tile).
QuantConfig parse_quantization_config(const nlohmann::json& root, const std::string& label);

// The block scales `scale_inv` (F32 or BF16) of FP8 weight `w` as fp32 (BF16 widens exactly),
// [ceil(N / bn), ceil(K / bk)] row-major. Checks as dequantize_fp8_rows does.
std::vector<float> fp8_scales_f32(const TensorInfo& w, const TensorInfo& scale_inv, const QuantConfig& q);

// The published quantization rule (Qwen3-*-FP8, DeepSeek-V3): per block_n x block_k block of
// W [N, K] (fp32), scale = amax / 448 (1 for an all-zero block) and codes = e4m3(W / scale)
// (nearest, ties to even); `codes` [N, K], `scale_inv` [ceil(N / block_n), ceil(K / block_k)] = the
// scales. (cpinfer demo-model --fp8; checkpoints come quantized.)
void quantize_fp8(const float* w, int64_t N, int64_t K, int64_t block_n, int64_t block_k, uint8_t* codes,
                  float* scale_inv);

// W rows [row0, row0 + rows) of an FP8 weight `w` [N, K] with its scales `scale_inv`, dequantized
// to `out` (BF16: fp8 · scale in fp32, rounded to nearest even; F32: exact) [rows, K]. Checks the
// dtypes and the scale shape against the block size, naming the tensors on error.
void dequantize_fp8_rows(const TensorInfo& w, const TensorInfo& scale_inv, const QuantConfig& q, int64_t row0,
                         int64_t rows, DType out_dtype, void* out);

}  // namespace cpinfer
