#include "tokenizer/bpe.h"

#include <nlohmann/json.hpp>

#include <queue>

#include "core/check.h"
#include "tokenizer/utf8.h"

namespace cpinfer::tok_detail {

namespace {
// Words longer than this are rare (long runs without spaces); caching them would only grow memory.
constexpr size_t kMaxCachedWordBytes = 256;
// The cache is dropped when it grows past this many words (a crude but bounded policy).
constexpr size_t kMaxCachedWords = 1 << 17;

std::array<char32_t, 256> make_byte_to_symbol() {
  std::array<char32_t, 256> table{};
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = printable ? static_cast<char32_t>(b) : next++;
  }
  return table;
}

std::array<int16_t, 324> make_symbol_to_byte() {
  std::array<int16_t, 324> table;
  table.fill(-1);
  const auto& fwd = byte_to_symbol();
  for (int b = 0; b < 256; ++b) table[fwd[b]] = static_cast<int16_t>(b);
  return table;
}

std::string describe(std::string_view s) {
  std::string out = "'";
  out.append(s.substr(0, 40));
  if (s.size() > 40) out.append("...");
  return out + "'";
}
}  // namespace

const std::array<char32_t, 256>& byte_to_symbol() {
  static const auto table = make_byte_to_symbol();
  return table;
}

int byte_of_symbol(char32_t cp) {
  static const auto table = make_symbol_to_byte();
  return cp < table.size() ? table[cp] : -1;
}

bool symbols_to_bytes(std::string_view symbols, std::string* bytes) {
  bytes->clear();
  for (size_t i = 0; i < symbols.size();) {
    const utf8::Seq q = utf8::next_seq(symbols, i);
    if (q.kind != utf8::SeqKind::kValid) return false;
    const int b = byte_of_symbol(q.cp);
    if (b < 0) return false;
    bytes->push_back(static_cast<char>(b));
    i += q.len;
  }
  return true;
}

BpeModel BpeModel::from_json(const nlohmann::json& model, const std::string& source) {
  CPI_CHECK(model.is_object(), source, ": \"model\" must be an object");
  const std::string type = model.value("type", std::string("BPE"));
  CPI_CHECK(type == "BPE", source, ": model type '", type,
            "' is not supported (cpinfer reads byte-level BPE tokenizers such as Qwen2/Qwen3)");
  auto string_option = [&](const char* key) {
    if (!model.contains(key) || model[key].is_null()) return std::string();
    CPI_CHECK(model[key].is_string(), source, ": model.", key, " must be a string");
    return model[key].get<std::string>();
  };
  CPI_CHECK(string_option("continuing_subword_prefix").empty() && string_option("end_of_word_suffix").empty(), source,
            ": BPE continuing_subword_prefix / end_of_word_suffix are not supported");
  CPI_CHECK(!model.value("byte_fallback", false), source,
            ": BPE byte_fallback (SentencePiece-style) is not supported; only byte-level BPE is");
  CPI_CHECK(!model.contains("dropout") || model["dropout"].is_null() ||
                (model["dropout"].is_number() && model["dropout"].get<double>() == 0.0),
            source, ": BPE dropout is not supported");

  BpeModel m;
  m.ignore_merges_ = model.value("ignore_merges", false);
  CPI_CHECK(model.contains("vocab") && model["vocab"].is_object(), source,
            ": model.vocab must be an object {token: id}");
  const auto& vocab = model["vocab"];
  struct Entry {
    std::string bytes;
    int32_t id;
    bool mappable;
  };
  std::vector<Entry> entries;
  entries.reserve(vocab.size());
  for (const auto& [token, id_json] : vocab.items()) {
    CPI_CHECK(id_json.is_number_integer(), source, ": vocab id of ", describe(token), " is not an integer");
    const int64_t id = id_json.get<int64_t>();
    CPI_CHECK(id >= 0 && id < (int64_t{1} << 30), source, ": vocab id ", id, " of ", describe(token),
              " is out of range");
    m.max_id_ = std::max(m.max_id_, static_cast<int32_t>(id));
    Entry e{std::string(), static_cast<int32_t>(id), true};
    if (!symbols_to_bytes(token, &e.bytes)) {
      // Not byte-level (can't come out of the merges); decode it as its UTF-8 text, as HF does.
      e.bytes = token;
      e.mappable = false;
    }
    entries.push_back(std::move(e));
  }
  // The id table is indexed by id: a vocab whose ids are far sparser than its entries (a corrupt
  // file with one id of 677 million) must not make us allocate gigabytes.
  CPI_CHECK(int64_t{m.max_id_} < 2 * static_cast<int64_t>(entries.size()) + 1024, source,
            ": vocab ids are sparse: ", entries.size(), " tokens but the largest id is ", m.max_id_);
  m.id_to_bytes_.resize(static_cast<size_t>(m.max_id_ + 1));
  std::vector<uint8_t> seen(m.id_to_bytes_.size(), 0);
  m.bytes_to_id_.reserve(entries.size());
  for (Entry& e : entries) {
    CPI_CHECK(!seen[e.id], source, ": vocab id ", e.id, " is used by two tokens");
    seen[e.id] = 1;
    m.id_to_bytes_[e.id] = std::move(e.bytes);
    const std::string& stored = m.id_to_bytes_[e.id];
    if (e.mappable) {
      m.bytes_to_id_.emplace(stored, e.id);
    } else {
      m.unmappable_.emplace(stored, e.id);
    }
  }
  for (int b = 0; b < 256; ++b) {
    const char byte = static_cast<char>(b);
    const auto it = m.bytes_to_id_.find(std::string_view(&byte, 1));
    CPI_CHECK(it != m.bytes_to_id_.end(), source, ": the vocab lacks the byte-level symbol for byte ", b, " (U+",
              std::hex, static_cast<uint32_t>(byte_to_symbol()[b]), std::dec,
              "); a byte-level BPE vocab must cover all 256 bytes");
    m.byte_ids_[b] = it->second;
  }

  CPI_CHECK(model.contains("merges") && model["merges"].is_array(), source,
            ": model.merges must be an array of \"a b\" strings or [a, b] pairs");
  const auto& merges = model["merges"];
  m.merges_.reserve(merges.size());
  std::string a_bytes, b_bytes, ab_bytes;
  for (size_t rank = 0; rank < merges.size(); ++rank) {
    const auto& mj = merges[rank];
    std::string_view a, b;
    if (mj.is_string()) {
      const std::string_view s = mj.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      CPI_CHECK(sp != std::string::npos && sp > 0 && sp + 1 < s.size() && s.find(' ', sp + 1) == std::string::npos,
                source, ": merge #", rank, " ", describe(s), " is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (mj.is_array() && mj.size() == 2 && mj[0].is_string() && mj[1].is_string()) {
      a = mj[0].get_ref<const std::string&>();
      b = mj[1].get_ref<const std::string&>();
    } else {
      CPI_FAIL(source, ": merge #", rank,
               " is neither an \"a b\" string nor an [a, b] pair: ", mj.dump().substr(0, 80));
    }
    const bool ok_a = symbols_to_bytes(a, &a_bytes), ok_b = symbols_to_bytes(b, &b_bytes);
    CPI_CHECK(ok_a && ok_b, source, ": merge #", rank, " (", describe(a), ", ", describe(b),
              ") is not made of byte-level symbols");
    const auto ia = m.bytes_to_id_.find(a_bytes), ib = m.bytes_to_id_.find(b_bytes);
    CPI_CHECK(ia != m.bytes_to_id_.end() && ib != m.bytes_to_id_.end(), source, ": merge #", rank, " (", describe(a),
              ", ", describe(b), ") uses a token that is not in the vocab");
    ab_bytes.assign(a_bytes).append(b_bytes);
    const auto im = m.bytes_to_id_.find(ab_bytes);
    CPI_CHECK(im != m.bytes_to_id_.end(), source, ": merge #", rank, " (", describe(a), ", ", describe(b),
              ") produces ", describe(std::string(a) + std::string(b)), " which is not in the vocab");
    const uint64_t key = (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
    m.merges_.emplace(key, Merge{static_cast<int32_t>(rank), im->second});  // first (lowest rank) wins
  }
  return m;
}

const std::string& BpeModel::id_bytes(int32_t id) const {
  static const std::string kEmpty;
  return id >= 0 && id <= max_id_ ? id_to_bytes_[id] : kEmpty;
}

std::optional<int32_t> BpeModel::id_of_bytes(std::string_view bytes) const {
  const auto it = bytes_to_id_.find(bytes);
  if (it == bytes_to_id_.end()) return std::nullopt;
  return it->second;
}

std::optional<int32_t> BpeModel::id_of_token(std::string_view token) const {
  std::string bytes;
  if (symbols_to_bytes(token, &bytes)) return id_of_bytes(bytes);
  const auto it = unmappable_.find(std::string(token));
  if (it == unmappable_.end()) return std::nullopt;
  return it->second;
}

const BpeModel::Merge* BpeModel::find_merge(int32_t a, int32_t b) const {
  const auto it = merges_.find((static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b));
  return it == merges_.end() ? nullptr : &it->second;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    out.push_back(byte_ids_[static_cast<unsigned char>(word[0])]);
    return;
  }
  if (ignore_merges_) {
    if (const auto id = id_of_bytes(word)) {
      out.push_back(*id);
      return;
    }
  }
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard lock(cache_->mu);
    const auto it = cache_->words.find(std::string(word));
    if (it != cache_->words.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t start = out.size();
  merge_word(word, out);
  if (cacheable) {
    std::lock_guard lock(cache_->mu);
    if (cache_->words.size() >= kMaxCachedWords) cache_->words.clear();
    cache_->words.emplace(std::string(word), std::vector<int32_t>(out.begin() + start, out.end()));
  }
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // One symbol per byte in a doubly linked list; a min-heap of candidate pairs ordered by
  // (rank, position) reproduces HF's merge order (lowest rank first, leftmost on ties).
  struct Sym {
    int32_t id;
    int32_t prev;
    int32_t next;
    bool alive;
  };
  struct Cand {
    int32_t rank;
    int32_t pos;    // left symbol
    int32_t right;  // right symbol when queued
    int32_t left_id, right_id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const auto n = static_cast<int32_t>(word.size());
  std::vector<Sym> syms(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i)
    syms[i] = {byte_ids_[static_cast<unsigned char>(word[i])], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push_pair = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = syms[left].next;
    if (right < 0) return;
    if (const Merge* mg = find_merge(syms[left].id, syms[right].id))
      heap.push({mg->rank, left, right, syms[left].id, syms[right].id});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!heap.empty()) {
    const Cand c = heap.top();
    heap.pop();
    Sym& l = syms[c.pos];
    // Stale entries: either side merged since it was queued (ids only change by growing).
    if (!l.alive || l.next != c.right || l.id != c.left_id) continue;
    Sym& r = syms[c.right];
    if (!r.alive || r.id != c.right_id) continue;
    l.id = find_merge(c.left_id, c.right_id)->id;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = c.pos;
    r.alive = false;
    push_pair(l.prev);
    push_pair(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

}  // namespace cpinfer::tok_detail
