#!/usr/bin/env bash
# Retrain the bundled digits model from configs/digits.toml. Writes out/digits.safetensors (and its
# training state beside it) by default, never the shipped diffreg/assets/digits.safetensors:
#   scripts/train_bundled.sh                       # -> out/digits.safetensors
#   OUTPUT=elsewhere.safetensors scripts/train_bundled.sh --threads 1
# About 12 minutes on an idle 2-core CPU (3500 steps x ~0.2 s); then sample and evaluate it:
#   diffreg sample out/digits.safetensors
#   python scripts/evaluate_bundled.py out/digits.safetensors
# To replace the shipped model on purpose, copy the file over diffreg/assets/digits.safetensors.
# `scripts/train_bundled.sh flow` retrains the flow-matching model from configs/flow_digits.toml
# (-> out/flow_digits.safetensors; the shipped one is diffreg/assets/flow_digits.safetensors):
#   python scripts/evaluate_bundled.py out/flow_digits.safetensors --samplers euler,dpmpp_2m
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = flow ]; then
    shift
    OUTPUT="${OUTPUT:-out/flow_digits.safetensors}"
    mkdir -p "$(dirname "$OUTPUT")"
    exec diffreg train --config configs/flow_digits.toml --output "$OUTPUT" --store-dtype float16 "$@"
fi
OUTPUT="${OUTPUT:-out/digits.safetensors}"
mkdir -p "$(dirname "$OUTPUT")"
diffreg train --config configs/digits.toml --output "$OUTPUT" --store-dtype float16 "$@"
