#include "server/tools.h"

#include <charconv>
#include <cmath>
#include <cstdio>

namespace cpinfer::server {

using ojson = nlohmann::ordered_json;

namespace {

constexpr std::string_view kOpen = "<tool_call>";
constexpr std::string_view kClose = "</tool_call>";

// JSON.stringify of a string: ", \, \b \f \n \r \t escaped, other controls as \u00xx, the rest raw.
void js_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

// Number.prototype.toString (ECMA-262 Number::toString) from the shortest round-trip digits.
void js_number(std::string& out, double x) {
  if (std::isnan(x) || std::isinf(x)) {  // JSON.stringify writes null for them
    out += "null";
    return;
  }
  if (x == 0) {
    out += '0';
    return;
  }
  if (x < 0) {
    out += '-';
    x = -x;
  }
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(res.ptr - buf));  // d[.ddd]e±XX
  const size_t e_at = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e_at))
    if (c != '.') digits += c;
  int exp10 = 0;
  std::from_chars(sci.data() + e_at + 1 + (sci[e_at + 1] == '+'), sci.data() + sci.size(), exp10);
  const int k = static_cast<int>(digits.size()), n = exp10 + 1;
  if (k <= n && n <= 21) {
    out += digits + std::string(static_cast<size_t>(n - k), '0');
  } else if (0 < n && n <= 21) {
    out += digits.substr(0, static_cast<size_t>(n)) + "." + digits.substr(static_cast<size_t>(n));
  } else if (-6 < n && n <= 0) {
    out += "0." + std::string(static_cast<size_t>(-n), '0') + digits;
  } else {
    out += digits.substr(0, 1);
    if (k > 1) out += "." + digits.substr(1);
    out += (n - 1 >= 0 ? "e+" : "e-") + std::to_string(std::abs(n - 1));
  }
}

void tojson(std::string& out, const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null:
      out += "null";
      break;
    case ojson::value_t::boolean:
      out += v.get<bool>() ? "true" : "false";
      break;
    case ojson::value_t::number_integer:
    case ojson::value_t::number_unsigned: {
      // JavaScript numbers are doubles: integers beyond 2^53 print as their double.
      const double d = v.get<double>();
      if (std::fabs(d) <= 9007199254740992.0)
        out += v.dump();
      else
        js_number(out, d);
      break;
    }
    case ojson::value_t::number_float:
      js_number(out, v.get<double>());
      break;
    case ojson::value_t::string:
      js_string(out, v.get_ref<const std::string&>());
      break;
    case ojson::value_t::array: {
      out += '[';
      bool first = true;
      for (const ojson& x : v) {
        if (!first) out += ", ";
        first = false;
        tojson(out, x);
      }
      out += ']';
      break;
    }
    case ojson::value_t::object: {
      out += '{';
      bool first = true;
      for (auto it = v.begin(); it != v.end(); ++it) {
        if (!first) out += ", ";
        first = false;
        js_string(out, it.key());
        out += ": ";
        tojson(out, it.value());
      }
      out += '}';
      break;
    }
    default:
      out += "null";
      break;  // binary / discarded never come from JSON text
  }
}

// The longest suffix of `s` that is a proper prefix of `tag` (text that may still become the tag).
size_t partial_tag_suffix(std::string_view s, std::string_view tag) {
  for (size_t n = std::min(s.size(), tag.size() - 1); n > 0; --n)
    if (s.substr(s.size() - n) == tag.substr(0, n)) return n;
  return 0;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

}  // namespace

std::string jinja_tojson(const ojson& v) {
  std::string out;
  tojson(out, v);
  return out;
}

std::string forced_tool_prefix(const ToolChoice& choice) {
  if (choice.kind == ToolChoice::Kind::Required) return "<tool_call>\n";
  if (choice.kind == ToolChoice::Kind::Named) {
    std::string name;
    js_string(name, choice.name);
    return "<tool_call>\n{\"name\": " + name + ", \"arguments\": ";
  }
  return {};
}

void ToolCallParser::finish_call(Out& out, bool closed) {
  std::string_view body = trim(pending_);
  ojson j = ojson::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  const ojson* args = nullptr;
  if (j.is_object() && j.contains("name") && j["name"].is_string()) {
    if (j.contains("arguments"))
      args = &j["arguments"];
    else if (j.contains("parameters"))
      args = &j["parameters"];
  }
  if (args && (args->is_object() || args->is_null())) {
    out.calls.push_back({j["name"].get<std::string>(), args->is_null() ? "{}" : args->dump()});
    ++n_calls_;
  } else {  // not a call after all: the model's text, tags included
    out.content += std::string(kOpen) + pending_ + (closed ? std::string(kClose) : std::string());
  }
  pending_.clear();
  in_call_ = false;
}

ToolCallParser::Out ToolCallParser::push(std::string_view text) {
  Out out;
  pending_.append(text);
  for (;;) {
    if (in_call_) {
      const size_t end = pending_.find(kClose);
      if (end == std::string::npos) return out;
      std::string rest = pending_.substr(end + kClose.size());
      pending_.resize(end);
      finish_call(out, /*closed=*/true);
      pending_ = std::move(rest);
      continue;
    }
    const size_t at = pending_.find(kOpen);
    if (at == std::string::npos) {
      const size_t keep = partial_tag_suffix(pending_, kOpen);
      std::string emit = pending_.substr(0, pending_.size() - keep);
      pending_.erase(0, pending_.size() - keep);
      // Between and after calls only whitespace is expected: it is not content.
      if (!(n_calls_ > 0 && trim(emit).empty())) out.content += emit;
      return out;
    }
    std::string before = pending_.substr(0, at);
    if (!(n_calls_ > 0 && trim(before).empty())) out.content += before;
    pending_.erase(0, at + kOpen.size());
    in_call_ = true;
  }
}

ToolCallParser::Out ToolCallParser::flush() {
  Out out;
  if (in_call_)
    finish_call(out, /*closed=*/false);
  else if (!(n_calls_ > 0 && trim(pending_).empty()))
    out.content += pending_;
  pending_.clear();
  return out;
}

nlohmann::json tool_calls_json(const std::vector<ToolCall>& calls, const std::vector<std::string>& ids, int first_index,
                               bool with_index) {
  nlohmann::json arr = nlohmann::json::array();
  for (size_t i = 0; i < calls.size(); ++i) {
    nlohmann::json c = {{"id", ids.at(i)},
                        {"type", "function"},
                        {"function", {{"name", calls[i].name}, {"arguments", calls[i].arguments}}}};
    if (with_index) c["index"] = first_index + static_cast<int>(i);
    arr.push_back(std::move(c));
  }
  return arr;
}

}  // namespace cpinfer::server
