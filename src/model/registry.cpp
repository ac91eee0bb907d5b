#include "model/registry.h"

#include "core/check.h"
#include "model/llama.h"
#include "model/qwen3.h"

namespace cpinfer {

namespace {

// An explicit table rather than self-registering statics: a static library drops object files
// nothing references, and with them their registrations.
const std::vector<ModelFamily>& families() {
  static const std::vector<ModelFamily> all = [] {
    std::vector<ModelFamily> v = qwen3_families();
    v.push_back(llama_family());
    return v;
  }();
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
