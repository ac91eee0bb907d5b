#include "model/decode_graph.h"

#include <algorithm>

#include "core/log.h"

namespace cpinfer {

namespace {
int round_up(int n, int m) { return (n + m - 1) / m * m; }
}  // namespace

int decode_graph_batch(int n, int max_bs) {
  if (n < 1 || n > max_bs) return 0;
  const int b = n <= 1     ? 1
                : n <= 2   ? 2
                : n <= 4   ? 4
                : n <= 64  ? round_up(n, 8)
                : n <= 128 ? round_up(n, 16)
                : n <= 256 ? round_up(n, 32)
                           : round_up(n, 64);
  return std::min(b, max_bs);
}

int decode_graph_width(int max_blocks) {
  int w = 8;
  while (w < max_blocks) w *= 2;
  return w;
}

bool decode_graph_applies(const ForwardPlan& plan, int max_bs) {
  const int64_t n = plan.n_local();
  if (n < 1 || n > max_bs || plan.cp_size != 1 || plan.kv_shard) return false;
  if (int64_t(plan.attn.size()) != n || plan.n_all() != n || int64_t(plan.logit_rows_local.size()) != n) return false;
  if (plan.max_blocks < 1 || int64_t(plan.block_table.size()) != n * plan.max_blocks) return false;
  if (int64_t(plan.max_blocks) * plan.page_size > AttnBlock::kNoBound / 2) return false;
  for (int64_t i = 0; i < n; ++i) {
    const AttnBlock& a = plan.attn[size_t(i)];
    if (a.q_begin != i || a.q_len != 1 || a.seq != i || a.kv_begin != 0 || a.kv_end != AttnBlock::kNoBound)
      return false;
    if (plan.logit_rows_local[size_t(i)] != i) return false;
  }
  return true;
}

ForwardPlan pad_decode_plan(const ForwardPlan& plan, int batch, int width) {
  const int n = static_cast<int>(plan.n_local());
  CPI_CHECK(batch >= n && width >= plan.max_blocks, "pad_decode_plan: ", n, " rows of ", plan.max_blocks,
            " blocks do not fit ", batch, " x ", width);
  ForwardPlan p = plan;
  p.tokens.resize(size_t(batch), 0);
  p.positions.resize(size_t(batch), 0);
  p.slots_all.resize(size_t(batch), -1);  // padding stores no K/V
  p.rows_per_rank = {batch};
  p.max_blocks = width;
  p.block_table.assign(size_t(batch) * size_t(width), 0);
  for (int s = 0; s < n; ++s)
    std::copy_n(plan.block_table.begin() + int64_t(s) * plan.max_blocks, plan.max_blocks,
                p.block_table.begin() + int64_t(s) * width);
  for (int i = n; i < batch; ++i) {
    AttnBlock a;  // one query over an empty key range: out = 0
    a.q_begin = i;
    a.q_len = 1;
    a.seq = i;
    a.kv_end = 0;
    p.attn.push_back(a);
    p.logit_rows_local.push_back(i);
    p.logit_rows_all.push_back(LogitRow{i, 0});
  }
  p.logit_rows_per_rank = {batch};
  return p;
}

DecodeGraphs::~DecodeGraphs() = default;

bool DecodeGraphs::applies(const ForwardPlan& plan, int world_size) const {
  if (opt_.decode_graphs == DecodeGraphMode::Off || opt_.profiling || opt_.elide_comm || world_size != 1) return false;
  if (opt_.decode_graphs == DecodeGraphMode::On && (failed_ || !be_.graphs_supported())) return false;
  return decode_graph_applies(plan, opt_.cuda_graph_max_bs);
}

DecodeGraphs::Entry& DecodeGraphs::entry(int batch, int width) {
  auto [it, fresh] = graphs_.try_emplace({batch, width});
  Entry& e = it->second;
  if (!fresh) return e;
  // One I32 buffer: ids, positions, slots, logit rows [batch] each, blocks [batch, 6], table [batch, width].
  const int64_t b = batch;
  const int64_t words = 4 * b + b * kAttnBlockFields + b * width;
  e.inputs = Buffer(be_, size_t(words) * sizeof(int32_t));
  auto* base = static_cast<int32_t*>(e.inputs.data());
  auto view = [&](int64_t offset, std::initializer_list<int64_t> dims) {
    return Tensor(base + offset, DType::I32, dims, be_.device());
  };
  e.dev.ids = view(0, {b});
  e.dev.attn.positions = view(b, {b});
  e.dev.attn.slots = view(2 * b, {b});
  e.dev.logit_idx = view(3 * b, {b});
  e.dev.attn.blocks = view(4 * b, {b, kAttnBlockFields});
  e.dev.attn.block_table = view(4 * b + b * kAttnBlockFields, {b, width});
  return e;
}

Tensor DecodeGraphs::run(const ForwardPlan& plan, const Forward& forward) {
  const int n = static_cast<int>(plan.n_local());
  const int batch = decode_graph_batch(n, opt_.cuda_graph_max_bs);
  const int width = decode_graph_width(plan.max_blocks);
  CPI_CHECK(batch > 0, "DecodeGraphs::run: a batch of ", n, " is above --cuda-graph-max-bs ", opt_.cuda_graph_max_bs);
  const ForwardPlan padded = pad_decode_plan(plan, batch, width);

  // Graphs recorded before device memory was freed may point at it: record them again.
  if (be_.memory_epoch() != epoch_) {
    graphs_.clear();
    epoch_ = be_.memory_epoch();
  }
  Entry& e = entry(batch, width);
  e.dev.attn.key_bound = width * plan.page_size;
  std::vector<int32_t> host;
  host.reserve(e.inputs.bytes() / sizeof(int32_t));
  host.insert(host.end(), padded.tokens.begin(), padded.tokens.end());
  host.insert(host.end(), padded.positions.begin(), padded.positions.end());
  host.insert(host.end(), padded.slots_all.begin(), padded.slots_all.end());
  host.insert(host.end(), padded.logit_rows_local.begin(), padded.logit_rows_local.end());
  const std::vector<int32_t> blocks = flatten_attn_blocks(padded.attn);
  host.insert(host.end(), blocks.begin(), blocks.end());
  host.insert(host.end(), padded.block_table.begin(), padded.block_table.end());
  be_.upload(e.inputs.data(), host.data(), host.size() * sizeof(int32_t));

  if (opt_.decode_graphs == DecodeGraphMode::Eager) {
    ++stats_.padded_eager;
    return forward(padded, e.dev).slice(0, n);
  }
  if (e.graph) {
    e.graph->replay();
    ++stats_.replays;
    return e.logits.slice(0, n);
  }

  // Warm-up: the step itself, eagerly, so that every buffer it needs has its final size.
  Tensor warm = forward(padded, e.dev);
  be_.sync();
  if (be_.memory_epoch() != epoch_) {  // it grew something: every other graph is stale
    for (auto it = graphs_.begin(); it != graphs_.end();)
      it = it->first == std::make_pair(batch, width) ? std::next(it) : graphs_.erase(it);
    epoch_ = be_.memory_epoch();
  }
  try {
    be_.begin_capture();
    Tensor logits;
    try {
      logits = forward(padded, e.dev);
    } catch (...) {
      try {
        be_.end_capture();
      } catch (const Error&) {
      }
      throw;
    }
    e.graph = be_.end_capture();
    e.logits = logits;
  } catch (const Error& err) {
    // Nothing recorded ran, and the warm-up computed this step: keep its logits, go on eagerly.
    failed_ = true;
    graphs_.erase({batch, width});
    log_warn("decode steps run without CUDA graphs from now on: recording one failed: ", err.what());
    return warm.slice(0, n);
  }
  CPI_CHECK(be_.memory_epoch() == epoch_, "device memory was freed while a decode graph was recorded");
  ++stats_.captures;
  e.graph->replay();
  ++stats_.replays;
  return e.logits.slice(0, n);
}

}  // namespace cpinfer
