#!/usr/bin/env bash
# Train with torchrun: bash scripts/train.sh [CONFIG] [KEY=VALUE | --opt KEY=VALUE ...]
#
#   NPROC      processes on this node (default: all visible GPUs, or 1 without CUDA)
#   FORCE_TORCHRUN=1  launch through torchrun even for a single process (which otherwise runs as plain python)
#   NNODES     nodes (default 1). With NNODES > 1 also set NODE_RANK, MASTER_ADDR and MASTER_PORT on every
#              node; torchrun's c10d rendezvous joins them (see docs/training.md, "Multi-node").
# Run from the repository root or anywhere: the script moves there, so config paths are relative to it.
set -euo pipefail
cd "$(dirname "$0")/.."
ENTRY=${ENTRY:-train_caption.py}
CONFIG=${1:-configs/coco/smile.yaml}
shift $(( $# > 0 ? 1 : 0 ))

ARGS=()
for arg in "$@"; do
  if [[ "$arg" != -* && "$arg" == *=* ]]; then ARGS+=(--opt "$arg"); else ARGS+=("$arg"); fi
done

PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run}"
  LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
          --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-smile-blip}")
else
  LAUNCH=(--standalone)  # a free local port: several single-node jobs can share a machine
fi
if [[ "$NPROC" -eq 1 && "$NNODES" -eq 1 && -z "${FORCE_TORCHRUN:-}" ]]; then
  # One process needs no process group, and without torchrun's launcher a user error (a config typo, an output
  # folder that holds a run) is one line on stderr with exit status 2 rather than torchrun's failure report.
  exec "$PYTHON" "$ENTRY" --config "$CONFIG" "${ARGS[@]}"
fi
exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node "$NPROC" "$ENTRY" --config "$CONFIG" "${ARGS[@]}"
