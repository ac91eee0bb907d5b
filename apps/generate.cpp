// cpinfer generate / cpinfer logits.
#include <cmath>
#include <cstdio>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>

#include "common.h"
#include "core/log.h"
#include "engine/stop.h"
#include "tokenizer/tokenizer.h"

namespace cpinfer {

namespace {

struct GenerateFlags {
  EngineFlags ef;
  std::string prompt, input_ids, system;
  bool chat = false, json = false, ignore_eos = false, disable_thinking = false;
  int max_new_tokens = 64;
  float temperature = 0.0f, top_p = 1.0f, min_p = 0.0f;
  int top_k = -1;
  int64_t seed = -1;
  std::vector<std::string> stop;
};

int run_generate(GenerateFlags& f) {
  f.ef.check_model_source();
  CPI_CHECK(f.prompt.empty() != f.input_ids.empty(), "give exactly one of --prompt and --input-ids");
  std::unique_ptr<Tokenizer> tok;
  std::vector<int32_t> ids;
  if (!f.prompt.empty()) {
    tok = std::make_unique<Tokenizer>(Tokenizer::from_dir(f.ef.tokenizer_dir()));
    std::string text = f.prompt;
    if (f.chat) {
      std::vector<ChatMessage> msgs;
      if (!f.system.empty()) msgs.push_back({"system", f.system, "", {}});
      msgs.push_back({"user", f.prompt, "", {}});
      text = tok->render_chat(msgs, true, !f.disable_thinking);
    }
    ids = tok->encode(text);
  } else {
    ids = parse_ids(f.input_ids);
    CPI_CHECK(!f.chat, "--chat needs --prompt");
  }
  CPI_CHECK(f.max_new_tokens >= 1, "--max-new-tokens must be >= 1");
  GenerateOptions gen;
  gen.max_new_tokens = f.max_new_tokens;
  gen.ignore_eos = f.ignore_eos;
  gen.sampling.temperature = f.temperature;
  gen.sampling.top_k = f.top_k;
  gen.sampling.top_p = f.top_p;
  gen.sampling.min_p = f.min_p;
  if (f.seed >= 0) gen.sampling.seed = static_cast<uint64_t>(f.seed);
  gen.sampling.validate();
  CPI_CHECK(f.stop.empty() || tok, "--stop needs --prompt (a tokenizer to turn tokens into text)");

  GenerateResult result;
  std::string text;
  std::mutex mu;
  bool is_rank0 = false;  // under mpirun only one process holds rank 0 and prints
  launch(f.ef.launch(), [&](ParallelCtx& par) {
    Engine engine(f.ef.model_path, f.ef.engine(static_cast<int>(ids.size()) + f.max_new_tokens), par);
    std::unique_ptr<StreamDecoder> dec;
    if (tok && engine.rank() == 0) dec = std::make_unique<StreamDecoder>(*tok);
    StopMatcher stops(f.stop);
    auto on_token = [&](int32_t id) {
      if (!dec) return true;
      const std::string piece = stops.push(dec->push(id));
      text += piece;
      if (!f.json) {
        std::fputs(piece.c_str(), stdout);
        std::fflush(stdout);
      }
      return !stops.stopped();
    };
    GenerateResult r = engine.generate(ids, gen, on_token);
    if (engine.rank() == 0) {
      if (dec && r.finish_reason != "stop") {
        std::string tail = stops.push(dec->flush());
        tail += stops.flush();
        text += tail;
        if (!f.json) std::fputs(tail.c_str(), stdout);
      }
      std::lock_guard<std::mutex> lock(mu);
      result = r;
      is_rank0 = true;
    }
  });
  if (!is_rank0) return 0;
  const double n = static_cast<double>(result.output_ids.size());
  const double tps = result.decode_s > 0 && n > 1 ? (n - 1) / result.decode_s : 0.0;
  if (f.json) {
    nlohmann::json j;
    j["output_ids"] = result.output_ids;
    j["text"] = text;
    j["prompt_tokens"] = ids.size();
    j["finish_reason"] = result.finish_reason;
    j["ttft_s"] = result.ttft_s;
    j["decode_tokens_per_s"] = tps;
    std::printf("%s\n", j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  } else {
    if (!tok) {
      for (size_t i = 0; i < result.output_ids.size(); ++i) std::printf("%s%d", i ? "," : "", result.output_ids[i]);
    }
    std::printf("\n");
    std::fprintf(stderr, "[cpinfer] prompt %zu tokens, generated %zu (%s), TTFT %.3f s, decode %.1f tok/s\n",
                 ids.size(), result.output_ids.size(), result.finish_reason.c_str(), result.ttft_s, tps);
  }
  return 0;
}

struct LogitsFlags {
  EngineFlags ef;
  std::string input_ids;
  int last = 1;
  bool json = true;
};

int run_logits(LogitsFlags& f) {
  std::vector<int32_t> ids = parse_ids(f.input_ids);
  CPI_CHECK(f.last >= 0, "--last must be >= 0");
  std::vector<float> logits;
  int64_t vocab = 0;
  std::mutex mu;
  bool is_rank0 = false;
  launch(f.ef.launch(), [&](ParallelCtx& par) {
    EngineOptions eo = f.ef.engine(static_cast<int>(ids.size()) + 1);  // the loop draws one token after the prompt
    eo.quiet = true;
    Engine engine(f.ef.model_path, eo, par);
    std::vector<float> out = engine.prompt_logits(ids);
    if (engine.rank() == 0) {
      std::lock_guard<std::mutex> lock(mu);
      logits = std::move(out);
      vocab = engine.config().vocab_size;
      is_rank0 = true;
    }
  });
  if (!is_rank0) return 0;
  const size_t T = ids.size();
  nlohmann::json j;
  std::vector<int32_t> am(T);
  for (size_t t = 0; t < T; ++t) {
    const float* row = logits.data() + t * vocab;
    size_t best = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (row[v] > row[best]) best = v;
    am[t] = static_cast<int32_t>(best);
  }
  j["argmax"] = am;
  j["logits"] = nlohmann::json::array();
  size_t k = std::min<size_t>(static_cast<size_t>(f.last), T);
  for (size_t t = T - k; t < T; ++t) {
    std::vector<float> row(logits.begin() + t * vocab, logits.begin() + (t + 1) * vocab);
    for (float x : row) CPI_CHECK(std::isfinite(x), "non-finite logit at position ", t);
    j["logits"].push_back(row);
  }
  std::printf("%s\n", j.dump().c_str());
  return 0;
}

}  // namespace

Command add_generate_command(CLI::App& app) {
  auto f = std::make_shared<GenerateFlags>();
  CLI::App* c = app.add_subcommand("generate", "Generate a continuation of a prompt (text or token ids)");
  f->ef.add_to(c, false);
  f->ef.add_random_weights_to(c);
  c->add_option("--prompt", f->prompt, "Prompt text (tokenized with the model's tokenizer.json)");
  c->add_option("--input-ids", f->input_ids,
                "Prompt as comma-separated token ids, e.g. 1,2,3, or @FILE to read them from a file (long prompts)");
  c->add_flag("--chat", f->chat, "Wrap --prompt in the model's chat template as a user turn");
  c->add_option("--system", f->system, "System message for --chat");
  c->add_flag("--disable-thinking", f->disable_thinking, "Chat template with enable_thinking=false");
  c->add_option("--max-new-tokens", f->max_new_tokens, "Tokens to generate")->capture_default_str();
  c->add_option("--temperature", f->temperature, "0 = greedy")->capture_default_str();
  c->add_option("--top-k", f->top_k, "-1 = off")->capture_default_str();
  c->add_option("--top-p", f->top_p, "Nucleus sampling mass")->capture_default_str();
  c->add_option("--min-p", f->min_p, "Drop tokens below min-p x the top probability")->capture_default_str();
  c->add_option("--seed", f->seed, "Sampling seed (-1: random)")->capture_default_str();
  c->add_option("--stop", f->stop, "Stop string (repeatable)");
  c->add_flag("--ignore-eos", f->ignore_eos, "Do not stop at the model's EOS tokens");
  c->add_flag("--json", f->json, "Print one JSON object: output_ids, text, timing");
  return {c, [f] { return run_generate(*f); }};
}

Command add_logits_command(CLI::App& app) {
  auto f = std::make_shared<LogitsFlags>();
  CLI::App* c = app.add_subcommand("logits", "Print the argmax of every position and the logits of the last K");
  f->ef.add_to(c);
  c->add_option("--input-ids", f->input_ids, "Prompt as comma-separated token ids, or @FILE to read them from a file")
      ->required();
  c->add_option("--last", f->last, "How many final positions to print full logits for")->capture_default_str();
  c->add_flag("--json", f->json, "JSON output (the only format)");
  return {c, [f] { return run_logits(*f); }};
}

}  // namespace cpinfer
