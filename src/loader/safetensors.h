// Safetensors checkpoints: a memory-mapped, fully validated reader (single file or sharded through
// model.safetensors.index.json) and a small writer for tests and `cpinfer demo-model`.
//
// File format: [u64 little-endian N][N bytes of JSON header][data region]. The header maps each
// tensor name to {dtype, shape, data_offsets: [begin, end)} relative to the data region, plus an
// optional "__metadata__" string->string object. The reader rejects anything the format forbids
// (see Checkpoint::open) so that a bad file gives one clear error instead of garbage weights.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/dtype.h"

namespace cpinfer {

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // inside the mmap; valid while the Checkpoint lives
  size_t nbytes = 0;
  std::string file;  // full path of the shard that holds it
};

class MappedFile;

class Checkpoint {
 public:
  // Opens the checkpoint in `dir`: model.safetensors when present (as transformers does), else
  // model.safetensors.index.json (each shard it names is opened once; the index decides which
  // tensors exist), else the one *.safetensors file of the directory. Throws cpinfer::Error naming
  // the file on any defect.
  static Checkpoint open(const std::string& dir);

  // Opens one .safetensors file on its own (all of its tensors).
  static Checkpoint open_file(const std::string& path);

  Checkpoint(Checkpoint&&) noexcept;
  Checkpoint& operator=(Checkpoint&&) noexcept;
  ~Checkpoint();

  const TensorInfo* find(std::string_view name) const;  // nullptr if absent
  const TensorInfo& get(std::string_view name) const;   // throws "missing tensor 'X' in DIR"
  std::vector<std::string> names() const;               // sorted
  size_t size() const { return tensors_.size(); }
  size_t total_bytes() const;
  const std::string& dir() const { return dir_; }
  // The "__metadata__" of the (first) file, empty when absent.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  Checkpoint() = default;
  std::string dir_;
  std::vector<std::unique_ptr<MappedFile>> files_;
  std::map<std::string, TensorInfo, std::less<>> tensors_;
  std::map<std::string, std::string> metadata_;
};

// Parses and validates one safetensors image (header + data) held in memory. Exposed for the
// fuzz target and tests; `label` names the file in error messages.
std::vector<TensorInfo> parse_safetensors(const void* bytes, size_t size, const std::string& label,
                                          std::map<std::string, std::string>* metadata = nullptr);

class SafetensorsWriter {
 public:
  // Copies nbytes = product(shape) * dtype_size(dtype) from `data`. Names must be unique.
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data);
  void add_metadata(const std::string& key, const std::string& value);
  // Writes the file; the header is padded with spaces to a multiple of 8 bytes, as the Python
  // writer does, so the data region (and every 8-byte-aligned tensor in it) stays aligned.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace cpinfer
