#!/usr/bin/env bash
# Evaluate with torchrun: bash scripts/eval.sh [CONFIG] [--checkpoint PATH] [--split val|test] [KEY=VALUE ...]
# Same environment variables as scripts/train.sh (NPROC, NNODES, ...).
set -euo pipefail
ENTRY=eval_caption.py exec bash "$(dirname "$0")/train.sh" "${1:-configs/coco/eval_released.yaml}" "${@:2}"
