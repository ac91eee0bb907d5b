// Fuzzes the safetensors header/data validation (parse_safetensors): any byte string must give
// either tensors that lie inside the buffer and tile its data region, or a cpinfer::Error.
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "loader/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A private copy so that ASan sees reads past the end of the image (libFuzzer's buffer is
  // exactly `size` bytes too, but a copy also catches writes through the const pointer).
  std::vector<uint8_t> image(data, data + size);
  std::map<std::string, std::string> metadata;
  std::vector<cpinfer::TensorInfo> tensors;
  bool ok = cpinfer::fuzz::run_expecting_errors(
      [&] { tensors = cpinfer::parse_safetensors(image.data(), image.size(), "fuzz.safetensors", &metadata); });
  if (!ok) return 0;
  // Properties of an accepted file: every tensor's bytes are inside the image and sized by shape.
  const uint8_t* begin = image.data();
  const uint8_t* end = image.data() + image.size();
  for (const cpinfer::TensorInfo& t : tensors) {
    const auto* p = static_cast<const uint8_t*>(t.data);
    if (t.nbytes > 0 && (p < begin || p + t.nbytes > end))
      cpinfer::fuzz::report_bug(t.name.c_str(), "tensor outside image");
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    if (numel * cpinfer::dtype_size(t.dtype) != t.nbytes) cpinfer::fuzz::report_bug(t.name.c_str(), "nbytes != shape");
    // Touch the bytes: a wrong pointer would show up as an ASan report.
    volatile uint8_t sink = 0;
    if (t.nbytes > 0) sink = static_cast<uint8_t>(p[0] ^ p[t.nbytes - 1]);
    (void)sink;
  }
  return 0;
}
