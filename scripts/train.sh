#!/usr/bin/env bash
# Train on one GPU (or CPU): topology only; hyperparameters live in the YAML.
# Usage: bash scripts/train.sh CONFIG.yaml [key.sub=value ...]
set -euo pipefail
config=${1:?usage: scripts/train.sh CONFIG.yaml [key=value ...]}
shift
cmd=(torchrun --standalone --nproc_per_node 1 finetune.py --config "$config" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
