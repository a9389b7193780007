#!/usr/bin/env bash
# Install the optional stacks reproducibly into the active environment (used by .ci/run):
# bitsandbytes + GPTQ (Q-LoRA), DeepSpeed, and TRL (the preference objectives' test oracle). Both gptqmodel 7.6.0 and deepspeed 0.19.8 ship as sdists
# that must build against the installed torch: with build isolation pip would fetch a CUDA torch to build.
#
# gptqmodel 7.7 needs torch >= 2.14.1; 7.6.0 works with torch 2.13 but declares pins (numpy==2.2.6, ...)
# that would replace the environment's torch/numpy, and ships only as an sdist. So: build it against
# the installed torch (no build isolation), without its declared dependencies, then add the small
# runtime requirements it actually imports, pinned to versions checked with torch 2.13.0 (CPU).
# Usage: bash scripts/install_extras.sh
set -euo pipefail
python -m pip install -q "bitsandbytes==0.50.2" "optimum==2.3.0"
python -m pip install -q --no-deps --no-build-isolation "gptqmodel==7.6.0"
python -m pip install -q "threadpoolctl==3.8.0" "device-smi==0.5.7" "pypcre==0.6.4" "tokenicer==0.0.14" \
  "logbar==0.4.15" "jinja2==3.1.6" "ninja==1.13.2" "defuser==0.0.28"
python -m pip install -q --no-deps "torchao==0.18.0"
python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
# sentencepiece: llama.cpp's convert_hf_to_gguf.py (the GGUF export's reference in the tests) imports it
python -m pip install -q "sentencepiece==0.2.3"
# TRL 1.16: its requirements (accelerate, datasets, pandas, ...) are already here; --no-deps keeps them as they are
python -m pip install -q --no-deps "trl==1.16.0"
python -c "import gptqmodel, bitsandbytes, optimum, deepspeed, trl, sentencepiece; print('extras: gptqmodel', gptqmodel.__version__, '| bitsandbytes', bitsandbytes.__version__, '| deepspeed', deepspeed.__version__, '| trl', trl.__version__)"
