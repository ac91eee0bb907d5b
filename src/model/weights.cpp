#include "model/weights.h"

#include <algorithm>
#include <cstdint>
#include <deque>
#include <string>

#include "core/check.h"
#include "core/log.h"
#include "loader/quant.h"
#include "model/registry.h"
#include "model/weight_map.h"

namespace cpinfer {

ExpertRange expert_range(int n_experts, int rank, int world) {
  CPI_CHECK(world >= 1, "expert_range: world size must be >= 1, got ", world);
  CPI_CHECK(rank >= 0 && rank < world, "expert_range: rank ", rank, " is outside world size ", world);
  CPI_CHECK(n_experts >= 0, "expert_range: negative expert count ", n_experts);
  const int base = n_experts / world, rem = n_experts % world;
  ExpertRange r;
  r.first = rank * base + std::min(rank, rem);
  r.count = base + (rank < rem ? 1 : 0);
  return r;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// One byte range of a checkpoint tensor that becomes one Tensor of the model.
struct LoadItem {
  const TensorInfo* info = nullptr;
  size_t offset = 0;  // bytes into info->data
  size_t nbytes = 0;
  std::vector<int64_t> shape;
  Tensor* dst = nullptr;
  const TensorInfo* scale = nullptr;  // an FP8 weight's block scales
  Tensor* scale_dst = nullptr;        // set: the weight stays FP8 (codes + F32 scales); else BF16
  LinearShard shard;                  // the rank's slice of a 2-D tensor (attention TP); shape is the slice's
};

// Checkpoint names with their numeric parts (layer, expert) as '*', each pattern once, in order:
// "model.layers.*.self_attn.q_proj.weight, model.layers.*.mlp.experts.*.up_proj.weight".
std::string name_patterns(const std::vector<std::string>& names) {
  std::vector<std::string> seen;
  std::string out;
  for (const std::string& n : names) {
    std::string p, part;
    for (size_t i = 0; i <= n.size(); ++i) {
      if (i < n.size() && n[i] != '.') {
        part += n[i];
        continue;
      }
      const bool number =
          !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; });
      p += (p.empty() ? "" : ".") + (number ? std::string("*") : part);
      part.clear();
    }
    if (std::find(seen.begin(), seen.end(), p) != seen.end()) continue;
    out += (seen.empty() ? "" : ", ") + p;
    seen.push_back(p);
  }
  return out;
}

size_t fp8_scale_count(const std::vector<int64_t>& shape) {
  return size_t((shape[0] + kFp8Block - 1) / kFp8Block) * size_t((shape[1] + kFp8Block - 1) / kFp8Block);
}

// Collects every tensor this rank needs (validating as it goes) before any byte is copied, so a
// bad checkpoint fails fast and progress knows the total.
class Planner {
 public:
  // keep_fp8: FP8 linear weights stay FP8 (the back-end computes with them).
  Planner(const Checkpoint& ckpt, const QuantConfig& quant, bool keep_fp8)
      : ckpt_(ckpt), quant_(quant), keep_fp8_(keep_fp8) {}

  // Checks dtype and shape of tensor `name` and plans all of it into `dst`; an FP8 weight with its
  // `_scale_inv` tensor, which stays FP8 (scales into `scale_dst`) when it is a linear layer's
  // weight and the back-end takes FP8, and becomes BF16 otherwise.
  // With a `shard` only the rank's slice of the (full, checked) tensor is planned.
  void whole(const std::string& name, std::vector<int64_t> expect, const char* why, Tensor* dst, Tensor* scale_dst,
             const LinearShard& shard = {}) {
    const TensorInfo& t = checked(name, expect, why);
    const TensorInfo* scale = nullptr;
    std::vector<int64_t> local = shard.local_shape(expect);
    int64_t local_numel = 1;
    for (int64_t d : local) local_numel *= d;
    size_t nbytes = size_t(local_numel) * dtype_size(t.dtype);
    if (t.dtype == DType::F8E4M3) {
      CPI_CHECK(t.shape.size() == 2, "tensor '", name, "' in ", t.file,
                " is F8_E4M3, but only 2-D linear weights may be FP8");
      scale = ckpt_.find(name + "_scale_inv");
      CPI_CHECK(scale != nullptr, "missing tensor '", name, "_scale_inv' in ", ckpt_.dir(),
                " (the block scales of the FP8 weight '", name, "')");
      const size_t n_scales = fp8_scales_f32(t, *scale, quant_).size();  // checks the scales now
      if (!keep_fp8_ || scale_dst == nullptr) {
        nbytes = size_t(local_numel) * dtype_size(DType::BF16);
        scale_dst = nullptr;
        dequantized_.push_back(name);
      } else {
        check_fp8_slice(shard, t.shape[0], t.shape[1], name);  // before any byte is read
        nbytes += (shard.split == LinearShard::Split::None ? n_scales : fp8_scale_count(local)) * sizeof(float);
        kept_.push_back(name);
      }
    } else {
      scale_dst = nullptr;
    }
    items_.push_back({&t, 0, nbytes, std::move(local), dst, scale, scale_dst, shard});
  }

  // Plans rows [first, first + count) of dimension 0 of `t` (already checked) into `dst`.
  void rows(const TensorInfo& t, int64_t first, int64_t count, Tensor* dst) {
    CPI_CHECK(t.dtype != DType::F8E4M3, "tensor '", t.name, "' in ", t.file,
              ": fused FP8 expert tensors are not supported (FP8 checkpoints with one tensor per expert are)");
    const size_t row_bytes = t.shape[0] == 0 ? 0 : t.nbytes / static_cast<size_t>(t.shape[0]);
    std::vector<int64_t> shape = t.shape;
    shape[0] = count;
    items_.push_back({&t,
                      static_cast<size_t>(first) * row_bytes,
                      static_cast<size_t>(count) * row_bytes,
                      std::move(shape),
                      dst,
                      nullptr,
                      nullptr,
                      {}});
  }

  const TensorInfo& checked(const std::string& name, const std::vector<int64_t>& expect, const char* why) {
    const TensorInfo& t = ckpt_.get(name);
    CPI_CHECK(t.dtype == DType::BF16 || t.dtype == DType::F16 || t.dtype == DType::F32 ||
                  (t.dtype == DType::F8E4M3 && quant_.fp8),
              "tensor '", name, "' in ", t.file, " has dtype ", dtype_name(t.dtype),
              "; weights must be BF16, F16 or F32",
              t.dtype == DType::F8E4M3 ? " (F8_E4M3 needs an FP8 quantization_config in config.json)" : "");
    CPI_CHECK(t.shape == expect, "tensor '", name, "' in ", t.file, " has shape ", shape_str(t.shape), ", expected ",
              shape_str(expect), " (", why, ")");
    return t;
  }

  const TensorInfo* find_any(const std::string& a, const std::string& b) const {
    const TensorInfo* t = ckpt_.find(a);
    return t ? t : ckpt_.find(b);
  }

  std::vector<LoadItem>& items() { return items_; }
  const std::vector<std::string>& kept_fp8() const { return kept_; }
  const std::vector<std::string>& dequantized_fp8() const { return dequantized_; }

 private:
  const Checkpoint& ckpt_;
  const QuantConfig& quant_;
  bool keep_fp8_;
  std::vector<LoadItem> items_;
  std::vector<std::string> kept_, dequantized_;  // FP8 checkpoint weights by what they become
};

std::string why(const char* fmt_a, int64_t a, const char* fmt_b = nullptr, int64_t b = 0) {
  std::string s = std::string(fmt_a) + "=" + std::to_string(a);
  if (fmt_b) s += ", " + std::string(fmt_b) + "=" + std::to_string(b);
  return s;
}

}  // namespace

ModelWeights load_weights(const Checkpoint& ckpt, const ModelConfig& cfg, Backend& backend, int rank, int world,
                          const std::function<void(size_t done_bytes, size_t total_bytes)>& progress, TpShard tp) {
  CPI_CHECK(world >= 1 && rank >= 0 && rank < world, "load_weights: rank ", rank, " is outside world size ", world);
  const ExpertRange share = expert_range(cfg.num_experts, rank, world);
  ModelWeights w;
  const WeightMap map = model_family(cfg.architecture).weight_map(cfg, w, share, tp);
  // FP8 weights stay FP8 where the back-end computes with them; its kernels take kFp8Block blocks.
  const bool keep_fp8 =
      backend.fp8_weights_supported() && cfg.quant.block_n == kFp8Block && cfg.quant.block_k == kFp8Block;
  Planner plan(ckpt, cfg.quant, keep_fp8);
  // Fused expert ranges [count, 2I, H] / [count, H, I]; the per-expert views are cut afterwards.
  struct Fused {
    ExpertShard* shard;
    int64_t width, hidden;
    Tensor gate_up, down;
  };
  std::deque<Fused> fused;  // deque: the planner keeps pointers into its elements

  auto plan_experts = [&](const ExpertEntry& x) {
    const int64_t E = x.n_experts, Im = x.width, H = x.hidden;
    const ExpertShard& S = *x.dst;
    const std::string& ex = x.prefix;
    const TensorInfo* gate_up = plan.find_any(ex + "gate_up_proj", ex + "gate_up_proj.weight");
    if (gate_up != nullptr) {
      // transformers 5 fused layout: gate rows first, then up, per expert.
      const std::string gu_why =
          why("num_experts", E, "2*moe_intermediate_size", 2 * Im) + ", hidden_size=" + std::to_string(H);
      const TensorInfo& gu = plan.checked(gate_up->name, {E, 2 * Im, H}, gu_why.c_str());
      const TensorInfo* down = plan.find_any(ex + "down_proj", ex + "down_proj.weight");
      CPI_CHECK(down != nullptr, "missing tensor '", ex, "down_proj' in ", ckpt.dir(), " (", gu.name,
                " is fused, so the fused down_proj must be there too)");
      const std::string dn_why =
          why("num_experts", E, "hidden_size", H) + ", moe_intermediate_size=" + std::to_string(Im);
      const TensorInfo& dn = plan.checked(down->name, {E, H, Im}, dn_why.c_str());
      if (S.count > 0) {
        fused.push_back({x.dst, Im, H, {}, {}});
        plan.rows(gu, S.first, S.count, &fused.back().gate_up);
        plan.rows(dn, S.first, S.count, &fused.back().down);
      }
      return;
    }
    const std::string exp_why = why("moe_intermediate_size", Im, "hidden_size", H);
    for (int32_t k = 0; k < S.count; ++k) {
      const std::string e = ex + std::to_string(S.first + k) + ".";
      Weight &g = x.dst->gate[static_cast<size_t>(k)], &u = x.dst->up[static_cast<size_t>(k)],
             &d = x.dst->down[static_cast<size_t>(k)];
      plan.whole(e + "gate_proj.weight", {Im, H}, exp_why.c_str(), &g, &g.scale);
      plan.whole(e + "up_proj.weight", {Im, H}, exp_why.c_str(), &u, &u.scale);
      plan.whole(e + "down_proj.weight", {H, Im}, exp_why.c_str(), &d, &d.scale);
    }
  };
  size_t next_experts = 0;
  for (size_t i = 0; i <= map.tensors.size(); ++i) {
    while (next_experts < map.experts.size() && map.experts[next_experts].position == i)
      plan_experts(map.experts[next_experts++]);
    if (i == map.tensors.size()) break;
    const WeightEntry& e = map.tensors[i];
    if (!e.missing_hint.empty())
      CPI_CHECK(ckpt.find(e.name) != nullptr, "missing tensor '", e.name, "' in ", ckpt.dir(), " (", e.missing_hint,
                ")");
    plan.whole(e.name, e.shape, e.why.c_str(), e.dst, e.scale_dst, e.shard);
  }

  // ---- materialize: views into the mmap on the CPU back-end, uploads elsewhere.
  size_t total = 0;
  for (const LoadItem& it : plan.items()) total += it.nbytes;
  const bool host = backend.device() == Device::CPU;
  size_t done = 0;
  std::vector<uint16_t> dequantized;          // one FP8 weight at a time, as BF16
  std::vector<uint8_t> sliced;                // one column slice at a time (attention TP)
  std::deque<std::vector<float>> scales_f32;  // FP8 scales kept: uploaded from here
  for (const LoadItem& it : plan.items()) {
    const auto* src = static_cast<const uint8_t*>(it.info->data) + it.offset;
    Tensor t;
    t.dtype = it.info->dtype;
    size_t code_bytes = it.nbytes;
    const LinearShard& shard = it.shard;
    const bool split = shard.split != LinearShard::Split::None;
    // A column slice is copied into `sliced`; the previous weight's upload may still read it.
    if (split && shard.split == LinearShard::Split::Cols && !host) backend.sync();
    if (it.scale_dst != nullptr) {
      // F32 scales (BF16 ones widened exactly): the codes stay as stored, the scales are tiny.
      const int64_t n = it.info->shape[0], k = it.info->shape[1];
      scales_f32.push_back(
          slice_fp8_scales(shard, fp8_scales_f32(*it.info, *it.scale, cfg.quant), n, k, it.info->name));
      const std::vector<float>& s = scales_f32.back();
      Buffer buf(backend, s.size() * sizeof(float));
      if (!s.empty()) backend.upload(buf.data(), s.data(), s.size() * sizeof(float));
      const int64_t sn = (it.shape[0] + kFp8Block - 1) / kFp8Block, sk = (it.shape[1] + kFp8Block - 1) / kFp8Block;
      *it.scale_dst = Tensor(buf.data(), DType::F32, {sn, sk}, backend.device());
      w.owned.push_back(std::move(buf));
      code_bytes = size_t(it.shape[0] * it.shape[1]);
      src = static_cast<const uint8_t*>(slice_host(shard, src, n, k, 1, sliced));
    } else if (it.scale != nullptr) {
      // Dequantized: a row slice dequantizes only its rows; a column slice all rows, then cut.
      const int64_t n = it.info->shape[0], k = it.info->shape[1];
      const bool rows_only = shard.split == LinearShard::Split::Rows;
      const int64_t row0 = rows_only ? shard.first : 0, n_rows = rows_only ? shard.count : n;
      dequantized.resize(static_cast<size_t>(n_rows * k));
      if (!host) backend.sync();  // the previous weight's upload read this buffer
      dequantize_fp8_rows(*it.info, *it.scale, cfg.quant, row0, n_rows, DType::BF16, dequantized.data());
      src = reinterpret_cast<const uint8_t*>(dequantized.data());
      if (shard.split == LinearShard::Split::Cols)
        src = static_cast<const uint8_t*>(slice_host(shard, src, n, k, dtype_size(DType::BF16), sliced));
      t.dtype = DType::BF16;
    } else if (split) {
      src = static_cast<const uint8_t*>(
          slice_host(shard, src, it.info->shape[0], it.info->shape[1], dtype_size(t.dtype), sliced));
    }
    const bool in_mmap = shard.split != LinearShard::Split::Cols;  // a column slice is a copy
    t.ndim = static_cast<int>(it.shape.size());
    CPI_CHECK(t.ndim <= Tensor::kMaxDims, "tensor '", it.info->name, "' has ", t.ndim, " dimensions");
    for (int i = 0; i < t.ndim; ++i) t.shape[static_cast<size_t>(i)] = it.shape[static_cast<size_t>(i)];
    const bool aligned = reinterpret_cast<uintptr_t>(src) % dtype_size(t.dtype) == 0;
    if (host && aligned && t.dtype == it.info->dtype && in_mmap) {
      t.data = const_cast<uint8_t*>(src);  // read-only mapping: the model never writes weights
      t.device = Device::CPU;
    } else {
      Buffer buf(backend, code_bytes);
      if (code_bytes) backend.upload(buf.data(), src, code_bytes);
      t.data = buf.data();
      t.device = backend.device();
      w.owned.push_back(std::move(buf));
    }
    *it.dst = t;
    done += it.nbytes;
    if (progress) progress(done, total);
  }
  if (!w.owned.empty()) backend.sync();  // uploads are stream-ordered; sources are the mmap
  if (const size_t n_fp8 = plan.kept_fp8().size() + plan.dequantized_fp8().size(); n_fp8 > 0) {
    std::string report = "FP8 checkpoint: " + std::to_string(n_fp8) + " of " + std::to_string(plan.items().size()) +
                         " weights are F8_E4M3 with " + std::to_string(cfg.quant.block_n) + "x" +
                         std::to_string(cfg.quant.block_k) + " block scales";
    if (!plan.kept_fp8().empty())
      report += "; " + std::to_string(plan.kept_fp8().size()) +
                " kept as FP8 (1 byte per weight + F32 scales) on the " + backend.name() +
                " back-end: " + name_patterns(plan.kept_fp8());
    if (!plan.dequantized_fp8().empty())
      report += "; " + std::to_string(plan.dequantized_fp8().size()) + " dequantized to BF16 at load for the " +
                backend.name() + " back-end" +
                (keep_fp8 ? " (not a weight its FP8 kernels take)" : " (it computes with BF16 weights)") + ": " +
                name_patterns(plan.dequantized_fp8());
    log_info(report, "; the others (norms, embeddings, router, LM head) as stored");
  }
  w.bytes = total;
  if (map.tie_lm_head) w.lm_head = w.embed;

  for (Fused& f : fused) {
    ExpertShard& S = *f.shard;
    const int64_t Im = f.width, H = f.hidden;
    const size_t ds = dtype_size(f.gate_up.dtype);
    for (int32_t k = 0; k < S.count; ++k) {
      auto* gu = static_cast<uint8_t*>(f.gate_up.data) + static_cast<size_t>(k * 2 * Im * H) * ds;
      S.gate[static_cast<size_t>(k)] = Tensor(gu, f.gate_up.dtype, {Im, H}, f.gate_up.device);
      S.up[static_cast<size_t>(k)] =
          Tensor(gu + static_cast<size_t>(Im * H) * ds, f.gate_up.dtype, {Im, H}, f.gate_up.device);
      S.down[static_cast<size_t>(k)] = f.down.slice(k, 1).view({H, Im});
    }
  }
  return w;
}

}  // namespace cpinfer
