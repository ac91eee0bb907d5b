#!/usr/bin/env python3
"""What a long tensor-core run sustains under the board's power limit: TFLOP/s, SM clock and power.

Runs one op back to back for --seconds and reports it window by window (--window seconds each):
TFLOP/s from CUDA events around the window's calls, the SM clock and board power sampled through NVML
every 50 ms while the window runs (median), TFLOP/s per GHz (the work per clock cycle) and GFLOP per
joule (the work per energy, what bounds a run that sits at the power limit). The steady state is the
median over the second half of the windows.

  --op gemm   torch.matmul of bf16 [M, K] x [K, N] (--shape M,N,K; default 8192,8192,8192): cuBLAS's
              dense GEMM, the ceiling of bf16 tensor work on the card.
  --op sdpa   causal scaled_dot_product_attention on cuDNN (torch's CUDNN_ATTENTION backend), B=1,
              32 q / 4 kv heads (enable_gqa), D=128, bf16, --seq keys; FLOPs 4*S^2*D*H/2.

Usage:  python3 bench/power_ceiling.py --op gemm [--shape 8192,8192,8192] [--seconds 12] [--json OUT]
        python3 bench/power_ceiling.py --op sdpa --seq 131072
"""

import argparse
import ctypes
import json
import statistics
import sys
import threading
import time


class Nvml:
    """SM clock (MHz) and board power (W) of GPU 0 through libnvidia-ml (comes with the driver)."""

    def __init__(self):
        self.ok = False
        try:
            self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return
        self.dev = ctypes.c_void_p()
        self.ok = (self.lib.nvmlInit_v2() == 0 and
                   self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.dev)) == 0)

    def read(self):
        mhz, mw = ctypes.c_uint(0), ctypes.c_uint(0)
        if not self.ok:
            return 0, 0.0
        self.lib.nvmlDeviceGetClockInfo(self.dev, 1, ctypes.byref(mhz))  # NVML_CLOCK_SM
        self.lib.nvmlDeviceGetPowerUsage(self.dev, ctypes.byref(mw))
        return mhz.value, mw.value / 1000.0


class Sampler:
    """Reads the clock and power every period seconds on a thread until stopped."""

    def __init__(self, nvml, period=0.05):
        self.nvml, self.period, self.samples = nvml, period, []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop_event.is_set():
            self.samples.append(self.nvml.read())
            time.sleep(self.period)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()


def make_op(torch, args):
    if args.op == "gemm":
        m, n, k = (int(x) for x in args.shape.split(","))
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        return (lambda: torch.matmul(a, b, out=out)), 2.0 * m * n * k, f"bf16 GEMM {m} x {n} x {k} (torch.matmul)"
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    s, h, hkv, d = args.seq, 32, 4, 128
    q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hkv, s, d, device="cuda", dtype=torch.bfloat16)

    def call():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return call, 4.0 * s * s * d * h / 2, f"causal SDPA on cuDNN, S {s}, 32 q / 4 kv heads, D 128, bf16"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["gemm", "sdpa"], default="gemm")
    parser.add_argument("--shape", default="8192,8192,8192", help="M,N,K of --op gemm")
    parser.add_argument("--seq", type=int, default=131072, help="S of --op sdpa")
    parser.add_argument("--seconds", type=float, default=12.0, help="how long to run the op back to back")
    parser.add_argument("--window", type=float, default=1.0, help="seconds a reported window lasts (about)")
    parser.add_argument("--json", help="write the windows and the steady state here")
    args = parser.parse_args()
    if args.seconds < 2 * args.window or args.window <= 0:
        sys.exit("power_ceiling: --seconds must be at least two --window")
    if args.op == "gemm" and (len(args.shape.split(",")) != 3 or
                              not all(x.strip().isdigit() and int(x) > 0 for x in args.shape.split(","))):
        sys.exit(f"power_ceiling: bad --shape {args.shape!r} (M,N,K)")
    if args.op == "sdpa" and args.seq < 1:
        sys.exit("power_ceiling: bad --seq")

    try:
        import torch
    except ImportError:
        sys.exit("power_ceiling: needs torch (the GPU machine's python3 has it)")
    if not torch.cuda.is_available():
        sys.exit("power_ceiling: needs a CUDA GPU")
    nvml = Nvml()
    fn, flops, what = make_op(torch, args)
    card = torch.cuda.get_device_name()
    print(f"power_ceiling: {what}; {card}, torch {torch.__version__}; NVML {'ok' if nvml.ok else 'unavailable'}",
          flush=True)
    # Calls per window from one timed call (after a warm-up).
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    calls = max(1, int(args.window / max(time.perf_counter() - t0, 1e-6)))
    windows = []
    start = time.perf_counter()
    print(f"{'window':>6} {'TFLOP/s':>8} {'MHz':>6} {'W':>6} {'TF/s/GHz':>9} {'GFLOP/J':>8}", flush=True)
    while time.perf_counter() - start < args.seconds:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with Sampler(nvml) as smp:
            e0.record()
            for _ in range(calls):
                fn()
            e1.record()
            e1.synchronize()
        ms = e0.elapsed_time(e1)
        tflops = flops * calls / (ms * 1e-3) / 1e12
        mhz = statistics.median(s[0] for s in smp.samples) if smp.samples else 0
        watts = statistics.median(s[1] for s in smp.samples) if smp.samples else 0.0
        w = {"tflops": round(tflops, 1), "sm_mhz": mhz, "watts": round(watts, 1),
             "tflops_per_ghz": round(tflops / (mhz / 1000), 1) if mhz else None,
             "gflop_per_joule": round(tflops * 1000 / watts, 1) if watts else None}
        windows.append(w)
        print(f"{len(windows):>6} {w['tflops']:>8.1f} {mhz:>6} {w['watts']:>6.1f} {str(w['tflops_per_ghz']):>9} "
              f"{str(w['gflop_per_joule']):>8}", flush=True)
    steady = windows[len(windows) // 2:]

    def med(key):
        vals = [w[key] for w in steady if w[key] is not None]
        return statistics.median(vals) if vals else None

    summary = {k: med(k) for k in ("tflops", "sm_mhz", "watts", "tflops_per_ghz", "gflop_per_joule")}
    print(f"steady (median of the last {len(steady)} windows): {summary['tflops']} TFLOP/s at {summary['sm_mhz']} MHz, "
          f"{summary['watts']} W; {summary['tflops_per_ghz']} TFLOP/s per GHz, {summary['gflop_per_joule']} GFLOP/J",
          flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "power_ceiling", "op": what, "card": card, "torch_version": torch.__version__,
                       "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "calls_per_window": calls,
                       "windows": windows, "steady": summary}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
