"""Shared by the tests that drive the built cpinfer binary: run a command, record checks, and end
with the closing line CI reads ('N passed, N failed')."""
import os
import subprocess
import sys

# mpirun as root in a container without network: allow root, oversubscribe the cores, shared memory.
MPI_ARGS = ["--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
            "--mca", "btl_vader_single_copy_mechanism", "none"]
ENV = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")
_passed = []
_failed = []


def run(cmd, expect_ok=True):
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    if expect_ok and p.returncode != 0:
        raise SystemExit(f"FAILED: {' '.join(cmd)}\nexit {p.returncode}\n{p.stderr[-3000:]}")
    return p


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    (_passed if cond else _failed).append(what)


def finish():
    print(f"{len(_passed)} passed, {len(_failed)} failed")
    sys.exit(1 if _failed else 0)
