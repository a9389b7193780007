# Sourced by scripts/gpu_check.sh and scripts/gpu_perf.sh (it sets their environment; not run on its own).
# Needs: here (the repository), work (scratch), wheels (WHEELS_DIR or empty). A bare GPU machine has only torch,
# transformers, peft and accelerate and no network: WHEELS_DIR (scripts/gpu_wheels.sh) brings the rest, wheels
# installed into $work/site and the pure-Python packages with no wheel for its Python unpacked there.
if [ -n "$wheels" ]; then
  site="$work/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$wheels"/*.whl || exit 1
  for t in "$wheels"/*.tar.xz; do [ -e "$t" ] && tar -C "$site" -xJf "$t"; done
  export PYTHONPATH="$site:$here${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$here" || exit 1
