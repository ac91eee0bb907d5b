#include "loader/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"

namespace cpinfer {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// The reference implementation refuses larger headers; a bigger one is a corrupt size field.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

bool parse_dtype(const std::string& s, DType* out) {
  static const std::pair<const char*, DType> kTable[] = {
      {"BF16", DType::BF16}, {"F16", DType::F16}, {"F32", DType::F32},        {"I32", DType::I32},
      {"I64", DType::I64},   {"U8", DType::U8},   {"F8_E4M3", DType::F8E4M3},
  };
  for (const auto& [name, t] : kTable) {
    if (s == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

}  // namespace

// A read-only private mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path) : path_(path) {
    RegularFile f(path);  // refuses FIFOs and devices without blocking on them
    size_ = static_cast<size_t>(f.size());
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, f.fd(), 0);
      CPI_CHECK(p != MAP_FAILED, "cannot mmap ", path, " (", size_, " bytes): ", std::strerror(errno));
      data_ = p;
    }
  }
  ~MappedFile() {
    if (data_) ::munmap(data_, size_);
  }
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const void* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  void* data_ = nullptr;
  size_t size_ = 0;
};

std::vector<TensorInfo> parse_safetensors(const void* bytes, size_t size, const std::string& label,
                                          std::map<std::string, std::string>* metadata) {
  const auto* base = static_cast<const uint8_t*>(bytes);
  CPI_CHECK(size >= 8, label, ": truncated safetensors file (", size, " bytes, the 8-byte header size is missing)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];  // little-endian
  CPI_CHECK(header_len <= size - 8, label, ": header size ", header_len, " runs past the end of the file (", size,
            " bytes); the file is truncated or not safetensors");
  CPI_CHECK(header_len <= kMaxHeaderBytes, label, ": header size ", header_len, " exceeds the ", kMaxHeaderBytes,
            "-byte limit");
  CPI_CHECK(header_len >= 2 && base[8] == '{', label, ": header does not start with '{'; not a safetensors file");

  std::string_view text(reinterpret_cast<const char*>(base + 8), header_len);
  json header = parse_json_unique_keys(text, label + " header");
  CPI_CHECK(header.is_object(), label, ": header is not a JSON object");

  const uint64_t data_len = size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;

  struct Span {
    uint64_t begin, end;
    size_t index;
  };
  std::vector<TensorInfo> out;
  std::vector<Span> spans;
  out.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      CPI_CHECK(v.is_object(), label, ": __metadata__ must be an object of strings, got ", json_brief(v));
      for (auto m = v.begin(); m != v.end(); ++m) {
        CPI_CHECK(m.value().is_string(), label, ": __metadata__ value of '", m.key(), "' must be a string, got ",
                  json_brief(m.value()));
        if (metadata) (*metadata)[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    CPI_CHECK(!name.empty(), label, ": empty tensor name in the header");
    CPI_CHECK(v.is_object(), label, ": entry of tensor '", name, "' must be an object, got ", json_brief(v));

    TensorInfo info;
    info.name = name;
    info.file = label;
    auto dt = v.find("dtype");
    CPI_CHECK(dt != v.end() && dt->is_string(), label, ": tensor '", name, "' has no string 'dtype'");
    CPI_CHECK(parse_dtype(dt->get<std::string>(), &info.dtype), label, ": tensor '", name, "' has unsupported dtype '",
              dt->get<std::string>(), "' (supported: BF16, F16, F32, I32, I64, U8, F8_E4M3)");

    auto sh = v.find("shape");
    CPI_CHECK(sh != v.end() && sh->is_array(), label, ": tensor '", name, "' has no 'shape' array");
    uint64_t numel = 1;
    bool overflow = false;
    for (const json& d : *sh) {
      CPI_CHECK(d.is_number_unsigned() && d.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), label, ": tensor '",
                name, "' has an invalid dimension ", json_brief(d), " in shape ", json_brief(*sh),
                " (dimensions are non-negative integers)");
      uint64_t dim = d.get<uint64_t>();
      info.shape.push_back(static_cast<int64_t>(dim));
      overflow |= __builtin_mul_overflow(numel, dim, &numel);
    }
    uint64_t nbytes = 0;
    overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(info.dtype)), &nbytes);
    CPI_CHECK(!overflow, label, ": tensor '", name, "' shape ", json_brief(*sh), " overflows 64-bit byte counts");

    auto off = v.find("data_offsets");
    CPI_CHECK(off != v.end() && off->is_array() && off->size() == 2 && (*off)[0].is_number_unsigned() &&
                  (*off)[1].is_number_unsigned(),
              label, ": tensor '", name, "' needs 'data_offsets' [begin, end] of non-negative integers");
    uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
    CPI_CHECK(begin <= end && end <= data_len, label, ": tensor '", name, "' data_offsets [", begin, ", ", end,
              "] fall outside the data region of ", data_len, " bytes");
    CPI_CHECK(end - begin == nbytes, label, ": tensor '", name, "' has ", end - begin, " bytes but shape ",
              json_brief(*sh), " x ", dtype_name(info.dtype), " needs ", nbytes);
    info.nbytes = static_cast<size_t>(nbytes);
    info.data = data + begin;
    spans.push_back({begin, end, out.size()});
    out.push_back(std::move(info));
  }

  // The tensors must tile the data region exactly: no gaps (hidden bytes), no overlaps (two names
  // for the same bytes) and nothing left over at the end.
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin != b.begin ? a.begin < b.begin : a.end < b.end; });
  uint64_t pos = 0;
  for (const Span& s : spans) {
    const std::string& name = out[s.index].name;
    CPI_CHECK(s.begin >= pos, label, ": tensor '", name, "' data_offsets [", s.begin, ", ", s.end,
              "] overlap the previous tensor (which ends at ", pos, ")");
    CPI_CHECK(s.begin == pos, label, ": gap of ", s.begin - pos, " bytes before tensor '", name, "' at offset ", pos);
    pos = s.end;
  }
  CPI_CHECK(pos == data_len, label, ": data region is ", data_len, " bytes but the tensors cover only ", pos,
            " (trailing bytes)");
  return out;
}

Checkpoint::Checkpoint(Checkpoint&&) noexcept = default;
Checkpoint& Checkpoint::operator=(Checkpoint&&) noexcept = default;
Checkpoint::~Checkpoint() = default;

Checkpoint Checkpoint::open_file(const std::string& path) {
  std::error_code ec;
  CPI_CHECK(fs::exists(path, ec), "safetensors file ", path, " does not exist");
  Checkpoint ck;
  ck.dir_ = fs::path(path).parent_path().string();
  auto file = std::make_unique<MappedFile>(path);
  for (TensorInfo& t : parse_safetensors(file->data(), file->size(), path, &ck.metadata_)) {
    std::string name = t.name;
    ck.tensors_.emplace(std::move(name), std::move(t));
  }
  ck.files_.push_back(std::move(file));
  return ck;
}

Checkpoint Checkpoint::open(const std::string& dir) {
  std::error_code ec;
  CPI_CHECK(fs::is_directory(dir, ec), "checkpoint directory '", dir, "' does not exist or is not a directory");
  const fs::path root(dir);
  // Same order as transformers: a single model.safetensors wins over an index.
  const fs::path single = root / "model.safetensors";
  if (fs::exists(single, ec)) {
    Checkpoint ck = open_file(single.string());
    ck.dir_ = dir;
    return ck;
  }
  const fs::path index_path = root / "model.safetensors.index.json";
  if (!fs::exists(index_path, ec)) {
    // Fallback: exactly one *.safetensors file (some exporters name it after the model).
    std::vector<fs::path> found;
    for (const auto& e : fs::directory_iterator(root, ec))
      if (e.path().extension() == ".safetensors") found.push_back(e.path());
    CPI_CHECK(!found.empty(), "no model.safetensors, model.safetensors.index.json or *.safetensors file in ", dir);
    CPI_CHECK(found.size() == 1, found.size(), " .safetensors files in ", dir,
              " but no model.safetensors.index.json to say which tensors come from which");
    Checkpoint ck = open_file(found[0].string());
    ck.dir_ = dir;
    return ck;
  }

  const std::string index_label = index_path.string();
  json index = parse_json_unique_keys(read_regular_file(index_label), index_label);
  CPI_CHECK(index.is_object(), index_label, ": not a JSON object");
  auto wm = index.find("weight_map");
  CPI_CHECK(wm != index.end() && wm->is_object(), index_label, ": missing 'weight_map' object");
  CPI_CHECK(!wm->empty(), index_label, ": 'weight_map' is empty");

  Checkpoint ck;
  ck.dir_ = dir;
  // Open each shard once, in file-name order, and keep its parsed tensors until every map entry
  // has been matched.
  std::map<std::string, std::map<std::string, TensorInfo, std::less<>>> shards;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    CPI_CHECK(it.value().is_string(), index_label, ": weight_map entry of '", it.key(), "' must be a file name, got ",
              json_brief(it.value()));
    const std::string shard = it.value().get<std::string>();
    CPI_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard.find('\\') == std::string::npos &&
                  shard != "." && shard != "..",
              index_label, ": shard name '", shard, "' of tensor '", it.key(),
              "' must be a plain file name inside the checkpoint directory");
    if (shards.count(shard)) continue;
    const fs::path shard_path = root / shard;
    CPI_CHECK(fs::is_regular_file(shard_path, ec), index_label, " names shard '", shard, "' (for tensor '", it.key(),
              "') but ", shard_path.string(), " does not exist");
    auto file = std::make_unique<MappedFile>(shard_path.string());
    auto& tensors = shards[shard];
    std::map<std::string, std::string> meta;
    for (TensorInfo& t : parse_safetensors(file->data(), file->size(), shard_path.string(), &meta)) {
      std::string name = t.name;
      tensors.emplace(std::move(name), std::move(t));
    }
    if (ck.metadata_.empty()) ck.metadata_ = std::move(meta);
    ck.files_.push_back(std::move(file));
  }
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    const std::string shard = it.value().get<std::string>();
    auto& tensors = shards[shard];
    auto t = tensors.find(it.key());
    CPI_CHECK(t != tensors.end(), index_label, " lists tensor '", it.key(), "' in shard '", shard, "' but ",
              (root / shard).string(), " does not contain it");
    ck.tensors_.emplace(it.key(), t->second);
  }
  return ck;
}

const TensorInfo* Checkpoint::find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

const TensorInfo& Checkpoint::get(std::string_view name) const {
  const TensorInfo* t = find(name);
  CPI_CHECK(t != nullptr, "missing tensor '", name, "' in ", dir_);
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& [name, t] : tensors_) n += t.nbytes;
  return n;
}

// ---- writer

void SafetensorsWriter::add(const std::string& name, DType dtype, std::vector<int64_t> shape, const void* data) {
  CPI_CHECK(!name.empty() && name != "__metadata__", "SafetensorsWriter: invalid tensor name '", name, "'");
  for (const Entry& e : entries_) CPI_CHECK(e.name != name, "SafetensorsWriter: tensor '", name, "' added twice");
  uint64_t numel = 1;
  for (int64_t d : shape) {
    CPI_CHECK(d >= 0, "SafetensorsWriter: tensor '", name, "' has negative dimension ", d);
    CPI_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel), "SafetensorsWriter: tensor '", name,
              "' shape overflows");
  }
  size_t nbytes = static_cast<size_t>(numel) * dtype_size(dtype);
  CPI_CHECK(nbytes == 0 || data != nullptr, "SafetensorsWriter: tensor '", name, "' has no data");
  Entry e{name, dtype, std::move(shape), {}};
  e.bytes.resize(nbytes);
  if (nbytes) std::memcpy(e.bytes.data(), data, nbytes);
  entries_.push_back(std::move(e));
}

void SafetensorsWriter::add_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }

void SafetensorsWriter::write(const std::string& path) const {
  json header = json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  uint64_t offset = 0;
  for (const Entry& e : entries_) {
    header[e.name] = {{"dtype", std::string(dtype_name(e.dtype))},
                      {"shape", e.shape},
                      {"data_offsets", {offset, offset + e.bytes.size()}}};
    offset += e.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));

  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  CPI_CHECK(out.good(), "cannot create ", path, ": ", std::strerror(errno));
  out.write(reinterpret_cast<const char*>(len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const Entry& e : entries_)
    out.write(reinterpret_cast<const char*>(e.bytes.data()), static_cast<std::streamsize>(e.bytes.size()));
  out.close();
  CPI_CHECK(!out.fail(), "failed writing ", path, " (disk full?)");
}

}  // namespace cpinfer
