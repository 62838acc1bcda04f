#!/usr/bin/env bash
# Wheels for a GPU machine without network (the lent device machines): the packages
# profiling/gpu_check.sh uses that such an image lacks, for CPython 3.12 on x86-64 Linux.
#   bash profiling/gpu_wheels.sh            # here, once: writes .whl/ (ignored by git, ~2.5 MB)
# There, before gpu_check.sh (with .whl carried along):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   PYTHON=python3 bash profiling/gpu_check.sh "$OUT/gpu_check"
# liger-kernel: the Liger baselines (fused linear cross-entropy) and model.liger; webdataset,
# soundfile, soxr: the loader (imported by the attention and packing GPU tests). Dependencies
# are listed one by one (pip runs with --no-deps there); torch, triton, numpy, pyyaml and
# typing-extensions are in the image already.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
PYTHON="${PYTHON:-python3}"
for spec in liger-kernel==0.8.5 webdataset==1.0.2 braceexpand soundfile soxr cffi pycparser; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec"
done
ls -1 .whl
