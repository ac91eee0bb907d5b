#!/usr/bin/env python3
"""Per-step kernel tables from a kernel_trace.csv (bench/kernel_trace.cpp, a CUPTI injection library).

    CUDA_INJECTION64_PATH=build/bench/libcpinfer_kernel_trace.so CPINFER_KERNEL_TRACE=trace.csv \\
        build/cpinfer -q bench decode --device cuda --random-weights qwen3-30b-a3b --batch 1 --context 1024
    python3 bench/kernel_trace.py trace.csv [--begin gather_convert] [--steps 10]

A step runs from one launch of the --begin kernel (a substring of its name; by default the token
embedding's gather, the first kernel of a forward) to the next. The last --steps steps with the most
common kernel count are the steady state; for them it prints the step's wall time (first start to
last end), the time at least one kernel runs and the rest (no kernel running), the gaps between
consecutive kernels (start of one minus end of the one before; negative: they overlapped, as
programmatic dependent launch allows), and per kernel (name and grid): launches per step, median
duration, and its share of the critical path: the time from the latest end before it to its own
end, summed over its launches. Under programmatic dependent launch a kernel starts early and waits
for its predecessor, so durations overlap and overstate; the critical-path shares add up to the
step's wall time. Standard library only (the GPU machine has python3 and no extra packages).
"""

import argparse
import csv
import re
import shutil
import statistics
import subprocess
import sys


def short_names(names):
    """Demangled (c++filt, when present) and shortened: the function name without namespaces and
    template arguments."""
    out = {n: n for n in names}
    if shutil.which("c++filt"):
        mangled = sorted(n for n in names if n.startswith("_Z"))
        if mangled:
            res = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True, text=True)
            for m, d in zip(mangled, res.stdout.splitlines()):
                out[m] = d
    for n, d in out.items():
        d = re.sub(r"\(.*$", "", d.replace("(anonymous namespace)::", ""))  # parameters
        depth, base = 0, ""
        for ch in d:  # drop template arguments
            if ch == "<":
                depth += 1
            elif ch == ">":
                depth -= 1
            elif depth == 0:
                base += ch
        base = base.split("::")[-1].strip()
        out[n] = re.sub(r"^(void|auto)\s+", "", base) or n
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--begin", default="gather_convert", help="substring of the kernel that starts a step")
    ap.add_argument("--steps", type=int, default=10, help="steady-state steps to summarize")
    ap.add_argument("--top", type=int, default=30, help="kernel names to list")
    args = ap.parse_args()

    rows = []
    with open(args.trace, newline="") as f:
        for r in csv.DictReader(f):
            rows.append((int(r["start_ns"]), int(r["end_ns"]), r["name"], r["grid"]))
    if not rows:
        sys.exit("kernel_trace.py: no kernels in " + args.trace)
    rows.sort()
    names = short_names({r[2] for r in rows})
    starts = [i for i, r in enumerate(rows) if args.begin in names[r[2]]]
    rows = [(s, e, f"{names[n]} [{g}]") for s, e, n, g in rows]
    if len(starts) < 2:
        sys.exit(f"kernel_trace.py: fewer than two launches of a kernel named *{args.begin}*")
    steps = [rows[a:b] for a, b in zip(starts, starts[1:])]
    common = statistics.mode(len(s) for s in steps)
    steady = [s for s in steps if len(s) == common][-args.steps:]
    print(f"{len(rows)} kernels, {len(steps)} steps from *{args.begin}* to the next; "
          f"the last {len(steady)} with {common} kernels summarized")

    walls, busys, gaps_all, per_name = [], [], [], {}
    for s in steady:
        wall = max(e for _, e, _ in s) - s[0][0]
        busy, cur_s, cur_e = 0, None, None
        for a, b, _ in s:
            if cur_e is None or a > cur_e:
                if cur_e is not None:
                    busy += cur_e - cur_s
                cur_s, cur_e = a, b
            else:
                cur_e = max(cur_e, b)
        busy += cur_e - cur_s
        walls.append(wall)
        busys.append(busy)
        gaps_all.extend(b[0] - a[1] for a, b in zip(s, s[1:]))
        step_names, critical, last_end = {}, {}, s[0][0]
        for a, b, n in s:
            step_names.setdefault(n, []).append(b - a)
            critical[n] = critical.get(n, 0) + max(0, b - last_end)
            last_end = max(last_end, b)
        for n, d in step_names.items():
            per_name.setdefault(n, []).append((d, critical[n]))

    wall, busy = statistics.median(walls), statistics.median(busys)
    gaps = sorted(gaps_all)
    q = lambda p: gaps[min(len(gaps) - 1, int(p * len(gaps)))]
    print(f"step wall {wall / 1e3:.1f} us, some kernel running {busy / 1e3:.1f} us ({100 * busy / wall:.1f}%), "
          f"none {(wall - busy) / 1e3:.1f} us")
    print(f"gaps between consecutive kernels (us): p10 {q(0.1) / 1e3:.2f}, median {q(0.5) / 1e3:.2f}, "
          f"p90 {q(0.9) / 1e3:.2f}; overlapping pairs {sum(g < 0 for g in gaps) / len(steady):.0f} per step")
    print(f"\n{'kernel [grid]':<58} {'per step':>8} {'median us':>10} {'critical us':>11} {'% wall':>7}")
    table = []
    for n, lists in per_name.items():
        launches = statistics.median(len(d) for d, _ in lists)
        durs = [x for d, _ in lists for x in d]
        crit = statistics.median(c for _, c in lists)
        table.append((crit, n, launches, statistics.median(durs)))
    for crit, n, launches, med in sorted(table, reverse=True)[: args.top]:
        print(f"{n[:58]:<58} {launches:>8.0f} {med / 1e3:>10.2f} {crit / 1e3:>11.1f} {100 * crit / wall:>6.1f}%")


if __name__ == "__main__":
    main()
