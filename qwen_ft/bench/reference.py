"""QwenLM's published fine-tuning figures (README: one A100-80GB, flash-attention 2, batch 1, gradient
accumulation 8; seconds are per optimizer step, i.e. per 8 sequences). (peak GB, seconds) by length."""

from __future__ import annotations

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)

_TABLE = {
    ("1.8b", "lora"): "6.7/1.0 7.4/1.0 8.4/1.1 11.0/1.7 16.2/3.3 21.8/6.8",
    ("1.8b", "qlora"): "5.8/1.4 6.0/1.4 6.6/1.4 7.8/2.0 10.2/3.4 15.8/6.5",
    ("7b", "lora"): "20.1/1.2 20.4/1.5 21.5/2.8 23.8/5.2 29.7/10.1 36.6/21.3",
    ("7b", "lora_emb"): "33.7/1.4 34.1/1.6 35.2/2.9 35.1/5.3 39.2/10.3 48.5/21.7",
    ("7b", "qlora"): "11.5/3.0 11.5/3.0 12.3/3.5 13.9/7.0 16.9/11.6 23.5/22.3",
}

# The goals qwen-ft sets itself on one H100 (shape, method, length): (max peak GiB, min MFU or None),
# and the speed-up over Trainer + peft in the same run (tokens/s ratio).
GOALS = {
    ("7b", "lora", 2048): (19.0, 0.40),  # issue 34: 40% MFU (45% the stretch)
    ("7b", "lora", 8192): (24.0, None),
    ("7b", "qlora_gptq", 2048): (10.0, None),
    ("7b", "qlora_bnb", 2048): (10.0, None),
}
SPEEDUP_GOALS = {("7b", "lora", 2048): 2.0}


def reference(shape: str, method: str, length: int) -> tuple[float, float] | None:
    """QwenLM's (peak GB, seconds per 8 sequences), or None where the table has no entry. Its Q-LoRA
    row (Int4 GPTQ bases) stands beside both Q-LoRA backends."""
    row = _TABLE.get((shape, "qlora" if method.startswith("qlora") else method))
    if row is None or length not in LENGTHS:
        return None
    gb, sec = row.split()[LENGTHS.index(length)].split("/")
    return float(gb), float(sec)
