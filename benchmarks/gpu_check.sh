#!/usr/bin/env bash
# The GPU check, ready for any machine with CUDA and torch + torchvision + pyyaml (no DVC needed):
#   bash benchmarks/gpu_check.sh [FOLDER_WITH_THE_FOUR_GZ_FILES]
# Prints the benchmark (seed-style, plain model, compiled, bf16) on the GPU, then trains
# every run of params.yaml whole and prints each run's wall time: the targets are a 60-epoch
# report-model run in <= 30 s and the whole grid in <= 5 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # `stages` without installing the project
if [ ! -d data/fashion-mnist/FashionMNIST/raw ]; then
    python -m stages.fetch ${1:+--source "$1"}
fi
PYTHONUNBUFFERED=1 python benchmarks/bench_speed.py --device cuda --compile --bf16 --grid
