// Opening and reading files named by a model directory (config.json, tokenizer.json, safetensors
// shards and index). A checkpoint directory is untrusted: any of its names may be a FIFO, a device
// or a directory. A FIFO blocks a plain open() until a writer appears and a read() until it writes,
// so a load would hang forever; these helpers open without blocking and accept regular files only.
#pragma once
#include <cstdint>
#include <string>

namespace cpinfer {

// Largest JSON file cpinfer reads whole (tokenizer.json of real models: ~11 MB; a safetensors index:
// well under 1 MB). A bigger one is not a file we know.
constexpr uint64_t kMaxJsonFileBytes = uint64_t(256) << 20;

// An open read-only descriptor of a regular file, closed at scope exit.
class RegularFile {
 public:
  // Throws cpinfer::Error "<path> is not a regular file (a FIFO)" etc. when `path` does not name a
  // regular file (after symlinks), or "cannot open <path>: <errno text>".
  explicit RegularFile(const std::string& path);
  ~RegularFile();
  RegularFile(const RegularFile&) = delete;
  RegularFile& operator=(const RegularFile&) = delete;

  int fd() const { return fd_; }
  uint64_t size() const { return size_; }

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
};

// The whole content of the regular file `path`; refuses a non-regular file and one larger than
// `max_bytes` (before reading anything), naming the path and the limit.
std::string read_regular_file(const std::string& path, uint64_t max_bytes = kMaxJsonFileBytes);

}  // namespace cpinfer
