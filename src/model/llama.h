// Llama 3 (LlamaForCausalLM): the pre-norm decoder (model/decoder.h) without q/k norm, dense SwiGLU
// MLPs, GQA, no biases, `llama3` RoPE scaling (loader/config.cpp computes its inv_freq).
#pragma once
#include "model/registry.h"

namespace cpinfer {

ModelFamily llama_family();

}  // namespace cpinfer
