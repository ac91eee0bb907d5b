#!/usr/bin/env python3
"""bench/kernel_trace.py on a synthetic trace whose numbers are known: twelve identical steps of
five kernels (an embedding gather that starts each step, two kernels that start early under their
predecessor's tail as programmatic dependent launch allows, one kernel launched twice with a 1 µs
hole before its second launch), then a trace without the step's first kernel, which must be a
clear error."""
import os
import re
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "kernel_trace.py")

# (start, end) in ns from the step's start, name, grid.
STEP = [
    (0, 1000, "gather_convert_kernel", "1x1x1"),
    (500, 8000, "attention_decode_kernel", "16x4x1"),
    (2000, 15000, "attention_split_merge_kernel", "1x32x1"),
    (14000, 20000, "skinny_gemm_kernel", "640x1x1"),
    (21000, 30000, "skinny_gemm_kernel", "640x1x1"),
]


def write_trace(path, steps, kernels):
    with open(path, "w") as f:
        f.write("start_ns,end_ns,stream,graph_id,grid,block,name\n")
        for k in range(steps):
            t0 = 1_000_000 + k * 100_000
            for s, e, name, grid in kernels:
                f.write(f"{t0 + s},{t0 + e},7,1,{grid},128x1x1,{name}\n")


def run(path):
    return subprocess.run([sys.executable, SCRIPT, path], capture_output=True, text=True)


def main():
    failures = []

    def check(cond, what):
        if not cond:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.csv")
        write_trace(path, 12, STEP)
        res = run(path)
        out = res.stdout
        print(out)
        check(res.returncode == 0, f"exit status {res.returncode}: {res.stderr}")
        check("11 steps" in out and "the last 10 with 5 kernels" in out, "the step count (the last gather opens no full step)")
        check("step wall 30.0 us" in out, "the step's wall time")
        check("some kernel running 29.0 us" in out and "none 1.0 us" in out, "the busy union and the hole")
        check("p10 -6.00, median -0.50, p90 1.00" in out, "the gaps between consecutive kernels")
        # name [grid], launches per step, median duration, critical-path µs, % of the wall.
        rows = {m.group(1): m.groups()[1:] for m in
                re.finditer(r"^(\S+ \[\S+\])\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%$", out, re.M)}
        expect = {
            "skinny_gemm_kernel [640x1x1]": ("2", "7.50", "15.0", "50.0"),
            "attention_decode_kernel [16x4x1]": ("1", "7.50", "7.0", "23.3"),
            "attention_split_merge_kernel [1x32x1]": ("1", "13.00", "7.0", "23.3"),
            "gather_convert_kernel [1x1x1]": ("1", "1.00", "1.0", "3.3"),
        }
        for name, want in expect.items():
            check(rows.get(name) == want, f"{name}: {rows.get(name)} != {want}")

        write_trace(path, 3, STEP[1:])
        res = run(path)
        check(res.returncode != 0 and "fewer than two launches" in res.stderr,
              f"a trace without the step's first kernel: exit {res.returncode}, {res.stderr!r}")

    for f in failures:
        print("FAILED:", f)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
