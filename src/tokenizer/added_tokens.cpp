#include "tokenizer/added_tokens.h"

#include <algorithm>

#include "tokenizer/utf8.h"

namespace cpinfer::tok_detail {

AddedTokenMatcher::AddedTokenMatcher(std::vector<AddedToken> tokens) : by_byte_(256) {
  std::erase_if(tokens, [](const AddedToken& t) { return t.content.empty(); });
  std::stable_sort(tokens.begin(), tokens.end(),
                   [](const AddedToken& a, const AddedToken& b) { return a.content.size() > b.content.size(); });
  tokens_ = std::move(tokens);
  for (uint32_t i = 0; i < tokens_.size(); ++i)
    by_byte_[static_cast<unsigned char>(tokens_[i].content[0])].push_back(i);
}

void AddedTokenMatcher::split(std::string_view text, bool parse_special, std::vector<Segment>& out) const {
  size_t plain_start = 0;  // start of the pending plain segment
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* hit = nullptr;
    for (uint32_t idx : by_byte_[static_cast<unsigned char>(text[pos])]) {
      const AddedToken& t = tokens_[idx];
      if (t.special && !parse_special) continue;
      if (text.compare(pos, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        size_t s;
        const bool word_before = pos > 0 && utf8::is_word_char(utf8::prev_cp(text, pos, &s));
        const size_t end = pos + t.content.size();
        const bool word_after = end < text.size() && utf8::is_word_char(utf8::next_seq(text, end).cp);
        if (word_before || word_after) continue;
      }
      hit = &t;  // candidates are longest first
      break;
    }
    if (hit == nullptr) {
      ++pos;
      continue;
    }
    size_t begin = pos, end = pos + hit->content.size();
    if (hit->lstrip) {
      while (begin > plain_start) {
        size_t s;
        if (!utf8::is_whitespace(utf8::prev_cp(text, begin, &s))) break;
        begin = s;
      }
    }
    if (hit->rstrip) {
      while (end < text.size()) {
        const utf8::Seq q = utf8::next_seq(text, end);
        if (q.kind != utf8::SeqKind::kValid || !utf8::is_whitespace(q.cp)) break;
        end += q.len;
      }
    }
    if (begin > plain_start) out.push_back({plain_start, begin, -1});
    out.push_back({pos, pos + hit->content.size(), hit->id});
    pos = plain_start = end;
  }
  if (plain_start < text.size()) out.push_back({plain_start, text.size(), -1});
}

}  // namespace cpinfer::tok_detail
