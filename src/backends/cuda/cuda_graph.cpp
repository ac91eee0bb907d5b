// CudaBackend's graphs (Backend::begin_capture / end_capture): the ops enqueued on the back-end's
// stream between the two are recorded by CUDA stream capture into a graph that replays them
// (model/decode_graph.h records decode steps this way).
#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_check.h"
#include "core/check.h"

namespace cpinfer::cuda {

namespace {
class CudaGraph final : public OpGraph {
 public:
  CudaGraph(cudaGraphExec_t exec, cudaStream_t stream, int device) : exec_(exec), stream_(stream), device_(device) {}
  ~CudaGraph() override { cudaGraphExecDestroy(exec_); }
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  void replay() override {
    DeviceGuard g(device_);
    CUDA_CHECK(cudaGraphLaunch(exec_, stream_));
  }

 private:
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
  int device_;
};
}  // namespace

void CudaBackend::begin_capture() {
  CPI_CHECK(!capturing_, "begin_capture: a capture is already under way");
  DeviceGuard g(device_);
  // The lazy start-up work that synchronizes must be done before the capture: the cuBLASLt FP8
  // scale-layout probe, once FP8 weights have been used here (cuda_backend.h ensure_fp8_lt_probe).
  if (fp8_used_) ensure_fp8_lt_probe();
  // Thread-local mode: an unsafe call of this thread (a synchronization, an allocation) fails the
  // capture; other threads (the server's) are not affected.
  CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
}

std::unique_ptr<OpGraph> CudaBackend::end_capture() {
  CPI_CHECK(capturing_, "end_capture without begin_capture");
  DeviceGuard g(device_);
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  const cudaError_t err = cudaStreamEndCapture(stream_, &graph);
  if (err != cudaSuccess || graph == nullptr) {
    cudaGetLastError();  // an invalidated capture leaves its error behind
    if (graph) cudaGraphDestroy(graph);
    CPI_FAIL("CUDA graph capture failed: ", cudaGetErrorString(err));
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    cudaGetLastError();
    CPI_FAIL("CUDA graph instantiation failed: ", cudaGetErrorString(inst));
  }
  return std::make_unique<CudaGraph>(exec, stream_, device_);
}

}  // namespace cpinfer::cuda
