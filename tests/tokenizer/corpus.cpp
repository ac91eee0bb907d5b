#include "corpus.h"

#include <cstdint>
#include <string_view>

#include "tokenizer/utf8.h"

namespace cpinfer::test {

namespace {

struct Rng {
  uint64_t state;
  uint64_t next() {  // splitmix64
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
  bool chance(int percent) { return below(100) < static_cast<size_t>(percent); }
  template <class T>
  const T& pick(const std::vector<T>& v) {
    return v[below(v.size())];
  }
};

using Pool = std::vector<std::string_view>;

const Pool kEnglish = {"the",      "quick",     "brown",      "fox",     "Hello", "world",   "tokenizer", "CONTEXT",
                       "parallel", "prefill",   "GPU",        "Mixture", "of",    "Experts", "attention", "is",
                       "all",      "you",       "need",       "A",       "I",     "x",       "ok",        "UPPER",
                       "lower",    "CamelCase", "snake_case", "e.g.",    "etc."};
const Pool kChinese = {"你好",   "世界", "上下文并行", "分词器", "模型",    "推理",
                       "长文本", "的",   "是",         "我们",   "中文测试"};
const Pool kJapanese = {"こんにちは", "東京", "カタカナ", "ひらがな", "日本語のテキスト", "ｶﾀｶﾅ", "ー"};
const Pool kKorean = {"안녕하세요", "세계", "한국어", "토크나이저", "입니다"};
const Pool kArabic = {"مرحبا", "بالعالم", "اللغة", "العربية", "٣٤٥", "كتاب", "ﻻ"};
const Pool kHindi = {"नमस्ते", "दुनिया", "हिन्दी", "भाषा", "\u0958\u0932\u092e", "क्षत्रिय"};
const Pool kCyrillic = {"Привет", "мир", "ЁЛКА", "съешь", "ещё", "Україна", "ӘӨҮ"};
const Pool kThai = {"สวัสดี", "ภาษาไทย", "ครับ", "กรุงเทพฯ", "๑๒๓"};
const Pool kOther = {"Γειά", "σου",   "κόσμε",   "ΑΘΗΝΑ",   "שלום", "עולם", "Tiếng",
                     "Việt", "người", "ქართული", "Հայերեն", "አማርኛ", "ꯃꯩꯇꯩ"};
const Pool kLatin = {"café", "naïve", "façade", "Ångström", "über", "Straße", "ÉCOLE", "jalapeño", "Øre", "ǅemal"};
// Decomposed or otherwise non-NFC spellings: NFC must compose/reorder/replace them.
const Pool kDecomposed = {
    "cafe\u0301",    "nai\u0308ve",   "A\u030Angstro\u0308m", "\u1100\u1161\u11A8", "\u212B",
    "\u2126",        "e\u0301\u0301", "o\u0308\u0304",        "\u0915\u093C",       "s\u0323\u0307",
    "q\u0307\u0323", "\uF900\uF901",  "\u0041\u0328\u0301",   "U\u0308\u0301ber"};
const Pool kCode = {"int main() {",
                    "    return 0;",
                    "}",
                    "def f(x):",
                    "\tif x > 0:",
                    "for (int i = 0; i < n; ++i)",
                    "std::vector<int32_t> ids;",
                    "#include <stdio.h>",
                    "x = {\"a\": [1, 2.5, null]}",
                    "SELECT * FROM t WHERE id=42;",
                    "<div class=\"a\">",
                    "a->b",
                    "i++;",
                    "!= ===",
                    "/* comment */",
                    "// TODO(me): fix",
                    "$PATH:~/bin",
                    "λx.x",
                    "0x1F & ~0u",
                    "1e-9",
                    "printf(\"%d\\n\", n);",
                    "    }\n",
                    "if __name__ == \"__main__\":",
                    "  - key: value",
                    "fn main() -> Result<(), E> {"};
const Pool kEmoji = {"😀",
                     "👍🏽",
                     "👨‍👩‍👧‍👦",
                     "🏳️‍🌈",
                     "🇺🇸",
                     "🇯🇵",
                     "1️⃣",
                     "❤️",
                     "🤖",
                     "🧑🏿‍💻",
                     "😀😀😀",
                     "🫠",
                     "©",
                     "™",
                     "✓"};
// No U+0085 (NEL): JS \s leaves it out, Unicode and HF count it as space (HuggingFaceEdgeCases).
const Pool kSpace = {" ",      "  ",     "   ",    "\t",     "\t\t", "\n", "\n\n",   "\r\n", "\r\n\r\n", " \n ",
                     "\u00A0", "\u3000", "\u2028", "\u2009", "\f",   "\v", " \t \n", "\r",   "    \n"};
const Pool kDigits = {"0", "42",  "1234567890", "3.14159", "1,000,000", "２０２４",   "١٢٣",   "²³",  "Ⅻ",
                      "½", "007", "10%",        "-5",      "v1.2.3",    "2026-11-28", "12:30", "९८७", "①②"};
const Pool kContraction = {"'s",  "'t", "'re", "'ve", "'m",  "'ll", "'d",  "'S", "'T", "'RE",
                           "'Ve", "'M", "'LL", "'D",  "'rE", "'vE", "'lL", "'",  "''", "\u2019s"};
const Pool kContractionWord = {"I'm", "You'RE", "can't", "it's", "WE'VE", "they'll", "She'D", "don'T", "y'all"};
const Pool kSpecial = {"<|im_start|>",   "<|im_end|>",
                       "<|endoftext|>",  "<think>",
                       "</think>",       "<tool_call>",
                       "</tool_call>",   "<|vision_pad|>",
                       "<|fim_prefix|>", "<tool_response>",
                       "<|im_start",     "|im_end|>",
                       "<<|im_end|>>",   "<|im_start|><|im_end|>",
                       "<|box_start|>",  "<|file_sep|>"};
const Pool kWeird = {"\u0301",     "\u0308\u0301", "\uFFFD",     "\uFFFE",     "\uFFFF",     "\uFDD0",
                     "\U0001FFFE", "\uE000",       "\uF8FF",     "\U000F0000", "\U0010FFFD", "\u200D",
                     "\u200C",     "\u200F",       "\u00AD",     "\x01",       "\x7f",       "\x1b[31m",
                     "\u034F",     "\u2060",       "\U000E0001", "\U0001F3FB", "\u20DD",     "\uFFFC"};

// Ranges whose letters/digits/spaces and NFC behavior are the same in Unicode 14 (PCRE2),
// 15 (utf8proc) and node's ICU, so random picks compare like for like.
struct Range {
  char32_t lo, hi;
};
const std::vector<Range> kRanges = {{0x20, 0x7E},       {0xA0, 0x24F},      {0x300, 0x36F},     {0x370, 0x3FF},
                                    {0x400, 0x4FF},     {0x590, 0x5FF},     {0x600, 0x6FF},     {0x900, 0x97F},
                                    {0xE00, 0xE7F},     {0x1100, 0x11FF},   {0x2000, 0x206F},   {0x2190, 0x22FF},
                                    {0x3040, 0x30FF},   {0x4E00, 0x9FA5},   {0xAC00, 0xD7A3},   {0xE000, 0xE0FF},
                                    {0xF900, 0xFA2D},   {0xFF00, 0xFFEF},   {0xFFF0, 0xFFFD},   {0x10000, 0x1007F},
                                    {0x1D400, 0x1D7FF}, {0x1F300, 0x1F64F}, {0x20000, 0x2A6D6}, {0xF0000, 0xF00FF}};

std::string random_code_points(Rng& rng, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) {
    const Range& r = rng.pick(kRanges);
    char32_t cp = r.lo + static_cast<char32_t>(rng.below(r.hi - r.lo + 1));
    if (cp == 0xFEFF) cp = 'z';  // JS \s counts U+FEFF as space, PCRE2/Unicode do not
    utf8::append(s, cp);
  }
  return s;
}

const std::vector<const Pool*> kLanguages = {&kEnglish,  &kChinese, &kJapanese, &kKorean, &kArabic,    &kHindi,
                                             &kCyrillic, &kThai,    &kOther,    &kLatin,  &kDecomposed};
const std::vector<const Pool*> kAllText = {
    &kEnglish,    &kChinese, &kJapanese, &kKorean, &kArabic, &kHindi,       &kCyrillic,        &kThai, &kOther, &kLatin,
    &kDecomposed, &kCode,    &kEmoji,    &kSpace,  &kDigits, &kContraction, &kContractionWord, &kWeird};

std::string sep(Rng& rng) {
  const size_t r = rng.below(10);
  if (r < 6) return " ";
  if (r < 8) return "";
  return std::string(rng.pick(kSpace));
}

std::string long_word(Rng& rng) {
  const size_t len = 200 + rng.below(2800);
  std::string s;
  switch (rng.below(7)) {
    case 0:
      s.assign(len, 'a');
      break;
    case 1:
      while (s.size() < len) s += "supercalifragilistic";
      break;
    case 2:
      while (s.size() < len) s += rng.pick(kChinese);
      break;
    case 3:
      while (s.size() < len) s += static_cast<char>('0' + rng.below(10));
      break;
    case 4:
      s.assign(len, ' ');
      s += "x";
      break;
    case 5:
      while (s.size() < len) s += rng.pick(kEmoji);
      break;
    default:
      while (s.size() < len) s += rng.pick(kCyrillic);
      break;
  }
  if (rng.chance(50)) s = "Start " + s;
  if (rng.chance(50)) s += rng.chance(50) ? "\n" : "  ";
  return s;
}

std::string make_one(Rng& rng, size_t kind) {
  std::string s;
  switch (kind) {
    case 0: {  // a sentence in one language
      const Pool& p = *kLanguages[rng.below(kLanguages.size())];
      const size_t n = 1 + rng.below(15);
      for (size_t i = 0; i < n; ++i) s += std::string(i ? (rng.chance(80) ? " " : "") : "") + std::string(rng.pick(p));
      if (rng.chance(50)) s += rng.chance(50) ? "." : "?!";
      break;
    }
    case 1: {  // anything goes
      const size_t n = 1 + rng.below(20);
      for (size_t i = 0; i < n; ++i) s += std::string(rng.pick(*kAllText[rng.below(kAllText.size())])) + sep(rng);
      break;
    }
    case 2: {  // code
      const size_t n = 1 + rng.below(8);
      const std::string nl = rng.chance(30) ? "\r\n" : "\n";
      for (size_t i = 0; i < n; ++i) {
        s += std::string(rng.below(3) * 2, rng.chance(20) ? '\t' : ' ');
        s += std::string(rng.pick(kCode)) + (rng.chance(20) ? "  " : "") + nl;
      }
      break;
    }
    case 3:  // emoji among words
      for (size_t i = 0, n = 1 + rng.below(10); i < n; ++i)
        s += std::string(rng.chance(50) ? rng.pick(kEmoji) : rng.pick(kEnglish)) + sep(rng);
      break;
    case 4:  // whitespace runs, leading and trailing
      if (rng.chance(50)) s += rng.pick(kSpace);
      for (size_t i = 0, n = 1 + rng.below(8); i < n; ++i) {
        s += rng.pick(*kLanguages[rng.below(3)]);
        for (size_t k = 0, m = 1 + rng.below(3); k < m; ++k) s += rng.pick(kSpace);
      }
      break;
    case 5:  // numbers
      for (size_t i = 0, n = 1 + rng.below(10); i < n; ++i)
        s += std::string(rng.chance(70) ? rng.pick(kDigits) : rng.pick(kEnglish)) + sep(rng);
      break;
    case 6:  // contractions, mixed case
      for (size_t i = 0, n = 1 + rng.below(10); i < n; ++i) {
        s += rng.chance(50) ? rng.pick(kContractionWord) : rng.pick(kEnglish);
        if (rng.chance(60)) s += rng.pick(kContraction);
        s += sep(rng);
      }
      break;
    case 7:  // special tokens in text; what follows never starts with a combining mark, so that
             // NFC of the whole string equals NFC of the pieces between special tokens
      for (size_t i = 0, n = 1 + rng.below(8); i < n; ++i) {
        if (rng.chance(50)) s += std::string(rng.pick(kEnglish)) + sep(rng);
        s += rng.pick(kSpecial);
        if (rng.chance(60)) s += std::string(rng.chance(50) ? "\n" : " ") + std::string(rng.pick(kLatin));
      }
      break;
    case 8:  // odd code points
      for (size_t i = 0, n = 1 + rng.below(6); i < n; ++i) {
        s += rng.chance(50) ? std::string(rng.pick(kWeird)) : random_code_points(rng, 1 + rng.below(12));
        if (rng.chance(40)) s += sep(rng);
      }
      if (rng.chance(10)) s += std::string("\0", 1);
      break;
    default:
      s = long_word(rng);
      break;
  }
  return s;
}

}  // namespace

std::vector<std::string> make_tokenizer_corpus(size_t n) {
  Rng rng{0xC0FFEEull};
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    // Long words are costly; one string in 25 is enough to cover them.
    const size_t kind = i % 25 == 24 ? 9 : i % 9;
    out.push_back(make_one(rng, kind));
  }
  return out;
}

}  // namespace cpinfer::test
