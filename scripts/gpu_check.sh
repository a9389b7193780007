#!/usr/bin/env bash
# One command for a GPU run: version probe, tests/gpu, the benchmark cases of the measurement issue
# (7B LoRA 2048 with the Trainer + peft baseline, 7B LoRA 8192, 7B Q-LoRA bnb and GPTQ at 2048) and
# profile_step on 7B LoRA 2048. Writes JSON and logs to OUTDIR (8 files with the default PARTS; the
# device tool brings back at most 8) and prints the goals.
#
# Usage: bash scripts/gpu_check.sh OUTDIR [WHEELS_DIR]
#   WHEELS_DIR: the packages a bare GPU machine lacks (it needs only torch, transformers, peft and
#   accelerate, and no network); scripts/gpu_wheels.sh DIR makes that folder where pip works.
#   PARTS="probe tests lora qlora profile" (the default) picks stages (lora = lora2048 + lora8192, both
#   with model.compile=true, 2048 at 2 x 4 beside the baseline at 2 x 4 and at QwenLM's 1 x 8;
#   eager = qwen-ft uncompiled at 1 x 8, not in the default; qwen35 = Qwen3.5-9B LoRA at 2048 beside the
#   baseline and at 8192, uncompiled, not in the default: bring flash-linear-attention in WHEELS_DIR;
#   moe = Qwen3-30B-A3B's layers (12 of 48) LoRA bf16 at 2048 beside the baseline, not in the default);
#   BENCH_STEPS (3): measured optimizer steps per case; WORK: checkpoints and installs (/tmp/qwen-ft-gpu-check);
#   PROFILE_OVERRIDES: key=value words for the profiled run (default "model.compile=true").
# Budget: about 20 minutes on one H100 (random 7B checkpoints are written under WORK, ~25 GB).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [WHEELS_DIR]}
wheels=${2:-}
parts=${PARTS:-probe tests lora qlora profile}
work=${WORK:-/tmp/qwen-ft-gpu-check}
steps=${BENCH_STEPS:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" "$work"
# recompilations of the compiled layers go to each case's log (their tails end OUTDIR/log.txt)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_LOGS=${TORCH_LOGS:-recompiles}

. "$here/scripts/gpu_env.sh"  # WHEELS_DIR installed, PYTHONPATH set, cd to the repository
bench() { timeout "${BENCH_TIMEOUT:-400}" python3 -m qwen_ft.cli.main bench --shape 7b --work-dir "$work/bench" \
  --steps "$steps" "$@" 2>&1 | grep -v -i warning | tee -a "$out/log.txt"; }
has() { [[ " $parts " == *" $1 "* ]]; }

has probe && python3 scripts/gpu_probe.py "$out/probe.json" 2>&1 | tail -25
if has tests; then
  # the whole log goes to OUTDIR (a failure's traceback included); the summary to the terminal
  timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu > "$out/gpu-tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu-tests.txt" | tail -20
fi
# 7B LoRA 2048: qwen-ft compiled at 2 sequences x 4 accumulation against Trainer + peft at the same
# micro-batch, then Trainer + peft at QwenLM's 1 x 8 (both ratios are reported; 8 sequences per step)
if has lora || has lora2048; then
  bench --methods lora --lengths 2048 --micro-batch 2 --warmup 2 --json "$out/bench-7b-lora-2048.json" model.compile=true
  bench --methods lora --lengths 2048 --baseline-only --json "$out/bench-7b-lora-2048-baseline-1x8.json"
fi
has lora || has lora8192 && bench --methods lora --lengths 8192 --no-baseline --warmup 2 \
  --json "$out/bench-7b-lora-8192.json" model.compile=true
has eager && bench --methods lora --lengths 2048 --no-baseline --json "$out/bench-7b-lora-2048-eager-1x8.json"
if has qwen35; then  # the hybrid shape: packed rows exact through the GDN layers (fla kernels where installed)
  bench --shape qwen3.5-9b --methods lora --lengths 2048 --micro-batch 2 --json "$out/bench-qwen3.5-9b-lora-2048.json"
  bench --shape qwen3.5-9b --methods lora --lengths 8192 --no-baseline --json "$out/bench-qwen3.5-9b-lora-8192.json"
fi
has moe && bench --shape qwen3-30b-a3b-12l --methods lora --lengths 2048 \
  --json "$out/bench-qwen3-30b-a3b-12l-lora-2048.json"
has qlora && bench --methods qlora_bnb,qlora_gptq --lengths 2048 --no-baseline --json "$out/bench-7b-qlora-2048.json"
if has profile; then
  cfg="$work/bench/cases/7b-lora-2048-qwen-ft/run.yaml"
  [ -f "$cfg" ] || bench --methods lora --lengths 2048 --micro-batch 2 --no-baseline --steps 1 \
    --json "$work/warm.json" >/dev/null
  # shellcheck disable=SC2086 - PROFILE_OVERRIDES holds several key=value words
  timeout 300 python3 scripts/profile_step.py "$cfg" "train.output_dir=$work/profile-run" \
    ${PROFILE_OVERRIDES:-model.compile=true} \
    --json "$out/profile-7b-lora-2048.json" 2>&1 | grep -v -i warning | tail -25 | tee -a "$out/log.txt"
fi
for f in "$work"/bench/cases/*/log.txt; do [ -f "$f" ] && { echo "== $f"; tail -40 "$f"; }; done >> "$out/log.txt"
python3 -m qwen_ft.bench.goals "$out"/bench-*.json 2>&1 | tee -a "$out/log.txt"
