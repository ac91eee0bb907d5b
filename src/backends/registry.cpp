#include "ops/backend.h"

namespace cpinfer {

std::unique_ptr<Backend> make_backend(const std::string& kind, int device_index) {
  if (kind == "cpu") return make_cpu_backend();
#ifdef CPINFER_HAVE_CUDA
  if (kind == "cuda") return make_cuda_backend(device_index);
#else
  CPI_CHECK(kind != "cuda", "this build of cpinfer has no CUDA back-end (rebuild with -DCPINFER_CUDA=ON)");
#endif
  CPI_FAIL("unknown device '", kind, "' (expected cpu or cuda)");
}

}  // namespace cpinfer
