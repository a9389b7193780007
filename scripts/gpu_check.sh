#!/usr/bin/env bash
# One command for a GPU run: version probe, tests/gpu, the benchmark cases of the measurement issue
# (7B LoRA 2048 with the Trainer + peft baseline, 7B LoRA 8192, 7B Q-LoRA bnb and GPTQ at 2048) and
# profile_step on 7B LoRA 2048. Writes JSON and logs to OUTDIR (at most 8 files) and prints the goals.
#
# Usage: bash scripts/gpu_check.sh OUTDIR [WHEELS_DIR]
#   WHEELS_DIR: the packages a bare GPU machine lacks (it needs only torch, transformers, peft and
#   accelerate, and no network); scripts/gpu_wheels.sh DIR makes that folder where pip works.
#   PARTS="probe tests lora qlora profile" (the default) picks stages (lora = lora2048 + lora8192;
#   compile = 7B LoRA 2048 with model.compile=true, not in the default);
#   BENCH_STEPS (3): measured optimizer steps per case; WORK: checkpoints and installs (/tmp/qwen-ft-gpu-check);
#   PROFILE_OVERRIDES: key=value words for the profiled run, e.g. "model.compile=true".
# Budget: about 20 minutes on one H100 (random 7B checkpoints are written under WORK, ~25 GB).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [WHEELS_DIR]}
wheels=${2:-}
parts=${PARTS:-probe tests lora qlora profile}
work=${WORK:-/tmp/qwen-ft-gpu-check}
steps=${BENCH_STEPS:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [ -n "$wheels" ]; then  # wheels + pure-Python packages that have no wheel for this Python
  site="$work/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl || exit 1
  for t in "$wheels"/*.tar.xz; do [ -e "$t" ] && tar -C "$site" -xJf "$t"; done
  export PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$here" || exit 1
bench() { timeout "${BENCH_TIMEOUT:-400}" python3 -m qwen_ft.cli.main bench --shape 7b --work-dir "$work/bench" \
  --steps "$steps" "$@" 2>&1 | grep -v -i warning | tee -a "$out/log.txt"; }
has() { [[ " $parts " == *" $1 "* ]]; }

has probe && python3 scripts/gpu_probe.py "$out/probe.json" 2>&1 | tail -25
if has tests; then
  # the whole log goes to OUTDIR (a failure's traceback included); the summary to the terminal
  timeout "${TESTS_TIMEOUT:-400}" python3 -m pytest -q -p no:cacheprovider --tb=short tests/gpu > "$out/gpu-tests.txt" 2>&1
  grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu-tests.txt" | tail -20
fi
has lora || has lora2048 && bench --methods lora --lengths 2048 --json "$out/bench-7b-lora-2048.json"
has lora || has lora8192 && bench --methods lora --lengths 8192 --no-baseline --json "$out/bench-7b-lora-8192.json"
has compile && bench --methods lora --lengths 2048 --no-baseline --json "$out/bench-7b-lora-2048-compiled.json" \
  model.compile=true
has qlora && bench --methods qlora_bnb,qlora_gptq --lengths 2048 --no-baseline --json "$out/bench-7b-qlora-2048.json"
if has profile; then
  cfg="$work/bench/cases/7b-lora-2048-qwen-ft/run.yaml"
  [ -f "$cfg" ] || bench --methods lora --lengths 2048 --no-baseline --steps 1 --json "$work/warm.json" >/dev/null
  # shellcheck disable=SC2086 - PROFILE_OVERRIDES holds several key=value words
  timeout 300 python3 scripts/profile_step.py "$cfg" "train.output_dir=$work/profile-run" ${PROFILE_OVERRIDES:-} \
    --json "$out/profile-7b-lora-2048.json" 2>&1 | grep -v -i warning | tail -25 | tee -a "$out/log.txt"
fi
python3 -m qwen_ft.bench.goals "$out"/bench-*.json 2>&1 | tee -a "$out/log.txt"
