#include "model/llama.h"

#include "model/decoder.h"

namespace cpinfer {

ModelFamily llama_family() { return decoder_family("LlamaForCausalLM", DecoderSpec{.qk_norm = false, .moe = false}); }

}  // namespace cpinfer
