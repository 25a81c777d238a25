#!/usr/bin/env bash
# Wheels that a GPU machine without network needs for `python -m benchmarks.gpu`, downloaded here into .whl/
# (git-ignored). The lent H100/H200 image already has torch, transformers, accelerate, pillow, numpy, safetensors
# and huggingface-hub for Python 3.12; Kiln's GPU path adds diffusers, torchao and diffusers' importlib_metadata.
# On the GPU machine, from the checkout with .whl/ beside it:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:. python3 -m benchmarks.gpu --out OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 torchao==0.18.0 importlib_metadata==8.7.0
ls .whl
