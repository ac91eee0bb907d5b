// Reference chat-template renderings for cpinfer's differential test of render_chat: reads
// tokenizer_config.json's chat_template and a JSON array of {messages, tools, enable_thinking},
// renders each with @huggingface/jinja (add_generation_prompt: true) and writes a JSON array of
// strings. An assistant message whose content is null or absent is given content "" (what the
// server renders; Python's Jinja would fail on None in this template).
// @huggingface/jinja 0.5 ignores the argument of str.strip/lstrip/rstrip (it strips all whitespace);
// Python's Jinja, which transformers and the peers render with, strips only the given characters
// (the Qwen3 template's content.lstrip('\n')). The three methods are given Python's meaning here.
// Usage: node tools/js/render_chat_template.mjs TOKENIZER_CONFIG.json IN.json OUT.json
import { readFileSync, writeFileSync } from "node:fs";

const [cfgPath, inPath, outPath] = process.argv.slice(2);
if (!cfgPath || !inPath || !outPath) {
  console.error("usage: node render_chat_template.mjs TOKENIZER_CONFIG.json IN.json OUT.json");
  process.exit(2);
}
let Template, Interpreter, Environment, parse, tokenize;
try {
  ({ Template, Interpreter, Environment, parse, tokenize } = await import("@huggingface/jinja"));
} catch (e) {
  console.error(`cannot load @huggingface/jinja (${e.message}); run scripts/setup.sh (npm install --prefix tools/js)`);
  process.exit(1);
}
{
  // The package does not export its StringValue class: take it from a rendered value.
  const proto = Object.getPrototypeOf(new Interpreter(new Environment()).run(parse(tokenize("x"))));
  const original = Object.getOwnPropertyDescriptor(proto, "builtins");
  if (!original || !original.get) throw new Error("@huggingface/jinja changed: StringValue.builtins not found");
  const pyStrip = (s, chars, left, right) => {
    const drop = chars === null ? (c) => /\s/.test(c) : (c) => chars.includes(c);
    let a = 0, b = s.length;
    while (left && a < b && drop(s[a])) a++;
    while (right && b > a && drop(s[b - 1])) b--;
    return s.slice(a, b);
  };
  Object.defineProperty(proto, "builtins", {
    get() {
      const map = original.get.call(this);
      if (!map.pythonStrip) {
        const FunctionValue = map.get("strip").constructor;
        const method = (left, right) => new FunctionValue((args) => {
          const chars = args.length > 0 && typeof args[0].value === "string" ? args[0].value : null;
          return new this.constructor(pyStrip(this.value, chars, left, right));
        });
        map.set("strip", method(true, true));
        map.set("lstrip", method(true, false));
        map.set("rstrip", method(false, true));
        map.pythonStrip = true;
      }
      return map;
    },
  });
}
const template = new Template(JSON.parse(readFileSync(cfgPath, "utf8")).chat_template);
const cases = JSON.parse(readFileSync(inPath, "utf8"));
const out = cases.map(({ messages, tools, enable_thinking }) => {
  const msgs = messages.map((m) => (m.content === null || m.content === undefined ? { ...m, content: "" } : m));
  const ctx = { messages: msgs, add_generation_prompt: true, bos_token: "", eos_token: "<|im_end|>" };
  if (tools && tools.length) ctx.tools = tools;
  if (enable_thinking !== undefined) ctx.enable_thinking = enable_thinking;
  return template.render(ctx);
});
writeFileSync(outPath, JSON.stringify(out));
console.log(`rendered ${cases.length} conversations`);
