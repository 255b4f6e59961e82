#!/usr/bin/env bash
# Caption images with torchrun on every GPU: bash scripts/caption.sh --checkpoint CKPT --input PATH ... --out OUT
# All arguments go to caption_images.py (see docs/captioning.md). Same environment variables as scripts/train.sh:
#
#   NPROC      processes on this node (default: all visible GPUs, or 1 without CUDA)
#   FORCE_TORCHRUN=1  launch through torchrun even for a single process (which otherwise runs as plain python)
#   NNODES     nodes (default 1). With NNODES > 1 also set NODE_RANK, MASTER_ADDR and MASTER_PORT on every node.
#
# Each rank takes a disjoint share (whole shards where the input is sharded) and writes its own part file; rank 0
# merges them when --out is a file. Run the same command again to resume.
#
# Unlike train.sh it stays in the current folder, so relative --input / --out paths mean what they say.
set -euo pipefail
ENTRY="$(cd "$(dirname "$0")/.." && pwd)/caption_images.py"
PYTHON=${PYTHON:-python}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
NNODES=${NNODES:-1}
if [[ "$NNODES" -gt 1 ]]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run}"
  LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --rdzv_backend c10d
          --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-smile-blip-caption}")
else
  LAUNCH=(--standalone)  # a free local port: several single-node jobs can share a machine
fi
if [[ "$NPROC" -eq 1 && "$NNODES" -eq 1 && -z "${FORCE_TORCHRUN:-}" ]]; then
  # One process needs no process group; a user error is then one line on stderr with exit status 2.
  exec "$PYTHON" "$ENTRY" "$@"
fi
exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node "$NPROC" "$ENTRY" "$@"
