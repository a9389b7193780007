# Session 2026-11-23b call 2: loop step vs profiled step, variants alternated in one process; then 7B LoRA 8192
set -o pipefail
S=/tmp/gc/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl && tar -C $S -xJf .whl/pure.tar.xz
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
B="python3 -m qwen_ft.cli.main bench --shape 7b --work-dir /tmp/gc/bench --methods lora --no-baseline"
timeout 200 $B --lengths 2048 --micro-batch 2 --warmup 0 --steps 1 --json $OUT/setup.json model.compile=true 2>&1 | grep -v -i warn | tail -3
echo "setup done at $(( $(date +%s)-T0 )) s"
timeout 260 python3 .whl/diag.py /tmp/gc/bench/cases/7b-lora-2048-qwen-ft/run.yaml $OUT/diag.json > $OUT/diag.txt 2>&1; grep -v -i warn $OUT/diag.txt | tail -16
echo "diag done at $(( $(date +%s)-T0 )) s"
timeout $(( 560 - ($(date +%s)-T0) )) $B --lengths 8192 --warmup 2 --steps 3 --json $OUT/bench-7b-lora-8192.json model.compile=true 2>&1 | grep -v -i warn | tail -6
for f in /tmp/gc/bench/cases/*/log.txt; do echo "== $f"; tail -30 $f; done > $OUT/caselogs.txt
echo "all done at $(( $(date +%s)-T0 )) s"
