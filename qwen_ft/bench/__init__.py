"""Benchmark of fine-tuning speed and memory at the shapes of real Qwen models (`qwen-ft bench`).

shapes -> checkpoint (random weights, dense or GPTQ) -> workload (exact-length conversations, run
configs) -> measure/flops -> report; `baseline` runs the same workload through transformers' Trainer
+ peft. `qwen_ft/cli/bench.py` runs each case in its own process so peaks do not mix.
"""
