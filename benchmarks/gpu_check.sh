#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py): GPU-marked tests, throughput at the paper's MNIST
# configuration, one epoch of MNIST(U) P8, one table.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--mnist DIR] [--batch N]
#   benchmarks/gpu_check.sh --prepare-wheels DIR   # on a machine with the package index, beforehand
#
# On a CUDA machine that has PyTorch but cannot reach the package index, prepare the other packages here with
# --prepare-wheels (CPython 3.12, manylinux x86-64 wheels; pip builds a wheel where PyPI has only a source
# archive), copy DIR there and run:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare-wheels" ]; then
  dir=${2:?--prepare-wheels needs a folder}
  python=${PYTHON:-python3}
  # everything the project needs beyond PyTorch, numpy and what a CUDA image usually has (scipy, pandas, ...)
  "$python" -m pip wheel --no-deps --wheel-dir "$dir" . escnn lie_learn mrcfile starfile
  echo "wheels in $dir" >&2
  exit 0
fi
python=python3
[ -x .venv/bin/python ] && python=.venv/bin/python
export PYTHONPATH="$PWD/benchmarks:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" benchmarks/gpu_check.py "$@"
