#!/usr/bin/env python3
"""Plot of context-parallel prefill scaling from `cpinfer bench prefill --json` output.

    python3 bench/plot_cp.py bench.json [more.json ...] --out docs/cp_scaling.svg [--labels A,B] [--title TEXT]

Two panels: time to first token (log scale) and parallel efficiency against the CP size, one line
per prompt length (and per input file when several are given, e.g. sharded vs replicated experts;
--labels, or the file names, tell them apart). Writes a self-contained SVG with the
standard library only (the GPU machine and CI have no matplotlib).
"""
import argparse
import json
import math
import os
import sys

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
DASHES = ["", "6,4", "2,3", "8,3,2,3"]


def load(paths, labels):
    series = []  # (label, seq, [(cp, ttft_s, efficiency)])
    device = ""
    for fi, path in enumerate(paths):
        with open(path) as f:
            doc = json.load(f)
        device = device or doc.get("device", "")
        label = labels[fi] if labels else os.path.splitext(os.path.basename(path))[0]
        by_seq = {}
        for r in doc["results"]:
            by_seq.setdefault(r["seq"], []).append((r["cp"], r["ttft_s"], r.get("efficiency", 0.0)))
        for seq, pts in sorted(by_seq.items()):
            series.append((label if len(paths) > 1 else "", seq, fi, sorted(pts)))
    if not series:
        sys.exit("plot_cp.py: no results in the input")
    return series, device


def seq_name(n):
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


class Panel:
    def __init__(self, x0, y0, w, h, xs, ylo, yhi, ylog):
        self.x0, self.y0, self.w, self.h = x0, y0, w, h
        self.xs, self.ylo, self.yhi, self.ylog = xs, ylo, yhi, ylog

    def px(self, cp):
        # CP sizes are spread evenly on a log2 axis.
        lo, hi = math.log2(self.xs[0]), math.log2(self.xs[-1])
        t = 0.5 if hi == lo else (math.log2(cp) - lo) / (hi - lo)
        return self.x0 + 30 + t * (self.w - 60)

    def py(self, v):
        if self.ylog:
            a, b, v = math.log10(self.ylo), math.log10(self.yhi), math.log10(max(v, 1e-9))
        else:
            a, b = self.ylo, self.yhi
        return self.y0 + self.h - (v - a) / (b - a) * self.h


def svg(series, device, title):
    cps = sorted({cp for _, _, _, pts in series for cp, _, _ in pts})
    ttfts = [t for _, _, _, pts in series for _, t, _ in pts]
    lo = 10 ** math.floor(math.log10(min(ttfts)))
    hi = 10 ** math.ceil(math.log10(max(ttfts)))
    W, H = 980, 490
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="sans-serif" font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
           f'<text x="{W / 2}" y="40" text-anchor="middle" fill="#555">{device}</text>']
    panels = [("time to first token (s)", Panel(70, 70, 380, 300, cps, lo, hi, True), 1),
              ("parallel efficiency (speedup / CP)", Panel(560, 70, 380, 300, cps, 0.0, 1.1, False), 2)]
    for name, p, _ in panels:
        out.append(f'<rect x="{p.x0}" y="{p.y0}" width="{p.w}" height="{p.h}" fill="none" stroke="#333"/>')
        out.append(f'<text x="{p.x0 + p.w / 2}" y="{p.y0 - 10}" text-anchor="middle">{name}</text>')
        for cp in cps:
            x = p.px(cp)
            out.append(f'<line x1="{x}" y1="{p.y0}" x2="{x}" y2="{p.y0 + p.h}" stroke="#eee"/>')
            out.append(f'<text x="{x}" y="{p.y0 + p.h + 18}" text-anchor="middle">{cp}</text>')
        out.append(f'<text x="{p.x0 + p.w / 2}" y="{p.y0 + p.h + 38}" text-anchor="middle">CP size (GPUs)</text>')
        ticks = []
        if p.ylog:
            v = p.ylo
            while v <= p.yhi * 1.0001:
                ticks += [(v, f"{v:g}")] + [(v * k, "") for k in (2, 5) if v * k < p.yhi]
                v *= 10
        else:
            ticks = [(i / 10, f"{i / 10:.1f}") for i in range(0, 11, 2)]
        for v, lab in ticks:
            y = p.py(v)
            out.append(f'<line x1="{p.x0}" y1="{y}" x2="{p.x0 + p.w}" y2="{y}" stroke="{"#ddd" if lab else "#f3f3f3"}"/>')
            if lab:
                out.append(f'<text x="{p.x0 - 6}" y="{y + 4}" text-anchor="end">{lab}</text>')
    seqs = sorted({s for _, s, _, _ in series})
    for label, seq, fi, pts in series:
        color = COLORS[seqs.index(seq) % len(COLORS)]
        dash = DASHES[fi % len(DASHES)]
        for _, p, k in panels:  # k: 1 = TTFT, 2 = efficiency (index into the point tuple)
            xy = [(p.px(pt[0]), p.py(pt[k])) for pt in pts]
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2" '
                       f'stroke-dasharray="{dash}"/>')
            for x, y in xy:
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
    # Legend below the panels, wrapped onto as many lines as it needs.
    x, y = 70, H - 44
    for label, seq, fi, _ in series:
        color = COLORS[seqs.index(seq) % len(COLORS)]
        name = seq_name(seq) + " tokens" + (f", {label}" if label else "")
        width = 40 + 7 * len(name)
        if x + width > W - 20:
            x, y = 70, y + 20
        out.append(f'<line x1="{x}" y1="{y}" x2="{x + 26}" y2="{y}" stroke="{color}" stroke-width="2" '
                   f'stroke-dasharray="{DASHES[fi % len(DASHES)]}"/>')
        out.append(f'<text x="{x + 32}" y="{y + 4}">{name}</text>')
        x += width
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="JSON files written by cpinfer bench prefill --json")
    ap.add_argument("--out", required=True, help="SVG file to write")
    ap.add_argument("--labels", help="comma-separated names of the input files in the legend (default: file names)")
    ap.add_argument("--title", default="cpinfer context-parallel prefill, Qwen3-30B-A3B shape")
    a = ap.parse_args()
    labels = a.labels.split(",") if a.labels else None
    if labels and len(labels) != len(a.inputs):
        sys.exit(f"plot_cp.py: {len(labels)} labels for {len(a.inputs)} input files")
    series, device = load(a.inputs, labels)
    with open(a.out, "w") as f:
        f.write(svg(series, device, a.title))
    print(f"wrote {a.out}: {len(series)} series")


if __name__ == "__main__":
    main()
