#!/usr/bin/env python3
"""The `cpinfer logits` / `cpinfer generate` paths with context parallelism, through the built
binary: local threads and mpirun processes give the single-rank answer; bad flag combinations give
one clear error line and a non-zero exit.

usage: cli_cp_test.py CPINFER_BINARY FIXTURE_DIR [--mpirun PATH]
"""
import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cli_check import MPI_ARGS, check, finish, run  # noqa: E402


def rel_err(a, b):
    d = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    m = max(abs(y) for rb in b for y in rb)
    return d / m


def main():
    binary, fixture = sys.argv[1], sys.argv[2]
    mpirun = sys.argv[sys.argv.index("--mpirun") + 1] if "--mpirun" in sys.argv else None
    vocab = json.load(open(os.path.join(fixture, "config.json")))["vocab_size"]
    rng = random.Random(5)
    ids = ",".join(str(rng.randrange(vocab)) for _ in range(1201))
    base = [binary, "logits", "--model-path", fixture, "--input-ids", ids, "--last", "3", "--json"]
    ref = json.loads(run(base).stdout)
    check(len(ref["argmax"]) == 1201 and len(ref["logits"]) == 3, "logits JSON has argmax per position and K rows")

    variants = [("local cp=3", base + ["--attn-cp-size", "3", "--enable-prefill-cp"]),
                ("local cp=4 world=8", base + ["--attn-cp-size", "4", "--world-size", "8", "--enable-prefill-cp"]),
                ("local cp=3 --kv-shard", base + ["--attn-cp-size", "3", "--enable-prefill-cp", "--kv-shard"]),
                ("local cp=4 world=8 --kv-shard", base + ["--attn-cp-size", "4", "--world-size", "8",
                                                         "--enable-prefill-cp", "--kv-shard"]),
                # attention TP: --tp-size is SGLang's name of the world size; TP = tp-size / attn-cp-size
                ("local --tp-size 2 (attention TP 2)", base + ["--tp-size", "2"]),
                ("local --tp-size 4 (attention TP 4, kv heads replicated)", base + ["--tp-size", "4"]),
                ("local --tp-size 4 --attn-cp-size 2", base + ["--tp-size", "4", "--attn-cp-size", "2",
                                                              "--enable-prefill-cp"])]
    if mpirun:
        for n in (2, 4, 8):
            variants.append((f"mpirun -np {n}", [mpirun, *MPI_ARGS, "-np", str(n), *base, "--comm", "mpi",
                                                 "--attn-cp-size", str(n), "--enable-prefill-cp"]))
        variants.append(("mpirun -np 2 --tp-size 2", [mpirun, *MPI_ARGS, "-np", "2", *base, "--comm", "mpi",
                                                      "--tp-size", "2"]))
        variants.append(("mpirun -np 4 attention TP 2 x CP 2", [mpirun, *MPI_ARGS, "-np", "4", *base, "--comm",
                                                                "mpi", "--attn-cp-size", "2", "--enable-prefill-cp"]))
        variants.append(("mpirun -np 3 --kv-shard", [mpirun, *MPI_ARGS, "-np", "3", *base, "--comm", "mpi",
                                                     "--attn-cp-size", "3", "--enable-prefill-cp", "--kv-shard"]))
    for name, cmd in variants:
        out = json.loads(run(cmd).stdout)
        check(out["argmax"] == ref["argmax"], f"{name}: argmax at every position equals cp=1")
        err = rel_err(out["logits"], ref["logits"])
        check(err <= 1e-5, f"{name}: last-3 logits within 1e-5 relative of cp=1 (got {err:.3g})")

    # --tp-size is SGLang's name of the world size, without a warning.
    same = run(base + ["--attn-cp-size", "2", "--tp-size", "2", "--enable-prefill-cp"])
    check("deprecated" not in same.stderr, "--tp-size is not deprecated")
    check(json.loads(same.stdout)["argmax"] == ref["argmax"], "--tp-size 2 --attn-cp-size 2 runs as --world-size 2")

    gen = [binary, "generate", "--model-path", fixture, "--input-ids", ids, "--max-new-tokens", "20",
           "--ignore-eos", "--json"]
    g1 = json.loads(run(gen).stdout)["output_ids"]
    check(len(g1) == 20, "generate --json returns 20 output ids")
    g2 = json.loads(run(gen + ["--attn-cp-size", "5", "--enable-prefill-cp"]).stdout)["output_ids"]
    check(g2 == g1, "greedy continuation after a cp=5 prefill equals cp=1")
    if mpirun:
        g3 = json.loads(run([mpirun, *MPI_ARGS, "-np", "2", *gen, "--comm", "mpi", "--attn-cp-size", "2",
                             "--enable-prefill-cp"]).stdout)["output_ids"]
        check(g3 == g1, "greedy continuation under mpirun -np 2 equals cp=1")
        g6 = json.loads(run([mpirun, *MPI_ARGS, "-np", "2", *gen, "--comm", "mpi", "--tp-size", "2"]).stdout)
        check(g6["output_ids"] == g1, "greedy continuation under mpirun -np 2 with attention TP 2 equals one rank")
        g5 = json.loads(run([mpirun, *MPI_ARGS, "-np", "4", *gen, "--comm", "mpi", "--attn-cp-size", "4",
                             "--enable-prefill-cp", "--kv-shard", "--kv-interleave", "3"]).stdout)["output_ids"]
        check(g5 == g1, "greedy continuation under mpirun -np 4 with --kv-shard (prefill ring, 19 sharded "
                        "decode steps) equals cp=1")
    g4 = json.loads(run(gen + ["--attn-cp-size", "3", "--enable-prefill-cp", "--kv-shard"]).stdout)["output_ids"]
    check(g4 == g1, "greedy continuation with --kv-shard over 3 local ranks equals cp=1")
    g7 = json.loads(run(gen + ["--world-size", "4", "--attn-cp-size", "2", "--enable-prefill-cp"]).stdout)
    check(g7["output_ids"] == g1, "greedy continuation with attention TP 2 x CP 2 equals one rank")

    bad = [
        (base + ["--attn-cp-size", "3", "--world-size", "4"], "does not divide"),
        (base + ["--attn-cp-size", "3", "--tp-size", "4"], "does not divide"),
        (base + ["--world-size", "2", "--tp-size", "2"], "excludes"),
        (base + ["--tp-size", "3"], "num_attention_heads divisible by 3"),
        (base + ["--comm", "mpi"], "mpirun"),
        (base + ["--attn-cp-size", "0"], "attn-cp-size"),
        (base + ["--kv-shard", "--kv-interleave", "0"], "kv-interleave"),
        ([binary, "logits", "--model-path", fixture, "--input-ids", "1,x,3"], "not a non-negative token id"),
        ([binary, "logits", "--model-path", fixture, "--input-ids", str(vocab + 5)], "outside the vocabulary"),
        ([binary, "logits", "--model-path", fixture + "/nope", "--input-ids", "1"], "nope"),
        ([binary, "generate", "--model-path", fixture, "--input-ids", "1", "--temperature", "-1"], "temperature"),
    ]
    for cmd, needle in bad:
        p = run(cmd, expect_ok=False)
        lines = [l for l in p.stderr.strip().splitlines() if l]
        check(p.returncode != 0 and lines and needle in lines[-1] and "Segmentation" not in p.stderr,
              f"bad flags {' '.join(cmd[2:])[-60:]!r}: exit {p.returncode}, says {lines[-1][:120] if lines else ''!r}")

    finish()


if __name__ == "__main__":
    main()
