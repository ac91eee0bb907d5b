#include "model/qwen3.h"

#include "model/decoder.h"

namespace cpinfer {

std::vector<ModelFamily> qwen3_families() {
  return {decoder_family("Qwen3MoeForCausalLM", DecoderSpec{.qk_norm = true, .moe = true}),
          decoder_family("Qwen3ForCausalLM", DecoderSpec{.qk_norm = true, .moe = false})};
}

}  // namespace cpinfer
