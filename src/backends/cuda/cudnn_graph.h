// The slice of cuDNN's graph (backend) API the attention back-end uses (cudnn_attention.cpp):
// the library loaded at run time, descriptors owned by RAII handles, and a builder that turns a
// list of operations into a finalized execution plan. Compiled only where the cuDNN headers are.
#pragma once
#include <cudnn_graph.h>

#include <array>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cpinfer::cuda::cudnn {

// The cuDNN entry points called here, resolved from libcudnn.so.9 with dlopen/dlsym.
struct Api {
  size_t (*get_version)() = nullptr;
  const char* (*get_error_string)(cudnnStatus_t) = nullptr;
  void (*get_last_error_string)(char*, size_t) = nullptr;
  cudnnStatus_t (*create)(cudnnHandle_t*) = nullptr;
  cudnnStatus_t (*destroy)(cudnnHandle_t) = nullptr;
  cudnnStatus_t (*set_stream)(cudnnHandle_t, cudaStream_t) = nullptr;
  cudnnStatus_t (*create_descriptor)(cudnnBackendDescriptorType_t, cudnnBackendDescriptor_t*) = nullptr;
  cudnnStatus_t (*destroy_descriptor)(cudnnBackendDescriptor_t) = nullptr;
  cudnnStatus_t (*finalize)(cudnnBackendDescriptor_t) = nullptr;
  cudnnStatus_t (*set_attribute)(cudnnBackendDescriptor_t, cudnnBackendAttributeName_t, cudnnBackendAttributeType_t,
                                 int64_t, const void*) = nullptr;
  cudnnStatus_t (*get_attribute)(cudnnBackendDescriptor_t, cudnnBackendAttributeName_t, cudnnBackendAttributeType_t,
                                 int64_t, int64_t*, void*) = nullptr;
  cudnnStatus_t (*execute)(cudnnHandle_t, cudnnBackendDescriptor_t, cudnnBackendDescriptor_t) = nullptr;
  std::string error;  // why the library cannot be used; empty when every entry point resolved
};
// Loaded on first use, once per process (the library stays loaded).
const Api& api();

// A failed cuDNN call while building a graph or a plan: the call, the status and cuDNN's own
// last error message.
class GraphError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// Throws GraphError naming `what` unless st is CUDNN_STATUS_SUCCESS.
void ok(cudnnStatus_t st, const std::string& what);

// Owns one backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type);
  ~Desc();
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  cudnnBackendDescriptor_t get() const { return d_; }

  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* value);
  Desc& set_desc(cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t value) {
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &value);
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, int64_t value) { return set(name, CUDNN_TYPE_INT64, 1, &value); }
  Desc& set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t value) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &value);
  }
  Desc& finalize(const char* what);

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

using Dims = std::array<int64_t, 4>;

// A finalized execution plan and everything it was built from (kept alive with it).
struct Plan {
  Plan() = default;
  Plan(Plan&&) = default;
  Plan& operator=(Plan&&) = default;
  ~Plan() {  // the plan first, then what it was built from
    while (!descs.empty()) descs.pop_back();
  }
  std::vector<std::unique_ptr<Desc>> descs;
  cudnnBackendDescriptor_t plan = nullptr;
  int64_t workspace_bytes = 0;
  int64_t engine_index = -1;  // cuDNN's global index of the engine that was chosen
};

// Builds one operation graph. Every call throws GraphError when cuDNN refuses an attribute.
class GraphBuilder {
 public:
  // A tensor: non-virtual ones are bound by uid at execution; by_value ones take a host pointer
  // to their scalar; `ragged` (may be null) is the tensor of per-batch start offsets.
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, Dims dims, Dims strides, bool is_virtual,
                                  bool by_value = false, cudnnBackendDescriptor_t ragged = nullptr);
  // y = mode(x[, b[, t]]) computed in `math`; axis >= 0 for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t y, cudnnBackendDescriptor_t b = nullptr, cudnnBackendDescriptor_t t = nullptr,
                 int64_t axis = -1);
  // c = a · b (batched over the first two dims) in fp32, with the per-batch GEMM sizes overridden
  // by the optional m/n/k tensors.
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c,
              cudnnBackendDescriptor_t m_override, cudnnBackendDescriptor_t n_override,
              cudnnBackendDescriptor_t k_override);
  void reduction(cudnnReduceTensorOp_t op, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y);
  // y = the pages of `container` listed by `page_table`, seq_len positions per batch entry.
  void paged_load(cudnnBackendDescriptor_t container, cudnnBackendDescriptor_t seq_len,
                  cudnnBackendDescriptor_t page_table, cudnnBackendDescriptor_t y);
  // Finalizes the graph and returns the first engine configuration (heuristics mode A, then the
  // fallback list) whose execution plan finalizes for the device `devprop` describes (without it
  // cuDNN 9.19 sees no device and every engine refuses); throws GraphError naming what failed.
  Plan build(cudnnBackendDescriptor_t devprop);

 private:
  Desc& make(cudnnBackendDescriptorType_t type);
  std::vector<std::unique_ptr<Desc>> descs_;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

}  // namespace cpinfer::cuda::cudnn
