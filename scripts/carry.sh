#!/usr/bin/env bash
# Here (no GPU): gather built binaries and the shared libraries a GPU machine lacks (PCRE2, utf8proc,
# OpenBLAS, Open MPI and what they pull in) and the Qwen3 tokenizer into one folder for
# CPINFER_PREBUILT.
#   scripts/carry.sh [BUILD_DIR] [DEST]      defaults: build .carry
# The folder is packed into DEST.tar.xz (the device tool carries at most 64 MiB). On the GPU machine:
#   tar -xJf .carry.tar.xz && CPINFER_PREBUILT=.carry scripts/gpu_check.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build}"
DEST="${2:-$ROOT/.carry}"
rm -rf "$DEST"
mkdir -p "$DEST/bin" "$DEST/lib"
for t in cpinfer gpu_ops_test gpu_moe_test gpu_sample_test gpu_model_test gpu_cp_test kv_shard_test gpu_fp8_fixture_test \
         attention_bench moe_bench; do
  f="$(find "$BUILD" -name "$t" -type f -perm -u+x | head -1)"
  [ -n "$f" ] && cp "$f" "$DEST/bin/" || echo "carry: no $t in $BUILD" >&2
done
# The Qwen3 tokenizer scripts/setup.sh extracts (serve --random-weights needs one).
[ -d "$BUILD/qwen3-tokenizer" ] && cp -r "$BUILD/qwen3-tokenizer" "$DEST/"
# OpenBLAS is opened at run time (not in ldd's list): carry it as its soname, with what it needs.
BLAS="$(ldconfig -p | awk '/libopenblas\.so\.0 .*x86-64/ && !f {print $NF; f = 1}')"  # no early exit: ldconfig would die of SIGPIPE
[ -n "$BLAS" ] && cp -L "$BLAS" "$DEST/lib/libopenblas.so.0"
# Libraries outside the CUDA toolkit and glibc (the GPU machine has both).
for b in "$DEST"/bin/* "$DEST"/lib/libopenblas.so.0; do [ -e "$b" ] && ldd "$b"; done | awk '/=> \//{print $3}' | sort -u |
  grep -vE '/cuda|/libc\.so|/libm\.so|/libstdc\+\+|/libgcc_s|/libpthread|/libdl\.so|/librt\.so|/ld-linux' |
  while read -r lib; do cp -L "$lib" "$DEST/lib/"; done
strip "$DEST"/bin/*
tar -C "$(dirname "$DEST")" -cf - "$(basename "$DEST")" | xz -T0 -6 > "$DEST.tar.xz"
du -sh "$DEST" "$DEST.tar.xz"
