"""Training entry point.

Run: torchrun --nproc_per_node 1 finetune.py --config configs/tiny_cpu_smoke.yaml [key=value ...]
     python finetune.py --config configs/tiny_cpu_smoke.yaml
"""

import sys

from qwen_ft.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
