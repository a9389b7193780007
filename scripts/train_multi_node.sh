#!/usr/bin/env bash
# Train across several nodes: run this on every node. Topology only; hyperparameters live in the YAML.
# Usage: bash scripts/train_multi_node.sh CONFIG.yaml [key.sub=value ...]
#   NNODES       number of nodes                     (required)
#   NODE_RANK    this node's rank, 0..NNODES-1       (required)
#   MASTER_ADDR  address of node 0                   (required)
#   MASTER_PORT  port on node 0                      (default 29500)
#   NPROC        processes (GPUs) per node           (default: GPUs listed by nvidia-smi)
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
cmd=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" finetune.py --config "$config" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
