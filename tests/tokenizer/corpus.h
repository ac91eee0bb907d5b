// Deterministic test corpus for the differential tokenizer test: multilingual text, code,
// emoji, whitespace and digit runs, contractions, embedded special tokens, odd code points and
// very long words. Same strings on every machine (own PRNG, no <random> distributions).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace cpinfer::test {

// n strings of valid UTF-8 (no surrogates; U+FEFF left out, see corpus.cpp).
std::vector<std::string> make_tokenizer_corpus(size_t n);

}  // namespace cpinfer::test
