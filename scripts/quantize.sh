#!/usr/bin/env bash
# GPTQ-quantize a merged model, calibrated on a conversation file.
# Usage: bash scripts/quantize.sh MODEL_DIR OUT_DIR CALIBRATION.jsonl [--bits 4] [--group-size 128]
set -euo pipefail
model=${1:?usage: scripts/quantize.sh MODEL_DIR OUT_DIR CALIBRATION.jsonl [options]}
out=${2:?usage: scripts/quantize.sh MODEL_DIR OUT_DIR CALIBRATION.jsonl [options]}
calib=${3:?usage: scripts/quantize.sh MODEL_DIR OUT_DIR CALIBRATION.jsonl [options]}
shift 3
cmd=(qwen-ft quantize "$model" --out "$out" --calibration "$calib" "$@")
echo "+ ${cmd[*]}"
exec "${cmd[@]}"
