#!/usr/bin/env bash
# Reproduce QwenLM's fine-tuning table on this GPU (random weights at the real shapes), with the
# Trainer + peft baseline beside it. Writes WORK_DIR/bench-{1.8b,7b}.json.
# Usage: bash scripts/bench_qwen_table.sh [WORK_DIR] [extra qwen-ft bench options, e.g. --steps 5]
# Needs: a CUDA GPU, the qlora and gptq extras (scripts/install_extras.sh), ~60 GB of disk for checkpoints.
set -euo pipefail
work=${1:-.cache/qwen-ft/bench}
shift || true
lengths=256,512,1024,2048,4096,8192
run() { echo "+ qwen-ft bench $*"; qwen-ft bench "$@"; }
run --shape 1.8b --methods lora,qlora_gptq,qlora_bnb --lengths "$lengths" --work-dir "$work" "$@"
run --shape 7b --methods lora,lora_emb,qlora_gptq,qlora_bnb --lengths "$lengths" --work-dir "$work" "$@"
