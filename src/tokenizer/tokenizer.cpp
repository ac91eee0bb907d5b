#include "tokenizer/tokenizer.h"

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"
#include "core/log.h"
#include "tokenizer/impl.h"
#include "tokenizer/utf8.h"

namespace cpinfer {

using tok_detail::AddedToken;
using tok_detail::TokenizerImpl;
using json = nlohmann::json;

namespace {

bool parse_normalizer(const json& j, const std::string& source) {
  if (j.is_null()) return false;
  CPI_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), source,
            ": normalizer must be null or an object with a \"type\"");
  const std::string type = j["type"].get<std::string>();
  if (type == "NFC") return true;
  if (type == "Sequence" && j.contains("normalizers") && j["normalizers"].is_array()) {
    bool nfc = false;
    for (const auto& sub : j["normalizers"]) nfc = parse_normalizer(sub, source) || nfc;
    return nfc;
  }
  CPI_FAIL(source, ": normalizer '", type, "' is not supported (NFC or none are)");
}

void check_decoder(const json& j, const std::string& source) {
  if (j.is_null()) return;
  CPI_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(), source,
            ": decoder must be null or an object with a \"type\"");
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence" && j.contains("decoders") && j["decoders"].is_array()) {
    for (const auto& sub : j["decoders"]) check_decoder(sub, source);
    return;
  }
  CPI_CHECK(type == "ByteLevel", source, ": decoder '", type, "' is not supported (ByteLevel is)");
}

std::shared_ptr<TokenizerImpl> load(const json& root, const std::string& source) {
  CPI_CHECK(root.is_object(), source, ": a tokenizer.json must be a JSON object");
  CPI_CHECK(root.contains("model"), source, ": no \"model\" section (is this a tokenizer.json?)");
  auto impl = std::make_shared<TokenizerImpl>();
  impl->source = source;
  impl->bpe = tok_detail::BpeModel::from_json(root["model"], source);
  impl->nfc = parse_normalizer(root.value("normalizer", json()), source);
  impl->pre = tok_detail::PreTokenizer::from_json(root.value("pre_tokenizer", json()), source);
  check_decoder(root.value("decoder", json()), source);

  int32_t max_id = impl->bpe.max_id();
  std::vector<AddedToken> raw, normalized;
  const json added = root.value("added_tokens", json::array());
  CPI_CHECK(added.is_array(), source, ": added_tokens must be an array");
  for (const auto& a : added) {
    CPI_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() && a.contains("content") &&
                  a["content"].is_string(),
              source, ": every added token needs an integer \"id\" and a string \"content\": ", a.dump().substr(0, 80));
    AddedToken t;
    t.content = a["content"].get<std::string>();
    const int64_t id = a["id"].get<int64_t>();
    CPI_CHECK(id >= 0 && id < (int64_t{1} << 30), source, ": added token '", t.content, "' has id ", id,
              " out of range");
    CPI_CHECK(!t.content.empty(), source, ": added token ", id, " has empty content");
    t.id = static_cast<int32_t>(id);
    t.single_word = a.value("single_word", false);
    t.lstrip = a.value("lstrip", false);
    t.rstrip = a.value("rstrip", false);
    t.special = a.value("special", false);
    // HF default: normalized = !special.
    t.normalized = a.contains("normalized") && a["normalized"].is_boolean() ? a["normalized"].get<bool>() : !t.special;
    max_id = std::max(max_id, t.id);
    impl->added_by_content[t.content] = t.id;
    impl->added_by_id[t.id] = t;
    if (t.normalized && impl->nfc) {
      t.content = utf8::nfc(utf8::sanitize(t.content));  // HF matches the normalized form of the content
      normalized.push_back(std::move(t));
    } else {
      raw.push_back(std::move(t));
    }
  }
  impl->raw_added = tok_detail::AddedTokenMatcher(std::move(raw));
  impl->normalized_added = tok_detail::AddedTokenMatcher(std::move(normalized));
  impl->vocab_size = max_id + 1;
  return impl;
}

std::optional<int32_t> config_token(const json& cfg, const char* key, const Tokenizer& tok) {
  if (!cfg.contains(key)) return std::nullopt;
  const json& v = cfg[key];
  std::string name;
  if (v.is_string()) {
    name = v.get<std::string>();
  } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    name = v["content"].get<std::string>();
  } else {
    return std::nullopt;
  }
  return tok.token_id(name);
}

}  // namespace

Tokenizer::Tokenizer(std::shared_ptr<const TokenizerImpl> impl) : impl_(std::move(impl)) {}

namespace {
std::shared_ptr<TokenizerImpl> load_text(std::string_view json_text, const std::string& source) {
  const json root = parse_json(json_text, source);
  try {
    return load(root, source);
  } catch (const json::exception& e) {
    CPI_FAIL(source, ": malformed tokenizer.json: ", e.what());
  }
}
}  // namespace

Tokenizer Tokenizer::from_json_string(std::string_view json_text, const std::string& source) {
  return Tokenizer(load_text(json_text, source));
}

Tokenizer Tokenizer::from_file(const std::string& tokenizer_json_path) {
  return Tokenizer(load_text(read_regular_file(tokenizer_json_path), tokenizer_json_path));
}

Tokenizer Tokenizer::from_dir(const std::string& model_dir) {
  const std::filesystem::path dir(model_dir);
  const std::string tok_path = (dir / "tokenizer.json").string();
  CPI_CHECK(std::filesystem::exists(tok_path), "no tokenizer.json in '", model_dir,
            "' (cpinfer needs the Hugging Face tokenizer.json next to the weights)");
  auto impl = load_text(read_regular_file(tok_path), tok_path);
  Tokenizer tok(impl);
  const std::string cfg_path = (dir / "tokenizer_config.json").string();
  if (std::filesystem::exists(cfg_path)) {
    const json cfg = parse_json_unique_keys(read_regular_file(cfg_path), cfg_path);
    CPI_CHECK(cfg.is_object(), cfg_path, " must be a JSON object");
    impl->eos_id = config_token(cfg, "eos_token", tok);
    impl->pad_id = config_token(cfg, "pad_token", tok);
    // render_chat is the Qwen3 template in C++; say so when the model ships a different one.
    const json tmpl = cfg.value("chat_template", json());
    if (tmpl.is_string() && tmpl.get<std::string>().find("<|im_start|>") == std::string::npos)
      log_warn("the chat_template in ", cfg_path, " is not ChatML/Qwen; render_chat() still renders the Qwen3 format");
  }
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  const TokenizerImpl& im = *impl_;
  std::string clean;
  if (!utf8::is_valid(text)) {
    clean = utf8::sanitize(text);
    text = clean;
  }
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<std::string> words;
  auto encode_plain = [&](std::string_view plain) {
    words.clear();
    im.pre.split(plain, words);
    for (const std::string& w : words) im.bpe.encode_word(w, ids);
  };
  std::vector<tok_detail::Segment> raw_segs, norm_segs;
  im.raw_added.split(text, parse_special, raw_segs);
  for (const auto& seg : raw_segs) {
    if (seg.token_id >= 0) {
      ids.push_back(seg.token_id);
      continue;
    }
    const std::string_view piece = text.substr(seg.begin, seg.end - seg.begin);
    const std::string normalized = im.nfc ? utf8::nfc(piece) : std::string(piece);
    if (im.normalized_added.empty()) {
      encode_plain(normalized);
      continue;
    }
    norm_segs.clear();
    im.normalized_added.split(normalized, parse_special, norm_segs);
    for (const auto& ns : norm_segs) {
      if (ns.token_id >= 0) {
        ids.push_back(ns.token_id);
      } else {
        encode_plain(std::string_view(normalized).substr(ns.begin, ns.end - ns.begin));
      }
    }
  }
  return ids;
}

std::string Tokenizer::token_bytes(int32_t id, bool skip_special) const {
  const TokenizerImpl& im = *impl_;
  CPI_CHECK(id >= 0 && id < im.vocab_size, "token id ", id, " is outside the vocabulary [0, ", im.vocab_size, ") of ",
            im.source);
  const auto it = im.added_by_id.find(id);
  if (it != im.added_by_id.end()) {
    if (skip_special && it->second.special) return {};
    return it->second.content;
  }
  return im.bpe.id_bytes(id);
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id, skip_special);
  return utf8::is_valid(bytes) ? bytes : utf8::sanitize(bytes);
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_id(std::string_view token) const {
  const auto it = impl_->added_by_content.find(std::string(token));
  if (it != impl_->added_by_content.end()) return it->second;
  return impl_->bpe.id_of_token(token);
}

bool Tokenizer::is_special(int32_t id) const {
  const auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && it->second.special;
}

std::optional<int32_t> Tokenizer::eos_token_id() const { return impl_->eos_id; }
std::optional<int32_t> Tokenizer::pad_token_id() const { return impl_->pad_id; }

StreamDecoder::StreamDecoder(const Tokenizer& tok, bool skip_special) : tok_(&tok), skip_special_(skip_special) {}

std::string StreamDecoder::push(int32_t id) {
  pending_ += tok_->token_bytes(id, skip_special_);
  return take_complete(false);
}

std::string StreamDecoder::flush() { return take_complete(true); }

std::string StreamDecoder::take_complete(bool final) {
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const utf8::Seq q = utf8::next_seq(pending_, i);
    if (q.kind == utf8::SeqKind::kIncomplete && !final) break;  // wait for the rest of the character
    if (q.kind == utf8::SeqKind::kValid) {
      out.append(pending_, i, q.len);
    } else {
      out.append(utf8::kReplacement);
    }
    i += q.len;
  }
  pending_.erase(0, i);
  return out;
}

}  // namespace cpinfer
