#include "model/registry.h"

#include "core/check.h"
#include "model/qwen3.h"

namespace cpinfer {

namespace {

ModelFamily decoder_family(std::string arch, DecoderSpec spec) {
  ModelFamily f;
  f.architecture = std::move(arch);
  f.weight_map = [spec](const ModelConfig& cfg, ModelWeights& w, ExpertRange share) {
    return decoder_weight_map(cfg, spec, w, share);
  };
  f.make = [](const ModelConfig& cfg, ModelWeights w, Backend& be, ParallelCtx par, const ModelOptions& opt) {
    return std::unique_ptr<CausalLM>(std::make_unique<Qwen3Model>(cfg, std::move(w), be, par, opt));
  };
  return f;
}

// An explicit table rather than self-registering statics: a static library drops object files
// nothing references, and with them their registrations.
const std::vector<ModelFamily>& families() {
  static const std::vector<ModelFamily> all = {
      decoder_family("Qwen3MoeForCausalLM", DecoderSpec{.qk_norm = true, .moe = true}),
      decoder_family("Qwen3ForCausalLM", DecoderSpec{.qk_norm = true, .moe = false}),
  };
  return all;
}

}  // namespace

std::vector<std::string> supported_architectures() {
  std::vector<std::string> names;
  for (const ModelFamily& f : families()) names.push_back(f.architecture);
  return names;
}

const ModelFamily& model_family(const std::string& architecture) {
  for (const ModelFamily& f : families())
    if (f.architecture == architecture) return f;
  std::string known;
  for (const std::string& n : supported_architectures()) known += (known.empty() ? "" : ", ") + n;
  CPI_FAIL("architecture '", architecture, "' is not supported (cpinfer runs ", known, ")");
}

std::unique_ptr<CausalLM> make_model(const ModelConfig& cfg, ModelWeights weights, Backend& backend, ParallelCtx par,
                                     const ModelOptions& opt) {
  return model_family(cfg.architecture).make(cfg, std::move(weights), backend, par, opt);
}

}  // namespace cpinfer
