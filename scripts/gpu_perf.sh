#!/usr/bin/env bash
# Issue 34's one prepared GPU run: qwen-ft against Trainer + peft at an equal layout, and the memory goals.
#
# Usage: bash scripts/gpu_perf.sh [--dry-run] OUTDIR [WHEELS_DIR]
#   On the lent GPU, in stage order, each stage only while the budget lasts (BUDGET_S, default 450 s: the
#   whole script stays within 8 minutes; a stage that would start with under 60 s left is skipped and said):
#     lora2048  7B LoRA 2048, 2 x 4: qwen-ft (model.compile=true) and Trainer + peft, alternating, ROUNDS
#               rounds (default 1: A B; 2: A B A B), each case in its own process
#     loss256   lever 2: the 7B LoRA 2048 qwen-ft case with qwen-ft's own fused loss in chunks of 256 instead
#               of Liger's (train.loss_kernel=qwen-ft train.loss_chunk_tokens=256), beside the rows above
#     lora8192  7B LoRA 8192, qwen-ft only (the memory goal)
#     hostemb   lever 3: the 7B LoRA 2048 qwen-ft case with model.host_embedding=true (the peak, 1.16 GiB lower?)
#     budget19  lever 4: levers 2 and 3 together (chunk-256 loss, host embedding, AdamW moments on the host), and
#               the memory they free spent on leaving layers un-checkpointed within 19 GiB
#               (model.memory_budget_gib=19, the layers chosen by qwen-ft estimate)
#     fusedlora lever 7: 7B LoRA 2048 uncompiled, model.fused_lora false then true (the fused LoRA function)
#     offload   lever 3: 7B LoRA 2048 uncompiled with model.offload_checkpoint_inputs=true, beside fusedlora's
#               false row (the same case with the inputs on the device): the peak 0.97 GiB lower at equal speed?
#     qlora     7B Q-LoRA bitsandbytes and GPTQ at 2048 (the memory goals)
#     qwen35    Qwen3.5-9B LoRA 2048 beside Trainer + peft (not in the default PARTS)
#     moe       Qwen3-30B-A3B's layers (12 of 48) LoRA 2048 beside Trainer + peft (not in the default PARTS)
#   PARTS (default "lora2048 loss256 hostemb budget19 lora8192 qlora fusedlora offload"), BENCH_STEPS (3 measured steps, median reported), WORK
#   (random checkpoints; default /tmp/qwen-ft-gpu-perf). WHEELS_DIR: what a bare GPU machine lacks
#   (scripts/gpu_wheels.sh DIR). Every record has MFU, HFU and torchtitan's MFU (qwen_ft/bench/flops.py).
#   Writes OUTDIR/bench-*.json, probe.json (versions, device, attention kernels), run.json (date, git
#   commit, command, each stage's seconds or why it was skipped) and log.txt; prints the goals.
#   --dry-run: the same stages at the tiny shape and lengths 128 / 256 on this machine (CPU), so the
#   device minutes go to measuring.
set -uo pipefail
dry=0
[ "${1:-}" = "--dry-run" ] && { dry=1; shift; }
out=${1:?usage: bash scripts/gpu_perf.sh [--dry-run] OUTDIR [WHEELS_DIR]}
wheels=${2:-}
parts=${PARTS:-lora2048 loss256 hostemb budget19 lora8192 qlora fusedlora offload}
rounds=${ROUNDS:-1}
steps=${BENCH_STEPS:-3}
budget=${BUDGET_S:-$([ "$dry" = 1 ] && echo 1800 || echo 450)}  # a dry run on 2 CPU cores is slower
work=${WORK:-/tmp/qwen-ft-gpu-perf}
here=$(cd "$(dirname "$0")/.." && pwd)
start=$(date +%s)
mkdir -p "$out" "$work"
# graph breaks and recompilations of the compiled layers go to the log (checkpoint inside the graph, issue 34 lever 1)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TORCH_LOGS=${TORCH_LOGS:-graph_breaks,recompiles}
. "$here/scripts/gpu_env.sh"  # WHEELS_DIR installed, PYTHONPATH set, cd to the repository

if [ "$dry" = 1 ]; then shape=tiny; short=128; long=256; moe_shape=tiny-qwen3-moe; hybrid=tiny-qwen3.5
else shape=7b; short=2048; long=8192; moe_shape=qwen3-30b-a3b-12l; hybrid=qwen3.5-9b; fi
stages=()
left() { echo $((budget - ($(date +%s) - start))); }
# bench NAME ARGS...: one stage, timed, within what is left of the budget
bench() {
  local name=$1 t0 rc
  shift
  if [ "$(left)" -lt 60 ]; then
    echo "== $name: skipped, $(left) s of the ${budget} s budget left" | tee -a "$out/log.txt"
    stages+=("\"$name\": \"skipped: budget\"")
    return
  fi
  t0=$(date +%s)
  touch "$work/stage.stamp"
  timeout "$(left)" python3 -m qwen_ft.cli.main bench --shape "$shape" --work-dir "$work/bench" --steps "$steps" \
    "$@" 2>&1 | grep -v -i warning | tee -a "$out/log.txt"
  rc=${PIPESTATUS[0]}
  for f in "$work"/bench/cases/*/log.txt; do  # this stage's graph breaks, recompilations and errors
    [ "$f" -nt "$work/stage.stamp" ] && { echo "== $name: $f"; grep -i -E "graph break|recompil|error|traceback" "$f" | tail -20; }
  done >> "$out/log.txt"
  stages+=("\"$name\": {\"seconds\": $(($(date +%s) - t0)), \"rc\": $rc}")
}
has() { [[ " $parts " == *" $1 "* ]]; }

python3 scripts/gpu_probe.py "$out/probe.json" > "$out/probe.txt" 2>&1
if has lora2048; then  # alternating, one process per case, at the same 2 x 4 layout
  for r in $(seq 1 "$rounds"); do
    bench "lora$short-qwen-ft-$r" --methods lora --lengths "$short" --micro-batch 2 --warmup 2 --no-baseline \
      --json "$out/bench-lora-$short-qwen-ft-$r.json" model.compile=true
    bench "lora$short-baseline-$r" --methods lora --lengths "$short" --micro-batch 2 --warmup 2 --baseline-only \
      --json "$out/bench-lora-$short-baseline-$r.json"
  done
fi
has loss256 && bench "loss256-$short" --methods lora --lengths "$short" --micro-batch 2 --warmup 2 --no-baseline \
  --json "$out/bench-lora-$short-loss256.json" model.compile=true train.loss_kernel=qwen-ft train.loss_chunk_tokens=256
has hostemb && bench "hostemb-$short" --methods lora --lengths "$short" --micro-batch 2 --warmup 2 --no-baseline \
  --json "$out/bench-lora-$short-host-embedding.json" model.compile=true model.host_embedding=true
has budget19 && bench "budget19-$short" --methods lora --lengths "$short" --micro-batch 2 --warmup 2 --no-baseline \
  --json "$out/bench-lora-$short-budget19.json" model.compile=true model.host_embedding=true \
  train.loss_kernel=qwen-ft train.loss_chunk_tokens=256 train.adam_moments_on_host=true "model.memory_budget_gib=$([ "$dry" = 1 ] && echo 4 || echo 19)"
has lora8192 && bench "lora$long" --methods lora --lengths "$long" --no-baseline --warmup 2 \
  --json "$out/bench-lora-$long.json" model.compile=true
has qlora && bench "qlora$short" --methods qlora_bnb,qlora_gptq --lengths "$short" --no-baseline \
  --json "$out/bench-qlora-$short.json"
if has fusedlora; then
  for fused in false true; do
    bench "fusedlora-$fused" --methods lora --lengths "$short" --micro-batch 2 --no-baseline \
      --json "$out/bench-lora-$short-eager-fused-$fused.json" "model.fused_lora=$fused"
  done
fi
has offload && bench "offload-$short" --methods lora --lengths "$short" --micro-batch 2 --no-baseline \
  --json "$out/bench-lora-$short-eager-offload.json" model.offload_checkpoint_inputs=true
has qwen35 && bench "qwen35-$short" --shape "$hybrid" --methods lora --lengths "$short" --micro-batch 2 \
  --json "$out/bench-qwen35-lora-$short.json"
has moe && bench "moe-$short" --shape "$moe_shape" --methods lora --lengths "$short" \
  --json "$out/bench-moe-lora-$short.json"

python3 - "$out" "$dry" "$*" "${stages[@]}" <<'EOF'
import json, subprocess, sys, time
out, dry, args, stages = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
record = {
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "git_commit": commit or None,
    "command": "bash scripts/gpu_perf.sh " + ("--dry-run " if dry else "") + args,
    "stages": json.loads("{" + ", ".join(stages) + "}"),
}
open(f"{out}/run.json", "w").write(json.dumps(record, indent=1) + "\n")
EOF
python3 -m qwen_ft.bench.goals "$out"/bench-*.json 2>&1 | tee -a "$out/log.txt"
echo "gpu_perf: $(($(date +%s) - start)) s; results in $out"
