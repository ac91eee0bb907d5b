#!/usr/bin/env python3
"""bench/ncu_sass.py on a synthetic SASS export whose numbers are known: two kernels in ncu's
`--page source --csv --print-source sass` layout; the first has a run of ten FFMAs whose even
positions draw 10 samples each and odd ones 2, a warpgroup MMA with 50 samples of which the export
explains 5, and a few other instructions. Checks the totals, the opcode and stall shares, the
(unlisted) samples, the even / odd run split, --kernel by index and by name, --range, and clear
errors for a file without SASS rows and a bad range."""
import os
import re
import subprocess
import sys
import tempfile

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench", "ncu_sass.py")
HDR = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed", "stall_dispatch",
       "stall_wait", "stall_short_sb", "stall_dispatch (Not Issued)"]


def rows_k0():
    r = [["0x0", "S2R R0, SR_TID.X", 0, 1, 0, 0, 0, 0],
         ["0x10", "@!P0  LDS R1, [R2]", 4, 100, 0, 0, 4, 0],
         ["0x20", "QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], RZ, !UPT", 50, 100, 2, 3, 0, 9]]
    for j in range(10):
        s = 10 if j % 2 == 0 else 2
        r.append([f"0x{48 + 16 * j:x}", f"FFMA R{100 + j}, R{24 + j}, R3, R{100 + j}", s, 100, s, 0, 0, 99])
    r.append(["0x200", "EXIT", 0, 4, 0, 0, 0, 0])
    return r


def write(path, kernels):
    with open(path, "w") as f:
        for name, rows in kernels:
            f.write(f'"Kernel Name","{name}"\n')
            f.write(",".join(f'"{h}"' for h in HDR) + "\n")
            for r in rows:
                f.write(",".join(f'"{x}"' for x in r) + "\n")


def run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)


def main():
    failures = []

    def check(cond, what, out=""):
        if not cond:
            failures.append(what + ("\n" + out if out else ""))

    def has(out, *fields):  # a line with these fields, any spacing between them
        return re.search(r"^\s*" + r"\s+".join(re.escape(f) for f in fields) + r"\s*$", out, re.M) is not None

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sass.csv")
        write(path, [("void gate_kernel<1>(Args)", rows_k0()),
                     ("void down_kernel<0>(Args)", [["0x0", "FADD R1, R2, R3", 7, 9, 7, 0, 0, 0]])])
        r = run(path, "--kernel", "0", "--runs", "FFMA", "--top", "3")
        o = r.stdout
        check(r.returncode == 0, "exit 0", r.stderr)
        # 4 + 50 + 5·10 + 5·2 = 114 samples; 1 + 100 + 100 + 1000 + 4 = 1205 executed.
        check("114 warp samples, 1205 warp instructions executed" in o, "totals", o)
        check(has(o, "FFMA", "52.6%", "83.0%"), "FFMA share: 60/114 samples, 1000/1205 executed", o)
        check(has(o, "QGMMA", "43.9%", "8.3%"), "QGMMA share", o)
        check(has(o, "LDS", "3.5%", "8.3%"), "predicate dropped from the opcode", o)
        # dispatch 2 + 60 = 62; (unlisted) 114 - 62 - 3 - 4 = 45; the (Not Issued) column is not a reason.
        check(has(o, "dispatch", "54.4%"), "dispatch share", o)
        check(has(o, "(unlisted)", "39.5%"), "unlisted share", o)
        check(has(o, "wait", "2.6%"), "wait share", o)
        check("runs of >= 8 FFMA: 1, samples at even positions 50, at odd 10 (5.00x)" in o, "even / odd run split", o)
        top = [line for line in o.splitlines() if re.match(r"\s+\d+\s+\d+\s", line)]
        check(len(top) == 3 and "QGMMA" in top[0] and "(unlisted) 45" in top[0], "top instruction and its reasons", o)
        check("down_kernel" not in o, "--kernel 0 prints only the first kernel", o)

        r = run(path, "--kernel", "down")
        check(r.returncode == 0 and "down_kernel" in r.stdout and "gate_kernel" not in r.stdout, "--kernel by name",
              r.stdout + r.stderr)
        check("7 warp samples, 9 warp instructions executed" in r.stdout, "second kernel's totals", r.stdout)

        r = run(path, "--kernel", "0", "--range", "3:5")
        check("instructions 3..4: 12 warp samples, 200 warp" in r.stdout, "--range 3:5 is the first two FFMAs", r.stdout)

        r = run(path)
        check(r.stdout.count("== void") == 2, "both kernels by default", r.stdout)

        for bad in (["--range", "5:3"], ["--range", "x"], ["--kernel", "7"], ["--kernel", "nope"]):
            r = run(path, *bad)
            check(r.returncode != 0 and "ncu_sass:" in r.stderr, f"clear error for {bad}", r.stdout + r.stderr)

        empty = os.path.join(d, "empty.csv")
        with open(empty, "w") as f:
            f.write("==PROF== nothing here\n")
        r = run(empty)
        check(r.returncode != 0 and "no SASS rows" in r.stderr, "file without SASS rows", r.stdout + r.stderr)

    for f in failures:
        print("FAIL:", f)
    print("ncu_sass_test:", "ok" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
