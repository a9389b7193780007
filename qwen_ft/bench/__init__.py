"""Benchmark of fine-tuning speed and memory at the shapes of real Qwen models (`qwen-ft bench`).

shapes -> checkpoint (random weights, dense or GPTQ) -> workload (exact-length conversations, run
configs) -> measure/flops -> report; `baseline` runs the same workload through transformers' Trainer
+ peft. `run` (orchestration) runs each case in its own process (`worker`) so peaks do not mix.
"""
