// cuDNN loaded at run time and the graph builder (cudnn_graph.h).
#include "backends/cuda/cudnn_graph.h"

#include <dlfcn.h>

#include <algorithm>
#include <type_traits>

namespace cpinfer::cuda::cudnn {
namespace {

// The backend API's ABI is stable within major version 9; 9.7 is the first that takes paged K/V
// together with ragged queries, and 9.10.0/9.10.1 have known SDPA bugs (cudnn-frontend refuses
// them too).
bool version_usable(size_t v, std::string* why) {
  if (v < 90700 || v >= 100000) {
    *why = "libcudnn.so.9 reports version " + std::to_string(v) + ", this back-end needs 9.7 or newer 9.x";
    return false;
  }
  if (v == 91000 || v == 91001) {
    *why = "cuDNN 9.10.0/9.10.1 have known SDPA bugs (version " + std::to_string(v) + ")";
    return false;
  }
  return true;
}

Api load() {
  Api a;
  // RTLD_LOCAL: the process may hold another copy of cuDNN (e.g. torch's); ours stays private.
  void* lib = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    const char* err = dlerror();
    a.error = std::string("dlopen(\"libcudnn.so.9\") failed: ") + (err ? err : "unknown error");
    return a;
  }
  bool missing = false;
  auto sym = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
    if (!fn && !missing) {
      missing = true;
      a.error = std::string("libcudnn.so.9 has no symbol ") + name;
    }
  };
  sym(a.get_version, "cudnnGetVersion");
  sym(a.get_error_string, "cudnnGetErrorString");
  sym(a.get_last_error_string, "cudnnGetLastErrorString");
  sym(a.create, "cudnnCreate");
  sym(a.destroy, "cudnnDestroy");
  sym(a.set_stream, "cudnnSetStream");
  sym(a.create_descriptor, "cudnnBackendCreateDescriptor");
  sym(a.destroy_descriptor, "cudnnBackendDestroyDescriptor");
  sym(a.finalize, "cudnnBackendFinalize");
  sym(a.set_attribute, "cudnnBackendSetAttribute");
  sym(a.get_attribute, "cudnnBackendGetAttribute");
  sym(a.execute, "cudnnBackendExecute");
  if (!missing) version_usable(a.get_version(), &a.error);
  return a;
}

}  // namespace

const Api& api() {
  static const Api a = load();
  return a;
}

void ok(cudnnStatus_t st, const std::string& what) {
  if (st == CUDNN_STATUS_SUCCESS) return;
  char last[512] = {0};
  api().get_last_error_string(last, sizeof(last));
  std::string msg = what + ": " + api().get_error_string(st);
  if (last[0]) msg += std::string(" (") + last + ")";
  throw GraphError(msg);
}

Desc::Desc(cudnnBackendDescriptorType_t type) {
  ok(api().create_descriptor(type, &d_), "cudnnBackendCreateDescriptor(" + std::to_string(type) + ")");
}

Desc::~Desc() {
  if (d_) api().destroy_descriptor(d_);
}

Desc& Desc::set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* value) {
  ok(api().set_attribute(d_, name, type, count, value), "cudnnBackendSetAttribute(" + std::to_string(name) + ")");
  return *this;
}

Desc& Desc::finalize(const char* what) {
  ok(api().finalize(d_), std::string("finalizing ") + what);
  return *this;
}

Desc& GraphBuilder::make(cudnnBackendDescriptorType_t type) {
  descs_.push_back(std::make_unique<Desc>(type));
  return *descs_.back();
}

cudnnBackendDescriptor_t GraphBuilder::tensor(int64_t uid, cudnnDataType_t type, Dims dims, Dims strides,
                                              bool is_virtual, bool by_value, cudnnBackendDescriptor_t ragged) {
  Desc& t = make(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  const bool is_virtual_b = is_virtual, by_value_b = by_value;
  t.set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
      .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data())
      .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data())
      .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
      .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, 16)  // tensor-core engines need 16-byte alignment
      .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &is_virtual_b);
  if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &by_value_b);
  if (ragged) t.set_desc(CUDNN_ATTR_TENSOR_RAGGED_OFFSET_DESC, ragged);
  t.finalize(("tensor " + std::to_string(uid)).c_str());
  return t.get();
}

void GraphBuilder::pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, cudnnBackendDescriptor_t x,
                             cudnnBackendDescriptor_t y, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t,
                             int64_t axis) {
  Desc& pw = make(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
  pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
      .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
  if (axis >= 0) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
  pw.finalize("pointwise descriptor");
  Desc& op = make(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.get())
      .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x)
      .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
  if (b) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
  if (t) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
  op.finalize(("pointwise operation (mode " + std::to_string(mode) + ")").c_str());
  ops_.push_back(op.get());
}

void GraphBuilder::matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c,
                          cudnnBackendDescriptor_t m_override, cudnnBackendDescriptor_t n_override,
                          cudnnBackendDescriptor_t k_override) {
  Desc& mm = make(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
  mm.set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize("matmul descriptor");
  Desc& op = make(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
      .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
      .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
      .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.get());
  if (m_override) op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, m_override);
  if (n_override) op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, n_override);
  if (k_override) op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC, k_override);
  op.finalize("matmul operation");
  ops_.push_back(op.get());
}

void GraphBuilder::reduction(cudnnReduceTensorOp_t reduce, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
  Desc& rd = make(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
  rd.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce)
      .set_dtype(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
      .finalize("reduction descriptor");
  Desc& op = make(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd.get())
      .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
      .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
      .finalize("reduction operation");
  ops_.push_back(op.get());
}

void GraphBuilder::paged_load(cudnnBackendDescriptor_t container, cudnnBackendDescriptor_t seq_len,
                              cudnnBackendDescriptor_t page_table, cudnnBackendDescriptor_t y) {
  Desc& op = make(CUDNN_BACKEND_OPERATION_PAGED_CACHE_LOAD_DESCRIPTOR);
  op.set_desc(CUDNN_ATTR_OPERATION_PAGED_CACHE_LOAD_CONTAINER_DESC, container)
      .set_desc(CUDNN_ATTR_OPERATION_PAGED_CACHE_LOAD_SEQUENCE_DESC, seq_len)
      .set_desc(CUDNN_ATTR_OPERATION_PAGED_CACHE_LOAD_PAGE_TABLE_DESC, page_table)
      .set_desc(CUDNN_ATTR_OPERATION_PAGED_CACHE_LOAD_YDESC, y)
      .finalize("paged cache load operation");
  ops_.push_back(op.get());
}

Plan GraphBuilder::build(cudnnBackendDescriptor_t devprop) {
  Desc& graph = make(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  graph
      .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops_.size()), ops_.data())
      .finalize("operation graph");
  std::string tried;  // why each candidate failed, for the error message
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    auto heur = std::make_unique<Desc>(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    heur->set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph.get())
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
        .set_desc(CUDNN_ATTR_ENGINEHEUR_DEVICEPROP, devprop)
        .finalize("engine heuristics");
    int64_t count = 0;
    ok(api().get_attribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                           nullptr),
       "counting the engine configurations");
    std::vector<std::unique_ptr<Desc>> configs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (int64_t i = 0; i < count; ++i) {
      configs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR));
      raw.push_back(configs.back()->get());
    }
    int64_t got = 0;
    if (count > 0) {
      ok(api().get_attribute(heur->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                             raw.data()),
         "reading the engine configurations");
      // cuDNN drops the configurations that fail its support checks and says why only in its log
      // and its last-error message: keep that message (e.g. a missing libnvrtc) for the refusal.
      if (got == 0) {
        char last[1024] = {0};
        api().get_last_error_string(last, sizeof(last));
        std::string why = last;
        std::replace(why.begin(), why.end(), '\n', ' ');
        if (why.find("compiler.load()") != std::string::npos)
          why =
              "cuDNN's runtime-compiled engines cannot load libcuda.so.1 / libnvrtc.so.13 (put them on the "
              "library path): " +
              why;
        if (!why.empty() && tried.size() < 600) tried += (tried.empty() ? "" : "; ") + why.substr(0, 400);
      }
    }
    for (int64_t i = 0; i < got; ++i) {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      try {
        plan->set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, raw[i])
            .set_desc(CUDNN_ATTR_EXECUTION_PLAN_DEVICEPROP, devprop)
            .finalize("execution plan");
      } catch (const GraphError& e) {
        if (tried.size() < 600) tried += std::string(tried.empty() ? "" : "; ") + e.what();
        continue;
      }
      Plan p;
      ok(api().get_attribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, nullptr,
                             &p.workspace_bytes),
         "reading the plan's workspace size");
      // The engine's index, for logs only: failure to read it is not an error.
      Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
      cudnnBackendDescriptor_t e = engine.get();
      int64_t n = 0;
      if (api().get_attribute(raw[i], CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &n, &e) ==
          CUDNN_STATUS_SUCCESS)
        api().get_attribute(e, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &n, &p.engine_index);
      p.plan = plan->get();
      p.descs = std::move(descs_);
      p.descs.push_back(std::move(heur));
      p.descs.push_back(std::move(configs[i]));
      p.descs.push_back(std::move(plan));
      return p;
    }
  }
  throw GraphError("no cuDNN engine takes this graph" + (tried.empty() ? std::string() : ": " + tried));
}

}  // namespace cpinfer::cuda::cudnn
