#!/usr/bin/env python3
"""Where a kernel's warps wait, instruction by instruction, from Nsight Compute's SASS view.

    ncu --set full --import-source yes -k regex:moe_fp8_ws -c 2 -o rep \\
        build/bench/moe_bench --tokens 32768 --reps 1
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
    python3 bench/ncu_sass.py sass.csv [--kernel N|TEXT] [--range A:B] [--top 25] [--runs FFMA]

Per kernel in the file (or the one --kernel names: its index, or text in its name): the warp
samples and warp-level instructions executed; the samples by opcode (the mnemonic before its
first dot, predicates dropped) next to the instructions' share; the samples by stall reason
("(unlisted)": samples the export gives no reason for, such as a warpgroup MMA waiting to issue);
the instructions that drew the most samples, with their three largest stall reasons. --range A:B
restricts all of it to instructions A..B-1 (the index printed in the first column, the order of the
SASS listing), e.g. one loop's body. --runs OPCODE looks at runs of 8 or more consecutive
instructions of that opcode (a promotion's FFMAs): the samples of the even and the odd positions
of each run, which tells one warp's back-to-back instructions waiting on each other (a pipe that
takes one every other cycle) from a run that issues freely. Standard library only (the GPU machine
has python3 and no extra packages).
"""

import argparse
import csv
import re
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def load(path):
    """[{'name': kernel name, 'ins': [dict per SASS instruction]}] in the file's order."""
    kernels, cur, hdr = [], None, None
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                cur = {"name": row[1] if len(row) > 1 else "", "ins": []}
                kernels.append(cur)
                hdr = None
            elif row[0] == "Address":
                hdr = row
            elif cur is not None and hdr is not None:
                cur["ins"].append(dict(zip(hdr, row)))
    return kernels


def num(x):
    try:
        return float(str(x).replace(",", ""))
    except ValueError:
        return 0.0


def opcode(sass):
    s = re.sub(r"^@!?U?P\w+\s+", "", sass.strip())
    return s.split()[0].split(".")[0] if s else ""


def stall_columns(ins):
    return [h for h in (ins[0] if ins else {}) if h.startswith("stall_") and "Not Issued" not in h]


def pct(a, b):
    return 100.0 * a / b if b else 0.0


def summarize(k, lo, hi, top, runs_op, out):
    ins = k["ins"][lo:hi]
    keys = stall_columns(k["ins"])
    samples = [num(i.get(SAMPLES, 0)) for i in ins]
    executed = [num(i.get(EXECUTED, 0)) for i in ins]
    tot_s, tot_e = sum(samples), sum(executed)
    out.write(f"== {k['name']}\n")
    out.write(f"instructions {lo}..{lo + len(ins) - 1}: {tot_s:.0f} warp samples, {tot_e:.0f} warp instructions executed\n")
    by_op_s, by_op_e = {}, {}
    for i, s, e in zip(ins, samples, executed):
        o = opcode(i.get("Source", ""))
        by_op_s[o] = by_op_s.get(o, 0.0) + s
        by_op_e[o] = by_op_e.get(o, 0.0) + e
    out.write("by opcode (samples %, executed %):\n")
    for o in sorted(by_op_s, key=lambda o: -by_op_s[o])[:15]:
        out.write(f"  {o:<16} {pct(by_op_s[o], tot_s):5.1f}%  {pct(by_op_e[o], tot_e):5.1f}%\n")
    stalls = {h[len("stall_"):]: sum(num(i.get(h, 0)) for i in ins) for h in keys}
    # Samples the CSV gives no reason for (the SASS view has reasons the export lacks, e.g. at a
    # warpgroup MMA waiting to issue).
    stalls["(unlisted)"] = max(0.0, tot_s - sum(stalls.values()))
    if stalls:
        out.write("by stall reason (samples %):\n")
        for r in sorted(stalls, key=lambda r: -stalls[r])[:10]:
            if stalls[r] > 0:
                out.write(f"  {r:<18} {pct(stalls[r], tot_s):5.1f}%\n")
    out.write(f"top {top} instructions by samples:\n")
    order = sorted(range(len(ins)), key=lambda n: -samples[n])[:top]
    for n in order:
        i = ins[n]
        listed = [(num(i.get(h, 0)), h[len("stall_"):]) for h in keys]
        listed.append((max(0.0, samples[n] - sum(v for v, _ in listed)), "(unlisted)"))
        reasons = sorted(listed, reverse=True)[:3]
        why = ", ".join(f"{r} {v:.0f}" for v, r in reasons if v > 0)
        out.write(f"  {lo + n:5d} {samples[n]:7.0f} {pct(samples[n], tot_s):5.1f}%  exec {executed[n]:>10.0f}  "
                  f"{i.get('Source', '').strip()[:60]:<60}  {why}\n")
    if runs_op:
        even, odd, n_runs = 0.0, 0.0, 0
        n = 0
        while n < len(ins):
            if opcode(ins[n].get("Source", "")) != runs_op:
                n += 1
                continue
            m = n
            while m < len(ins) and opcode(ins[m].get("Source", "")) == runs_op:
                m += 1
            if m - n >= 8:
                n_runs += 1
                even += sum(samples[j] for j in range(n, m, 2))
                odd += sum(samples[j] for j in range(n + 1, m, 2))
            n = m
        if n_runs:
            ratio = max(even, odd) / max(min(even, odd), 1.0)
            out.write(f"runs of >= 8 {runs_op}: {n_runs}, samples at even positions {even:.0f}, at odd {odd:.0f} "
                      f"({ratio:.2f}x)\n")
        else:
            out.write(f"runs of >= 8 {runs_op}: none\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu -i REPORT --page source --csv --print-source sass")
    ap.add_argument("--kernel", help="the kernel's index in the file, or text in its name (default: every kernel)")
    ap.add_argument("--range", help="A:B, instructions A..B-1 only")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--runs", metavar="OPCODE", help="even / odd samples in runs of >= 8 of this opcode")
    a = ap.parse_args(argv)
    kernels = load(a.csv)
    if not kernels or not any(k["ins"] for k in kernels):
        sys.exit(f"ncu_sass: no SASS rows in {a.csv} (expected ncu's --page source --csv --print-source sass)")
    if a.kernel is not None:
        if a.kernel.isdigit():
            idx = int(a.kernel)
            if idx >= len(kernels):
                sys.exit(f"ncu_sass: kernel {idx} of {len(kernels)}")
            kernels = [kernels[idx]]
        else:
            kernels = [k for k in kernels if a.kernel in k["name"]]
            if not kernels:
                sys.exit(f"ncu_sass: no kernel named like '{a.kernel}'")
    lo, hi = 0, None
    if a.range:
        m = re.fullmatch(r"(\d*):(\d*)", a.range)
        if not m:
            sys.exit(f"ncu_sass: --range {a.range}: expected A:B")
        lo = int(m.group(1) or 0)
        hi = int(m.group(2)) if m.group(2) else None
        if hi is not None and hi <= lo:
            sys.exit(f"ncu_sass: --range {a.range}: empty")
    for k in kernels:
        summarize(k, lo, hi if hi is not None else len(k["ins"]), a.top, a.runs, sys.stdout)


if __name__ == "__main__":
    main()
