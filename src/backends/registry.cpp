#include "ops/backend.h"

namespace cpinfer {

std::unique_ptr<Backend> make_backend(const std::string& kind, int device_index, const BackendOptions& opt) {
  CPI_CHECK(opt.fp8 == "auto" || opt.fp8 == "bf16", "--fp8-weights ", opt.fp8, ": expected auto or bf16");
  if (kind == "cpu") {
    CPI_CHECK(opt.attention == "auto", "--attention-backend ", opt.attention,
              ": the CPU back-end has one attention kernel (only 'auto')");
    CPI_CHECK(opt.moe == "auto", "--moe-runner-backend ", opt.moe,
              ": the CPU back-end has one MoE kernel (only 'auto')");
    return make_cpu_backend(/*simd=*/true, /*fp8=*/opt.fp8 == "auto");
  }
#ifdef CPINFER_HAVE_CUDA
  if (kind == "cuda") return make_cuda_backend(device_index, opt);
#else
  CPI_CHECK(kind != "cuda", "this build of cpinfer has no CUDA back-end (rebuild with -DCPINFER_CUDA=ON)");
#endif
  CPI_FAIL("unknown device '", kind, "' (expected cpu or cuda)");
}

}  // namespace cpinfer
