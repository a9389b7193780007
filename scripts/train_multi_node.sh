#!/usr/bin/env bash
# Train across several nodes: run this on every node. Topology only; hyperparameters live in the YAML.
# Usage: bash scripts/train_multi_node.sh CONFIG.yaml [key.sub=value ...]
#   NNODES       number of nodes                     (required)
#   NODE_RANK    this node's rank, 0..NNODES-1       (required)
#   MASTER_ADDR  address of node 0                   (required)
#   MASTER_PORT  port on node 0                      (default 29500)
#   NPROC        processes (GPUs) per node           (default: GPUs listed by nvidia-smi)
#   MAX_RESTARTS restart the job up to N times when a process dies or a collective times out
#                (train.collective_timeout); it resumes from its last checkpoint (train.resume=auto).
#                Restarts use torchrun's c10d rendezvous on MASTER_ADDR:MASTER_PORT (NODE_RANK is then
#                assigned by it), which re-forms the job after a failure; without them, a fixed one.
# With DeepSpeed put data.cache_dir on a shared filesystem, or let each node tokenize its own copy.
set -euo pipefail
config=${1:?usage: NNODES=N NODE_RANK=R MASTER_ADDR=host scripts/train_multi_node.sh CONFIG.yaml [key=value ...]}
shift
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC" -gt 0 ] || { echo "no GPU found by nvidia-smi; set NPROC" >&2; exit 2; }
fi
if [ "${MAX_RESTARTS:-0}" -gt 0 ]; then
  # a fresh rendezvous store per restart (pytorch/pytorch#135712: a shared one can serve stale addresses)
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  launch=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-qwen-ft}"
          --max-restarts "$MAX_RESTARTS")
  resume=(train.resume=auto)
else
  launch=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
  resume=()
fi
cmd=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" "${launch[@]}" finetune.py --config "$config"
     "${resume[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
