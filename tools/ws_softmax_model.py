#!/usr/bin/env python3
"""A numerical model of the ws attention kernel's online softmax (src/backends/cuda/kernels/attention_ws.cu)
on the late-jump test cases of tests/gpu/gpu_attention_test.cpp (4 query / 2 KV heads, head dim
128; 700 queries at position 0 and 300 at position 200; 40 keys of each sequence from key F on
scaled by B), in numpy, against a float64 reference.

Modes: "one" finds every row's max on every tile (the default kernel); "first" is the first of two
passes (AttentionWsConfig::two_pass): the max only on an item's first and last tiles, on masked
tiles and in warps (16 rows) with a row still at -inf. Tiles run from the diagonal down, as in the
kernel; P is rounded to bf16 for P·V, l sums the fp32 values. For each case F:B it prints the work
items whose l or O overflowed (the first pass flags them for the second) and, over the others, the
largest absolute error of the bf16 output and its normalized squared error. Distributions as the
test's, not its random numbers.

    python3 tools/ws_softmax_model.py [--cases 130:1,130:8,130:16,130:64,0:64] [--seed 1]

Needs numpy (Debian: python3-numpy); ~15 s.
"""
import argparse

import numpy as np

HQ, HKV, D, BM, BN = 4, 2, 128, 128, 128
BLOCKS = [(700, 0, 0), (300, 200, 1)]  # (queries, first position, sequence)


def bf16(x):
    """Round to nearest even bf16, kept as float32."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.astype(np.uint32).view(np.float32)


def consumer(q, pos, wg_pos0, k, v, mode):
    """One consumer's 64 (or fewer) rows over the keys [0, pos[-1]]: out (fp32) or None on overflow."""
    sl2 = np.float32(np.log2(np.e) / np.sqrt(D))
    n = len(pos)
    m = np.full(n, -np.inf, np.float32)
    l = np.zeros(n, np.float32)
    o = np.zeros((n, D), np.float32)
    top = pos[-1] // BN
    with np.errstate(all="ignore"):
        for j, t in enumerate(range(top, -1, -1)):
            keys = np.arange(t * BN, t * BN + BN)
            valid = keys < len(k)
            kk = np.where(valid[:, None], k[np.minimum(keys, len(k) - 1)], 0).astype(np.float32)
            vv = np.where(valid[:, None], v[np.minimum(keys, len(k) - 1)], 0).astype(np.float32)
            s = q @ kk.T
            masked = t * BN + BN - 1 > wg_pos0
            if masked:
                s = np.where(keys[None, :] > pos[:, None], -np.inf, s)
            find = np.ones(n, bool)
            if mode == "first" and 0 < j < top and not masked:
                for w in range(0, n, 16):
                    find[w:w + 16] = np.any(np.isinf(m[w:w + 16]))
            row_max = np.where(find, s.max(1) * sl2, -np.inf).astype(np.float32)
            m_new = np.maximum(m, row_max)
            m_use = np.where(np.isinf(m_new), 0, m_new).astype(np.float32)
            corr = np.exp2(m - m_use).astype(np.float32)
            m = m_new
            p = np.exp2(s * sl2 - m_use[:, None]).astype(np.float32)
            l = l * corr + p.sum(1, dtype=np.float32)
            o = o * corr[:, None] + bf16(p) @ vv
        if not (np.all(np.isfinite(l)) and np.all(np.isfinite(o))):
            return None
        return o / l[:, None]


def run(first_key, k_boost, seed, mode):
    rng = np.random.default_rng(seed)
    seq_len = {0: 700, 1: 500}
    k = {s: bf16(rng.standard_normal((n, HKV, D))) for s, n in seq_len.items()}
    v = {s: bf16(rng.standard_normal((n, HKV, D))) for s, n in seq_len.items()}
    for s in k:
        k[s][first_key:first_key + 40] *= k_boost
    items = overflowed = 0
    worst = num = den = 0.0
    for q_len, p0, s in BLOCKS:
        q_all = bf16(1.5 * rng.standard_normal((q_len, HQ, D)))
        for h in range(HQ):
            kvh = h // (HQ // HKV)
            for mt in range((q_len + BM - 1) // BM):
                items += 1
                over = False
                for cw in range(2):
                    rows = np.arange(mt * BM + cw * 64, min(q_len, mt * BM + cw * 64 + 64))
                    if len(rows) == 0:
                        continue
                    pos = p0 + rows
                    q = q_all[rows, h].astype(np.float32)
                    out = consumer(q, pos, p0 + mt * BM + cw * 64, k[s][:, kvh], v[s][:, kvh], mode)
                    if out is None:
                        over = True
                        continue
                    kk = k[s][:pos[-1] + 1, kvh].astype(np.float64)
                    vv = v[s][:pos[-1] + 1, kvh].astype(np.float64)
                    sc = q.astype(np.float64) @ kk.T / np.sqrt(D)
                    sc = np.where(np.arange(len(kk))[None, :] > pos[:, None], -np.inf, sc)
                    pr = np.exp(sc - sc.max(1, keepdims=True))
                    ref = pr @ vv / pr.sum(1, keepdims=True)
                    err = bf16(out) - ref
                    worst = max(worst, float(np.abs(err).max()))
                    num += float((err**2).sum())
                    den += float((ref**2).sum())
                overflowed += over
    return items, overflowed, worst, num / max(den, 1e-300)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default="130:1,130:8,130:16,130:64,0:64")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    for case in a.cases.split(","):
        first_key, kb = int(case.split(":")[0]), float(case.split(":")[1])
        for mode in ("one", "first"):
            items, over, worst, nmse = run(first_key, kb, a.seed, mode)
            print(f"keys {first_key}-{first_key + 39} x {kb:g}, {mode:5s}: {over:2d} of {items} items overflowed; "
                  f"the others: max |err| {worst:.2e}, nmse {nmse:.2e}")


if __name__ == "__main__":
    main()
