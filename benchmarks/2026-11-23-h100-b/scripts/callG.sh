# Session 2026-11-23b call 1: the GPU tests not yet passed; compiled 2x4 vs baseline 2x4 with 6 measured steps; profile with sync sites
set -o pipefail
S=/tmp/gc/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl && tar -C $S -xJf .whl/pure.tar.xz
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
timeout 170 python3 -m pytest -p no:cacheprovider -rA --tb=long --durations=0 tests/gpu -k "gptq or zero3 or liger" > $OUT/gpu-tests-rest.txt 2>&1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu-tests-rest.txt | tail; echo "tests done at $(( $(date +%s)-T0 )) s"
B="python3 -m qwen_ft.cli.main bench --shape 7b --work-dir /tmp/gc/bench --methods lora --lengths 2048 --micro-batch 2"
TORCH_LOGS=recompiles,graph_breaks timeout 250 $B --warmup 2 --steps 6 --json $OUT/bench-7b-lora-2048-mb2.json model.compile=true 2>&1 | grep -v -i warn | tail -8 | tee -a $OUT/log.txt
echo "bench done at $(( $(date +%s)-T0 )) s"
for f in /tmp/gc/bench/cases/*/log.txt; do echo "== $f"; tail -60 $f; done > $OUT/caselogs.txt
timeout $(( 575 - ($(date +%s)-T0) )) python3 scripts/profile_step.py /tmp/gc/bench/cases/7b-lora-2048-qwen-ft/run.yaml train.output_dir=/tmp/gc/p model.compile=true --json $OUT/profile-7b-lora-2048-mb2-compiled.json > $OUT/profile.txt 2>&1; grep -v -i warn $OUT/profile.txt | tail -30
echo "all done at $(( $(date +%s)-T0 )) s"
