# Session 2026-11-23b call 4 (final code): 7B LoRA 2048 qwen-ft (compiled, 2x4, own fused loss) vs Trainer+peft 2x4 and 1x8; liger tests; profile_step in train mode
set -o pipefail
S=/tmp/gc/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl && tar -C $S -xJf .whl/pure.tar.xz
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
B="python3 -m qwen_ft.cli.main bench --shape 7b --work-dir /tmp/gc/bench --methods lora --lengths 2048"
timeout 200 $B --micro-batch 2 --warmup 2 --steps 6 --json $OUT/bench-7b-lora-2048-mb2.json model.compile=true 2>&1 | grep -v -i warn | tail -7
timeout 90 $B --baseline-only --warmup 1 --steps 4 --json $OUT/bench-7b-lora-2048-baseline-1x8.json 2>&1 | grep -v -i warn | tail -3
echo "bench done at $(( $(date +%s)-T0 )) s"
for f in /tmp/gc/bench/cases/*/log.txt; do echo "== $f"; tail -20 $f; done > $OUT/caselogs.txt
timeout 60 python3 -m pytest -p no:cacheprovider -rA --tb=short tests/gpu -k liger > $OUT/gpu-tests-liger.txt 2>&1; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu-tests-liger.txt | tail -4
echo "tests done at $(( $(date +%s)-T0 )) s"
timeout $(( 385 - ($(date +%s)-T0) )) python3 scripts/profile_step.py /tmp/gc/bench/cases/7b-lora-2048-qwen-ft/run.yaml train.output_dir=/tmp/gc/p model.compile=true --json $OUT/profile-7b-lora-2048-mb2-compiled.json > $OUT/profile.txt 2>&1; grep -v -i -E "warn|USDT" $OUT/profile.txt | tail -16
echo "all done at $(( $(date +%s)-T0 )) s"
