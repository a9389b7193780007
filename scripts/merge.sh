#!/usr/bin/env bash
# Merge a LoRA output into its base (recorded in the output's manifest.json) as a standalone model.
# Usage: bash scripts/merge.sh ADAPTER_DIR OUT_DIR [--base DIR] [--dtype bf16]
set -euo pipefail
adapter=${1:?usage: scripts/merge.sh ADAPTER_DIR OUT_DIR [--base DIR] [--dtype D]}
out=${2:?usage: scripts/merge.sh ADAPTER_DIR OUT_DIR [--base DIR] [--dtype D]}
shift 2
cmd=(qwen-ft merge "$adapter" --out "$out" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
