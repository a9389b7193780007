#!/usr/bin/env bash
# Train on several GPUs of one node (DDP): topology only; hyperparameters live in the YAML.
# Usage: NPROC=4 bash scripts/train_multi_gpu.sh CONFIG.yaml [key.sub=value ...]
#        (NPROC defaults to the number of GPUs nvidia-smi lists)
set -euo pipefail
config=${1:?usage: NPROC=N scripts/train_multi_gpu.sh CONFIG.yaml [key=value ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l)
  [ "$NPROC" -gt 0 ] || { echo "no GPU found by nvidia-smi; set NPROC" >&2; exit 2; }
fi
cmd=(torchrun --standalone --nproc_per_node "$NPROC" finetune.py --config "$config" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
