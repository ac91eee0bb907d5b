// cpinfer serve: placeholder until the server lands.
#include "common.h"

namespace cpinfer {

Command add_serve_command(CLI::App& app) {
  CLI::App* c = app.add_subcommand("serve", "OpenAI-compatible HTTP server");
  return {c, [] {
            CPI_FAIL("serve is not built yet");
            return 1;
          }};
}

}  // namespace cpinfer
