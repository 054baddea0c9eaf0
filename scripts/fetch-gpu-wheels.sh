#!/usr/bin/env bash
# Prepares .whl/site (git-ignored): the Python packages the GPU machine
# lacks for scripts/gpu-check.sh's baselines, unpacked so that a plain
# PYTHONPATH finds them there (the GPU machine has no network). Today:
# bitsandbytes 0.50.2 (QLoRA baseline of bench/peft_train_gpu.py), slimmed
# to its CUDA 13.0 library so the carried tree stays small (~5 MB).
#
# Usage: scripts/fetch-gpu-wheels.sh, then carry .whl with the GPU call:
#   run(command="bash scripts/gpu-check.sh", carry=[".gpu", ".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$tmp" bitsandbytes==0.50.2
rm -rf .whl/site
mkdir -p .whl/site
unzip -q -o "$tmp"/bitsandbytes-*.whl -d .whl/site \
  -x 'bitsandbytes/libbitsandbytes_cuda1[12]*' 'bitsandbytes/libbitsandbytes_rocm*' 'bitsandbytes/libbitsandbytes_cuda132.so'
du -sh .whl/site
