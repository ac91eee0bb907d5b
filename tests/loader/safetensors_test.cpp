// Safetensors reader/writer: round trips, sharding, and one clear error per kind of defect.
#include <gtest/gtest.h>

#include <cstring>
#include <set>

#include "loader/safetensors.h"
#include "loader_test_util.h"

namespace cpinfer {
namespace {

using test::TempDir;
using test::write_raw_safetensors;
using test::write_text;
namespace fs = std::filesystem;

std::vector<float> iota_f32(size_t n, float start) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + static_cast<float>(i);
  return v;
}

TEST(Safetensors, WriterRoundTripKeepsBytesShapesAndMetadata) {
  TempDir dir;
  std::vector<float> a = iota_f32(6, 1.0f);
  std::vector<uint16_t> b = {f32_to_bf16(0.5f), f32_to_bf16(-2.0f), f32_to_bf16(3.25f)};
  std::vector<int64_t> c = {7, -8};
  std::vector<uint8_t> d = {9};
  SafetensorsWriter w;
  w.add("a", DType::F32, {2, 3}, a.data());
  w.add("b", DType::BF16, {3}, b.data());
  w.add("c", DType::I64, {2}, c.data());
  w.add("u8", DType::U8, {1}, d.data());
  w.add("empty", DType::F16, {0, 4}, nullptr);
  w.add_metadata("format", "pt");
  w.write(dir.file("model.safetensors"));

  // Header padded to 8 bytes so the data region is aligned.
  std::ifstream in(dir.file("model.safetensors"), std::ios::binary);
  uint64_t header_len = 0;
  in.read(reinterpret_cast<char*>(&header_len), 8);
  EXPECT_EQ(header_len % 8, 0u);

  Checkpoint ck = Checkpoint::open(dir.path());
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c", "empty", "u8"}));
  EXPECT_EQ(ck.metadata().at("format"), "pt");
  const TensorInfo& ta = ck.get("a");
  EXPECT_EQ(ta.dtype, DType::F32);
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{2, 3}));
  ASSERT_EQ(ta.nbytes, 24u);
  EXPECT_EQ(std::memcmp(ta.data, a.data(), 24), 0);
  EXPECT_EQ(std::memcmp(ck.get("b").data, b.data(), 6), 0);
  EXPECT_EQ(std::memcmp(ck.get("c").data, c.data(), 16), 0);
  EXPECT_EQ(ck.get("empty").nbytes, 0u);
  EXPECT_EQ(ck.get("u8").dtype, DType::U8);
  EXPECT_EQ(ck.total_bytes(), 24u + 6u + 16u + 1u);
  EXPECT_EQ(ck.find("nope"), nullptr);
  EXPECT_ERROR_HAS(ck.get("nope"), "missing tensor 'nope'", dir.path());
}

TEST(Safetensors, WriterRejectsDuplicateNames) {
  float x = 1.0f;
  SafetensorsWriter w;
  w.add("x", DType::F32, {1}, &x);
  EXPECT_ERROR_HAS(w.add("x", DType::F32, {1}, &x), "'x' added twice");
}

TEST(Safetensors, ShardedAndSingleFileGiveIdenticalTensors) {
  auto tensors = test::tiny_tensors();
  TempDir one, sharded;
  test::write_checkpoint(one.path(), tensors, 1);
  test::write_checkpoint(sharded.path(), tensors, 3);
  Checkpoint a = Checkpoint::open(one.path());
  Checkpoint b = Checkpoint::open(sharded.path());
  ASSERT_EQ(a.names(), b.names());
  EXPECT_EQ(a.names().size(), tensors.size());
  EXPECT_EQ(a.total_bytes(), b.total_bytes());
  std::set<std::string> files;
  for (const std::string& n : a.names()) {
    const TensorInfo& x = a.get(n);
    const TensorInfo& y = b.get(n);
    files.insert(y.file);
    EXPECT_EQ(x.dtype, y.dtype) << n;
    EXPECT_EQ(x.shape, y.shape) << n;
    ASSERT_EQ(x.nbytes, y.nbytes) << n;
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes), 0) << n;
    EXPECT_EQ(std::memcmp(x.data, tensors.at(n).bf16.data(), x.nbytes), 0) << n;
  }
  EXPECT_EQ(files.size(), 3u);
}

TEST(Safetensors, IndexIsTheTruthTensorsNotInTheMapAreIgnored) {
  TempDir dir;
  float v[2] = {1, 2};
  SafetensorsWriter w;
  w.add("listed", DType::F32, {2}, v);
  w.add("stray", DType::F32, {2}, v);
  w.write(dir.file("shard-a.safetensors"));
  write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": {"listed": "shard-a.safetensors"}})");
  Checkpoint ck = Checkpoint::open(dir.path());
  EXPECT_EQ(ck.names(), std::vector<std::string>{"listed"});
  EXPECT_EQ(ck.find("stray"), nullptr);
}

TEST(Safetensors, FallsBackToTheOnlySafetensorsFile) {
  TempDir dir;
  float v = 3;
  SafetensorsWriter w;
  w.add("t", DType::F32, {1}, &v);
  w.write(dir.file("weights.safetensors"));
  EXPECT_EQ(Checkpoint::open(dir.path()).names(), std::vector<std::string>{"t"});
  w.write(dir.file("other.safetensors"));
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "2 .safetensors files", "index.json");
}

// ---- corrupt inputs: each must name the file (and the tensor where there is one).

TEST(SafetensorsErrors, MissingDirectory) {
  EXPECT_ERROR_HAS(Checkpoint::open("/nonexistent/cpinfer-model"), "'/nonexistent/cpinfer-model'", "does not exist");
}

TEST(SafetensorsErrors, NoSafetensorsInDirectory) {
  TempDir dir;
  write_text(dir.file("config.json"), "{}");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "no model.safetensors", dir.path());
}

TEST(SafetensorsErrors, TruncatedBeforeHeaderSize) {
  TempDir dir;
  write_text(dir.file("model.safetensors"), "abc");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "truncated");
}

TEST(SafetensorsErrors, HeaderSizeBeyondFile) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"), "{}", 0, 4096);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "header size 4096 runs past the end");
}

TEST(SafetensorsErrors, HeaderSizeAboveLimit) {
  // The size field claims 2^40 bytes; it is also past the end, which is reported first.
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"), "{}", 0, int64_t{1} << 40);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "header size");
  // A sparse 200 MB file whose size field matches: only the limit can reject it.
  const uint64_t big = 200'000'000;
  std::string head(8, '\0');
  for (int i = 0; i < 8; ++i) head[static_cast<size_t>(i)] = static_cast<char>(big >> (8 * i));
  write_text(dir.file("model.safetensors"), head + "{");
  fs::resize_file(dir.file("model.safetensors"), 8 + big);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "exceeds the 100000000-byte limit");
}

TEST(SafetensorsErrors, HeaderNotJson) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"), "{\"a\": [1, 2", 0);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "not valid JSON");
  write_raw_safetensors(dir.file("model.safetensors"), "[1, 2, 3]", 0);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "does not start with '{'");
}

TEST(SafetensorsErrors, OffsetsWithAGap) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}})",
                        16);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "gap of 4 bytes before tensor 'b'");
}

TEST(SafetensorsErrors, OverlappingOffsets) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                        12);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'b'", "overlap");
}

TEST(SafetensorsErrors, DataRegionLongerThanTensors) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 12);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "data region is 12 bytes", "cover only 8");
}

TEST(SafetensorsErrors, ByteCountDiffersFromShapeTimesDtype) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "BF16", "shape": [3, 2], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'w' has 8 bytes", "needs 12");
}

TEST(SafetensorsErrors, DuplicateTensorName) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                        8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "duplicate key 'w'");
}

TEST(SafetensorsErrors, UnsupportedDtype) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'w'", "unsupported dtype 'F64'");
}

TEST(SafetensorsErrors, NegativeDimension) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'w'", "invalid dimension -1");
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "tensor 'w'", "invalid dimension 2.5");
}

TEST(SafetensorsErrors, OverflowingShape) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'w'", "overflows");
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", 8);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "tensor 'w'", "overflows");
}

TEST(SafetensorsErrors, MalformedEntries) {
  TempDir dir;
  write_raw_safetensors(dir.file("model.safetensors"), R"({"w": {"dtype": "F32", "shape": [1]}})", 4);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "tensor 'w'", "data_offsets");
  write_raw_safetensors(dir.file("model.safetensors"),
                        R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 400]}})", 4);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "tensor 'w'", "outside the data region of 4 bytes");
  write_raw_safetensors(dir.file("model.safetensors"), R"({"__metadata__": {"format": 1}})", 0);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "__metadata__", "'format'");
}

TEST(SafetensorsErrors, TruncatedDataRegion) {
  // A real file cut short: the last tensor's bytes are gone.
  TempDir dir;
  std::vector<float> v = iota_f32(64, 0.0f);
  SafetensorsWriter w;
  w.add("w", DType::F32, {64}, v.data());
  w.write(dir.file("model.safetensors"));
  fs::resize_file(dir.file("model.safetensors"), fs::file_size(dir.file("model.safetensors")) - 10);
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors", "tensor 'w'", "outside the data region");
}

TEST(SafetensorsErrors, IndexNamesAMissingShard) {
  TempDir dir;
  write_text(dir.file("model.safetensors.index.json"),
             R"({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}})");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors.index.json", "model-00002-of-00002.safetensors",
                   "model.norm.weight", "does not exist");
}

TEST(SafetensorsErrors, IndexListsATensorTheShardLacks) {
  TempDir dir;
  float v = 1;
  SafetensorsWriter w;
  w.add("model.norm.weight", DType::F32, {1}, &v);
  w.write(dir.file("a.safetensors"));
  write_text(dir.file("model.safetensors.index.json"),
             R"({"weight_map": {"model.norm.weight": "a.safetensors", "lm_head.weight": "a.safetensors"}})");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "lm_head.weight", "a.safetensors", "does not contain it");
}

TEST(SafetensorsErrors, IndexMalformed) {
  TempDir dir;
  write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": {"x": "../escape.safetensors"}})");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors.index.json", "plain file name");
  write_text(dir.file("model.safetensors.index.json"), R"({"metadata": {}})");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors.index.json", "weight_map");
  write_text(dir.file("model.safetensors.index.json"), "not json");
  EXPECT_ERROR_HAS(Checkpoint::open(dir.path()), "model.safetensors.index.json", "not valid JSON");
}

}  // namespace
}  // namespace cpinfer
