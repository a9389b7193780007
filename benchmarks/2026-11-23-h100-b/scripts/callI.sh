# Session 2026-11-23b call 3: train-mode step, qwen-ft fused loss vs Liger alternated, profile; 7B Q-LoRA bnb + GPTQ at 2048
set -o pipefail
S=/tmp/gc/site; python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $S .whl/*.whl && tar -C $S -xJf .whl/pure.tar.xz
export PYTHONPATH=$S:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
timeout 270 python3 .whl/diag2.py $OUT/diag2.json 2 > $OUT/diag2.txt 2>&1; grep -v -i -E "warn|USDT" $OUT/diag2.txt | tail -40
echo "diag done at $(( $(date +%s)-T0 )) s"
timeout $(( 540 - ($(date +%s)-T0) )) python3 -m qwen_ft.cli.main bench --shape 7b --work-dir /tmp/gc/bench --methods qlora_bnb,qlora_gptq --lengths 2048 --no-baseline --warmup 1 --steps 3 --json $OUT/bench-7b-qlora-2048.json 2>&1 | grep -v -i warn | tail -8
for f in /tmp/gc/bench/cases/*qlora*/log.txt; do echo "== $f"; tail -30 $f; done > $OUT/caselogs.txt
echo "all done at $(( $(date +%s)-T0 )) s"
