"""GGUF export for llama.cpp, Ollama and LM Studio (`qwen-ft export DIR --to gguf`).

Light on purpose: the CLI reads the choices below without importing torch.
"""

# --dtype → (llama.cpp file type, the type of every quantizable tensor)
DTYPES = {"f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
