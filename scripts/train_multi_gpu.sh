#!/usr/bin/env bash
# Train on several GPUs of one node (DDP): topology only; hyperparameters live in the YAML.
# Usage: NPROC=4 bash scripts/train_multi_gpu.sh CONFIG.yaml [key.sub=value ...]
#        (NPROC defaults to the number of GPUs nvidia-smi lists)
#   MAX_RESTARTS=N  when a process dies (or a collective times out: train.collective_timeout), torchrun
#                   restarts the job up to N times and it resumes from its last checkpoint (train.resume=auto)
set -euo pipefail
config=${1:?usage: NPROC=N scripts/train_multi_gpu.sh CONFIG.yaml [key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC" -gt 0 ] || { echo "no GPU found by nvidia-smi; set NPROC" >&2; exit 2; }
fi
# A fresh rendezvous store per restart: torch's shared store can hand a restarted job the previous attempt's
# addresses (pytorch/pytorch#135712; seen here as "Gloo connectFullMesh failed ... Connection refused").
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
restarts=()
[ "${MAX_RESTARTS:-0}" -gt 0 ] && restarts=(--max-restarts "$MAX_RESTARTS")
resume=()
[ "${MAX_RESTARTS:-0}" -gt 0 ] && resume=(train.resume=auto)  # a restarted job goes on from its checkpoint
cmd=(torchrun --standalone --nproc_per_node "$NPROC" "${restarts[@]}" finetune.py --config "$config" "${resume[@]}" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
