#include "tokenizer/pretokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <nlohmann/json.hpp>

#include <memory>

#include "core/check.h"

namespace cpinfer::tok_detail {

namespace {
// ByteLevel's own split when use_regex is true (GPT-2).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string pcre2_message(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}
}  // namespace

class Regex {
 public:
  Regex(std::string_view pattern, bool literal, const std::string& source) {
    int err = 0;
    PCRE2_SIZE err_off = 0;
    // PCRE2 refuses UCP together with LITERAL (it has no classes to widen anyway).
    const uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), opts, &err, &err_off, nullptr);
    CPI_CHECK(code_ != nullptr, source, ": pre-tokenizer regex does not compile (", pcre2_message(err), " at offset ",
              err_off, "): ", pattern);
    // JIT makes the split several times faster; the interpreter is a correct fallback.
    jit_ = pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE) == 0;
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Calls on_piece(begin, end, is_match) for every gap and match in order, covering text.
  template <class F>
  void for_each_piece(std::string_view text, F&& on_piece) const {
    const std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> md(
        pcre2_match_data_create_from_pattern(code_, nullptr), &pcre2_match_data_free);
    CPI_CHECK(md != nullptr, "out of memory creating PCRE2 match data");
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t pos = 0, gap_start = 0;
    while (pos < text.size()) {
      // The text was validated as UTF-8 by the caller, so PCRE2 need not check it again.
      int rc =
          jit_ ? pcre2_jit_match(code_, subject, text.size(), pos, 0, md.get(), nullptr) : PCRE2_ERROR_JIT_STACKLIMIT;
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT)  // the interpreter keeps its backtracking on the heap
        rc = pcre2_match(code_, subject, text.size(), pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      CPI_CHECK(rc >= 0, "pre-tokenizer regex failed on a ", text.size(), "-byte input: ", pcre2_message(rc));
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md.get());
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // empty match: step over one character, which stays in the gap
        pos = b + 1;
        while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
        continue;
      }
      if (b > gap_start) on_piece(gap_start, b, false);
      on_piece(b, e, true);
      pos = gap_start = e;
    }
    if (gap_start < text.size()) on_piece(gap_start, text.size(), false);
  }

 private:
  pcre2_code* code_ = nullptr;
  bool jit_ = false;
};

PreTokenizer::PreTokenizer() = default;
PreTokenizer::~PreTokenizer() = default;
PreTokenizer::PreTokenizer(PreTokenizer&&) noexcept = default;
PreTokenizer& PreTokenizer::operator=(PreTokenizer&&) noexcept = default;

PreTokenizer PreTokenizer::from_json(const nlohmann::json& j, const std::string& source) {
  PreTokenizer pt;
  if (j.is_null()) return pt;
  CPI_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), source,
            ": pre_tokenizer must be an object with a \"type\"");
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    CPI_CHECK(j.contains("pretokenizers") && j["pretokenizers"].is_array(), source,
              ": Sequence pre_tokenizer needs a \"pretokenizers\" array");
    for (const auto& sub : j["pretokenizers"]) {
      PreTokenizer part = from_json(sub, source);
      for (auto& s : part.steps_) pt.steps_.push_back(std::move(s));
    }
  } else if (type == "Split") {
    CPI_CHECK(j.contains("pattern") && j["pattern"].is_object(), source, ": Split pre_tokenizer needs a \"pattern\"");
    const auto& p = j["pattern"];
    const bool literal = p.contains("String");
    CPI_CHECK((literal && p["String"].is_string()) || (p.contains("Regex") && p["Regex"].is_string()), source,
              ": Split pattern must be {\"Regex\": ...} or {\"String\": ...}");
    const std::string pattern = literal ? p["String"].get<std::string>() : p["Regex"].get<std::string>();
    const std::string behavior = j.value("behavior", std::string("Isolated"));
    CPI_CHECK(behavior == "Isolated" || behavior == "Removed", source, ": Split behavior '", behavior,
              "' is not supported (Isolated, Removed are)");
    CPI_CHECK(!j.value("invert", false), source, ": Split with invert=true is not supported");
    pt.steps_.push_back({Step::Kind::kSplit, std::make_shared<Regex>(pattern, literal, source), behavior == "Removed"});
  } else if (type == "ByteLevel") {
    // The byte-level mapping itself happens in the BPE model; here only its optional split.
    if (j.value("add_prefix_space", false)) pt.steps_.push_back({Step::Kind::kPrefixSpace, nullptr});
    if (j.value("use_regex", true))
      pt.steps_.push_back({Step::Kind::kSplit, std::make_shared<Regex>(kGpt2Pattern, false, source)});
  } else {
    CPI_FAIL(source, ": pre_tokenizer type '", type,
             "' is not supported (Sequence, Split, ByteLevel are; cpinfer targets byte-level BPE)");
  }
  return pt;
}

void PreTokenizer::split(std::string_view text, std::vector<std::string>& words) const {
  if (text.empty()) return;
  std::vector<std::string> cur{std::string(text)}, next;
  for (const Step& step : steps_) {
    next.clear();
    for (std::string& piece : cur) {
      if (step.kind == Step::Kind::kPrefixSpace) {
        if (piece.front() != ' ') piece.insert(piece.begin(), ' ');
        next.push_back(std::move(piece));
        continue;
      }
      step.regex->for_each_piece(piece, [&](size_t b, size_t e, bool is_match) {
        if (!(is_match && step.remove_matches)) next.emplace_back(piece, b, e - b);
      });
    }
    cur.swap(next);
  }
  for (auto& w : cur) words.push_back(std::move(w));
}

}  // namespace cpinfer::tok_detail
