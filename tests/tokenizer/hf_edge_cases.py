#!/usr/bin/env python3
"""Prints the Hugging Face `tokenizers` ids for the edge cases in tokenizer_qwen3_test.cpp
(HuggingFaceEdgeCases). Run where `tokenizers` is installed (the GPU machine):
    python3 tests/tokenizer/hf_edge_cases.py build/qwen3-tokenizer
The values in the test came from tokenizers 0.23.2 (transformers 5.17), which also agreed with
cpinfer on all 6,000 strings of the differential corpus."""
import json
import sys

from tokenizers import Tokenizer

CASES = ["a\u0085b", "\t\t\u0085x", "x \u0085 y", "a\ufeff b", "\ufeffhello", "x  \ufeff\n",
         "they'll\u0085'rE", "e\u0301<|im_end|>\u0301", "\u017f '\u017f x'\u017f", "K'\u212a", "I'\u0130"]

tok = Tokenizer.from_file(f"{sys.argv[1]}/tokenizer.json")
for text in CASES:
    print(json.dumps(text), tok.encode(text, add_special_tokens=False).ids)
