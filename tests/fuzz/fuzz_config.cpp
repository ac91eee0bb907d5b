// Fuzzes config.json parsing (parse_config), then what the engine derives from an accepted
// config: rope_params() (inv_freq tables) and is_moe_layer() for every layer.
#include <cstdint>
#include <string>

#include "fuzz_util.h"
#include "loader/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string text(reinterpret_cast<const char*>(data), size);
  cpinfer::fuzz::run_expecting_errors([&] {
    cpinfer::ModelConfig c = cpinfer::parse_config(text, "fuzz/config.json");
    cpinfer::RopeParams p = c.rope_params();
    if (p.inv_freq.size() != static_cast<size_t>(c.head_dim / 2))
      cpinfer::fuzz::report_bug("inv_freq size differs from head_dim/2", "rope_params");
    int moe = 0;
    // The layer count is validated by parse_config; cap the loop so a huge value stays fast.
    for (int l = 0; l < c.num_hidden_layers && l < 100000; ++l) moe += c.is_moe_layer(l) ? 1 : 0;
    (void)moe;
  });
  return 0;
}
