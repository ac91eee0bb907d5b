#!/usr/bin/env python3
"""Hugging Face transformers decode peer at the real Qwen3-30B-A3B shape, random bf16 weights on the GPU.

What it measures: model.generate on a batch of B random prompts of C tokens (explicit all-ones
attention_mask, greedy, ignore EOS: exactly --steps + 1 new tokens) with cache_implementation="static",
eager (disable_compile=True), and with --compile also as generate compiles it itself on a static
cache (disable_compile=False: transformers' automatic torch.compile of the decoding forward). A logits processor
records a CUDA event at every step, so the step time is the median gap between consecutive events
(the prefill and the first token are not in it), without a host synchronization per step.

Only a few decoder layers fit the time budget, so models of --layers L1,L2 layers are timed and the
48-layer step is extrapolated linearly:  t48 = t(L2) + (48 - L2) * (t(L2) - t(L1)) / (L2 - L1)
(the per-layer cost from the difference; embedding, final norm, LM head and the generate loop's own
work counted once, as in the model).

Usage:  python3 bench/hf_decode.py --batch 1,64 --context 1024 [--steps 32] [--layers 2,4] [--compile] [--json OUT]
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_prefill import FULL_LAYERS, build_model, log  # noqa: E402


def step_times(torch, transformers, model, cfg, batch, context, steps, seed, compiled):
    """Median and p90 milliseconds between consecutive decode steps of one generate call."""
    events = []

    class StepTimer(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            events.append(e)
            return scores

    gen = torch.Generator(device="cuda").manual_seed(seed + batch * 7919 + context)
    ids = torch.randint(0, cfg["vocab_size"], (batch, context), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                             do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None,
                             logits_processor=transformers.LogitsProcessorList([StepTimer()]),
                             disable_compile=not compiled)
    torch.cuda.synchronize()
    if out.shape != (batch, context + steps + 1):
        sys.exit(f"hf_decode: generate returned {tuple(out.shape)}, expected {(batch, context + steps + 1)}")
    if len(events) != steps + 1:
        sys.exit(f"hf_decode: {len(events)} steps timed, expected {steps + 1}")
    gaps = sorted(events[i].elapsed_time(events[i + 1]) for i in range(len(events) - 1))
    return statistics.median(gaps), gaps[min(len(gaps) - 1, int(0.9 * len(gaps)))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--context", default="1024", help="comma-separated prompt lengths (the context of the steps)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per generate call")
    p.add_argument("--layers", default="2,4", help="two layer counts L1 < L2 for the extrapolation")
    p.add_argument("--compile", action="store_true", help="also time generate with its automatic torch.compile")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    try:
        batches = [int(x) for x in a.batch.split(",")]
        contexts = [int(x) for x in a.context.split(",")]
        l1, l2 = (int(x) for x in a.layers.split(","))
    except ValueError:
        sys.exit("hf_decode: --batch, --context take integers; --layers takes two (e.g. 2,4)")
    if min(batches) < 1 or min(contexts) < 1 or a.steps < 3 or not 1 <= l1 < l2 <= FULL_LAYERS:
        sys.exit("hf_decode: batches and contexts >= 1, --steps >= 3, --layers L1 < L2 within 1..48")

    import torch
    import transformers

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    variants = ["eager"] + (["compiled"] if a.compile else [])
    times = {}  # (variant, layers, batch, context) -> (median ms, p90 ms) or an error string
    for layers in (l1, l2):
        model, cfg = build_model(torch, transformers, layers, max(contexts) + a.steps + 8)
        for variant in variants:
            for c in contexts:
                for b in batches:
                    t0 = time.time()
                    try:
                        step_times(torch, transformers, model, cfg, b, c, 3, a.seed, variant == "compiled")  # warm-up (and compilation)
                        times[(variant, layers, b, c)] = step_times(torch, transformers, model, cfg, b, c, a.steps,
                                                                    a.seed, variant == "compiled")
                    except (RuntimeError, ValueError, TypeError) as e:  # OOM or an unsupported path: reported
                        times[(variant, layers, b, c)] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        torch.cuda.empty_cache()
                    log(f"{variant} layers {layers} batch {b} context {c}: {times[(variant, layers, b, c)]} "
                        f"({time.time() - t0:.1f} s)")
        del model
        torch.cuda.empty_cache()

    results = []
    for variant in variants:
        for c in contexts:
            for b in batches:
                r = {"variant": variant, "batch": b, "context": c}
                t1, t2 = times[(variant, l1, b, c)], times[(variant, l2, b, c)]
                if isinstance(t1, str) or isinstance(t2, str):
                    r["status"] = t1 if isinstance(t1, str) else t2
                else:
                    per_layer = (t2[0] - t1[0]) / (l2 - l1)
                    t48 = t2[0] + (FULL_LAYERS - l2) * per_layer
                    r.update(status="ok", step_ms_layers={str(l1): round(t1[0], 3), str(l2): round(t2[0], 3)},
                             p90_ms_layers={str(l1): round(t1[1], 3), str(l2): round(t2[1], 3)},
                             per_layer_ms=round(per_layer, 4), extrapolated_48_layer_step_ms=round(t48, 3),
                             tokens_per_s=round(b / (t48 / 1e3), 1))
                results.append(r)
                log(json.dumps(r))
    doc = {"peer": "transformers generate, static cache", "torch": torch.__version__,
           "transformers": transformers.__version__, "device": torch.cuda.get_device_name(),
           "layers_timed": [l1, l2], "steps": a.steps, "results": results}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
