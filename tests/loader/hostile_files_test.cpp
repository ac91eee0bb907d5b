// Regression tests for checkpoint directories built to hang or fool the loader (issue 14): FIFOs in
// place of the JSON files, bytes hidden after a NUL, duplicated keys, floats that overflow float,
// and sizes that would exhaust memory before any weight is read.
#include <sys/stat.h>

#include <chrono>
#include <future>
#include <memory>
#include <thread>

#include "core/file.h"
#include "core/json.h"
#include "loader/config.h"
#include "loader/safetensors.h"
#include "loader_test_util.h"
#include "tokenizer/bpe.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/utf8.h"

namespace cpinfer::test {
namespace {

// A tokenizer.json just valid enough for Tokenizer::from_dir: the 256 byte-level symbols, no merges.
std::string tiny_tokenizer() {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) {
    std::string sym;
    utf8::append(sym, tok_detail::byte_to_symbol()[static_cast<size_t>(b)]);
    vocab[sym] = b;
  }
  nlohmann::json j = {
      {"version", "1.0"},      {"added_tokens", nlohmann::json::array()},
      {"normalizer", nullptr}, {"pre_tokenizer", nullptr},
      {"decoder", nullptr},    {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", nlohmann::json::array()}}}};
  return j.dump();
}

void make_fifo(const std::string& path) { ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0) << path; }

// Runs `fn` on its own thread and returns its cpinfer::Error message; fails (instead of hanging the
// test binary) when fn has not returned within 20 s. A hung thread is left behind, detached.
template <class F>
std::string error_within_deadline(F fn) {
  auto result = std::make_shared<std::promise<std::string>>();
  std::future<std::string> done = result->get_future();
  std::thread([fn, result] {
    try {
      fn();
      result->set_value("<no error>");
    } catch (const Error& e) {
      result->set_value(e.what());
    } catch (const std::exception& e) {
      result->set_value(std::string("<non-cpinfer exception> ") + e.what());
    }
  }).detach();
  if (done.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    ADD_FAILURE() << "the loader hung (no answer in 20 s)";
    return "";
  }
  return done.get();
}

TEST(HostileFiles, FifoIndexIsRefusedNotReadForever) {
  TempDir d;
  make_fifo(d.file("model.safetensors.index.json"));
  std::string msg = error_within_deadline([&] { Checkpoint::open(d.path()); });
  EXPECT_NE(msg.find("is a FIFO, not a regular file"), std::string::npos) << msg;
}

TEST(HostileFiles, FifoSafetensorsIsRefused) {
  TempDir d;
  make_fifo(d.file("model.safetensors"));
  std::string msg = error_within_deadline([&] { Checkpoint::open(d.path()); });
  EXPECT_NE(msg.find("is a FIFO"), std::string::npos) << msg;
}

TEST(HostileFiles, FifoTokenizerJsonIsRefused) {
  TempDir d;
  make_fifo(d.file("tokenizer.json"));
  std::string msg = error_within_deadline([&] { Tokenizer::from_dir(d.path()); });
  EXPECT_NE(msg.find("tokenizer.json is a FIFO"), std::string::npos) << msg;
}

TEST(HostileFiles, FifoTokenizerConfigIsRefused) {
  TempDir d;
  write_text(d.file("tokenizer.json"), tiny_tokenizer());
  ASSERT_NO_THROW(Tokenizer::from_dir(d.path()));  // the tokenizer itself is fine
  make_fifo(d.file("tokenizer_config.json"));
  std::string msg = error_within_deadline([&] { Tokenizer::from_dir(d.path()); });
  EXPECT_NE(msg.find("tokenizer_config.json is a FIFO"), std::string::npos) << msg;
}

TEST(HostileFiles, FifoOrDirectoryConfigIsRefused) {
  TempDir d;
  make_fifo(d.file("config.json"));
  std::string msg = error_within_deadline([&] { load_config(d.path()); });
  EXPECT_NE(msg.find("config.json is a FIFO"), std::string::npos) << msg;
  TempDir d2;
  fs::create_directory(d2.file("config.json"));
  EXPECT_ERROR_HAS(load_config(d2.path()), "config.json is a directory");
}

TEST(HostileFiles, ReadRegularFileBoundsTheSize) {
  TempDir d;
  write_text(d.file("big.json"), std::string(1000, ' '));
  EXPECT_EQ(read_regular_file(d.file("big.json"), 1000).size(), 1000u);
  EXPECT_ERROR_HAS(read_regular_file(d.file("big.json"), 999), "1000 bytes, more than the 999-byte limit");
  EXPECT_ERROR_HAS(read_regular_file(d.file("absent.json")), "cannot open", "absent.json");
}

TEST(HostileFiles, BytesAfterANulInASafetensorsHeaderAreRefused) {
  TempDir d;
  // A valid header, then a NUL and a second tensor entry a lenient parser never sees.
  std::string header = R"({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}})";
  header += std::string("\0", 1) + R"(, "hidden": {"dtype": "U8", "shape": [1], "data_offsets": [2, 3]})";
  write_raw_safetensors(d.file("model.safetensors"), header, 2);
  EXPECT_ERROR_HAS(Checkpoint::open(d.path()), "model.safetensors header", "NUL byte at offset");
}

TEST(HostileFiles, BytesAfterANulInConfigJsonAreRefused) {
  std::string text = tiny_config_json();
  text += std::string("\0", 1) + R"({"num_hidden_layers": 99})";
  EXPECT_ERROR_HAS(parse_config(text, "config.json"), "config.json: NUL byte at offset");
  // Also a NUL inside the object, where it would end the input early.
  std::string mid = tiny_config_json();
  mid.insert(1, std::string("\0", 1));
  EXPECT_ERROR_HAS(parse_config(mid, "config.json"), "NUL byte at offset 1");
}

TEST(HostileFiles, DuplicatedConfigKeysAreRefused) {
  std::string text = tiny_config_json();
  text.insert(text.find('{') + 1, R"("num_hidden_layers": 7, )");
  EXPECT_ERROR_HAS(parse_config(text, "config.json"), "config.json: duplicate key 'num_hidden_layers'");
  // Nested objects too (rope_scaling), and generation_config.json through load_config.
  std::string nested = tiny_config_json();
  nested.replace(nested.find(R"("rope_scaling": null)"), 20,
                 R"("rope_scaling": {"rope_type": "yarn", "factor": 2.0, "factor": 4.0})");
  EXPECT_ERROR_HAS(parse_config(nested, "config.json"), "duplicate key 'factor'");
  TempDir d;
  write_text(d.file("config.json"), tiny_config_json());
  write_text(d.file("generation_config.json"), R"({"eos_token_id": 2, "eos_token_id": 3})");
  EXPECT_ERROR_HAS(load_config(d.path()), "generation_config.json: duplicate key 'eos_token_id'");
}

TEST(HostileFiles, DuplicatedTokenizerConfigKeysAreRefused) {
  TempDir d;
  write_text(d.file("tokenizer.json"), tiny_tokenizer());
  write_text(d.file("tokenizer_config.json"), R"({"eos_token": "a", "eos_token": "b"})");
  EXPECT_ERROR_HAS(Tokenizer::from_dir(d.path()), "duplicate key 'eos_token'");
}

std::string with_field(const std::string& key, const std::string& value) {
  std::string text = tiny_config_json();
  size_t at = text.find("\"" + key + "\"");
  if (at == std::string::npos) {
    text.insert(text.find('{') + 1, "\"" + key + "\": " + value + ", ");
  } else {
    size_t colon = text.find(':', at), end = text.find_first_of(",}", colon);
    text.replace(colon + 1, end - colon - 1, " " + value);
  }
  return text;
}

TEST(HostileFiles, FloatsThatOverflowFloatAreRefused) {
  ASSERT_NO_THROW(parse_config(with_field("rope_theta", "1e30"), "config.json"));
  EXPECT_ERROR_HAS(parse_config(with_field("rope_theta", "1e308"), "config.json"), "'rope_theta'",
                   "out of the range of a 32-bit float");
  EXPECT_ERROR_HAS(parse_config(with_field("rms_norm_eps", "1e300"), "config.json"), "'rms_norm_eps'", "32-bit float");
  EXPECT_ERROR_HAS(parse_config(with_field("rms_norm_eps", "1e-60"), "config.json"), "rms_norm_eps",
                   "is 0 as a 32-bit float");
  EXPECT_ERROR_HAS(parse_config(with_field("rope_scaling", R"({"rope_type": "yarn", "factor": 1e39})"), "config.json"),
                   "'rope_scaling.factor'", "32-bit float");
}

TEST(HostileFiles, AbsurdSizesAreRefusedBeforeAllocation) {
  const std::pair<const char*, const char*> cases[] = {
      {"num_hidden_layers", "2147483647"},
      {"num_hidden_layers", "10000000"},
      {"hidden_size", "4294967296"},
      {"vocab_size", "1000000000000"},
      {"intermediate_size", "68719476736"},
      {"num_experts", "1000000"},
      {"moe_intermediate_size", "1099511627776"},
      {"num_attention_heads", "1048576"},
      {"max_position_embeddings", "9000000000000"},
      {"head_dim", "1000000"},
  };
  for (const auto& [key, value] : cases) {
    SCOPED_TRACE(std::string(key) + " = " + value);
    const auto t0 = std::chrono::steady_clock::now();
    std::string msg = error_of([&] { parse_config(with_field(key, value), "config.json"); });
    EXPECT_NE(msg.find(key), std::string::npos) << msg;
    EXPECT_TRUE(msg.find("exceeds cpinfer's limit") != std::string::npos ||
                msg.find("out of range") != std::string::npos)
        << msg;
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(1));
  }
}

}  // namespace
}  // namespace cpinfer::test
