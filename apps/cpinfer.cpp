// cpinfer: context-parallel inference for Qwen3-MoE. Subcommands: generate, logits, demo-model, bench.
#include <cstdio>
#include <exception>

#include "common.h"
#include "core/log.h"

int main(int argc, char** argv) {
  using namespace cpinfer;
  CLI::App app{"cpinfer: long-context Qwen3-MoE inference with context-parallel prefill over CPU ranks or GPUs"};
  app.require_subcommand(1);
  // Flag errors are one line, like every other cpinfer error.
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    return std::string("cpinfer: error: ") + e.what() + " (see --help)\n";
  });
  app.set_version_flag("--version", "cpinfer 0.1.0");
  bool verbose = false, quiet = false;
  app.add_flag("-v,--verbose", verbose, "Debug logging");
  app.add_flag("-q,--quiet", quiet, "Only warnings and errors on stderr");
  std::vector<Command> commands = {add_generate_command(app), add_logits_command(app), add_demo_model_command(app),
                                   add_bench_command(app)};
#ifdef CPINFER_HAVE_SERVER
  commands.push_back(add_serve_command(app));
#endif
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (verbose) set_log_level(LogLevel::Debug);
  if (quiet) set_log_level(LogLevel::Warn);
  for (const Command& c : commands) {
    if (!c.app->parsed()) continue;
    try {
      return c.run();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "cpinfer %s: error: %s\n", c.app->get_name().c_str(), e.what());
      return 1;
    }
  }
  return 1;
}
