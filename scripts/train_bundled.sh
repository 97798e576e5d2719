#!/usr/bin/env bash
# Retrain the bundled digits model (diffreg/assets/digits.safetensors) from configs/digits.toml.
# About 12 minutes on an idle 2-core CPU (3500 steps x ~0.2 s); then evaluate it:
#   python scripts/evaluate_bundled.py
set -euo pipefail
cd "$(dirname "$0")/.."
diffreg train --config configs/digits.toml --output diffreg/assets/digits.safetensors --store-dtype float16 "$@"
