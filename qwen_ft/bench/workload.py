"""The benchmark's workload: conversations of exactly L tokens and the run config of each method.

QwenLM's table trains batch 1 x gradient accumulation 8 on rows of L tokens, so every conversation
here renders to exactly L ChatML tokens (half prompt, half reply; the reply is learned). The same
token rows feed qwen-ft and the Trainer + peft baseline.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from qwen_ft.config.schema import DEFAULT_SYSTEM as SYSTEM
from qwen_ft.errors import QwenFtError

METHODS = ("lora", "lora_emb", "qlora_bnb", "qlora_gptq", "full")
WORDS = (" the", " of", " and", " to", " in", " is", " that", " for", " it", " was", " on", " with")


@dataclass(frozen=True)
class Settings:
    """QwenLM's finetune.py settings behind its table (LoRA r 64, alpha 16, all linear layers)."""

    micro_batch_size: int = 1
    grad_accum: int = 8
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    learning_rate: float = 3e-4
    full_learning_rate: float = 1e-5
    gradient_checkpointing: bool = True

    def learning_rate_for(self, method: str) -> float:
        return self.full_learning_rate if method == "full" else self.learning_rate


def _single_token_words(tok) -> list[str]:
    words = [w for w in WORDS if len(tok.encode(w)) == 1]
    if len(words) < 2:
        raise QwenFtError(
            "the tokenizer encodes common English words as several tokens; the benchmark needs a Qwen vocabulary"
        )
    return words


def conversation(tok, length: int, seed: int) -> list[dict]:
    """A system/user/assistant conversation that renders to exactly `length` tokens.

    Raises:
        QwenFtError: `length` is too short for the ChatML framing, or the rendering is not exact.
    """
    words, rng = _single_token_words(tok), random.Random(seed)
    overhead = len(
        _ids(
            tok,
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": ""},
                {"role": "assistant", "content": ""},
            ],
        )[0]
    )
    free = length - overhead
    if free < 2:
        raise QwenFtError(f"sequence length {length} leaves no room for content ({overhead} framing tokens)")
    user = "".join(rng.choice(words) for _ in range(free // 2)).lstrip()
    reply = "".join(rng.choice(words) for _ in range(free - free // 2)).lstrip()
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": user},
        {"role": "assistant", "content": reply},
    ]
    got = len(_ids(tok, messages)[0])
    if got != length:
        raise QwenFtError(f"benchmark conversation renders to {got} tokens, not {length}")
    return messages


def _ids(tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) as qwen-ft's training renders `messages` (the tokenizer's chat template)."""
    from qwen_ft.data.render import Renderer

    ids, labels, _ = Renderer.of(tok).render({"messages": messages, "learn": [True]})
    return ids, labels


def write_workload(tok, length: int, n: int, out_dir: Path) -> tuple[Path, Path]:
    """conversations.jsonl (for qwen-ft) and rows.jsonl (input_ids/labels for the baseline), n of each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    convs, rows = out_dir / "conversations.jsonl", out_dir / "rows.jsonl"
    with convs.open("w") as fc, rows.open("w") as fr:
        for i in range(n):
            messages = conversation(tok, length, seed=i)
            ids, labels = _ids(tok, messages)
            fc.write(json.dumps({"messages": messages}) + "\n")
            fr.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    return convs, rows


def run_sections(
    method: str, model_dir: str, data_file: str, length: int, steps: int, work: Path, s: Settings = Settings()
) -> dict:
    """The qwen-ft run config (as YAML sections) of one benchmark case.

    Raises:
        QwenFtError: unknown method.
    """
    if method not in METHODS:
        raise QwenFtError(f"unknown benchmark method {method!r}; choose from {', '.join(METHODS)}")
    sections = {
        "model": {"path": model_dir, "gradient_checkpointing": s.gradient_checkpointing},
        "data": {"train_files": [data_file], "max_length": length, "cache_dir": str(work / "cache")},
        "method": "full" if method == "full" else ("qlora" if method.startswith("qlora") else "lora"),
        "train": {
            "output_dir": str(work / "out"),
            "micro_batch_size": s.micro_batch_size,
            "grad_accum": s.grad_accum,
            "max_steps": steps,
            "warmup_ratio": 0.0,
            "learning_rate": s.learning_rate_for(method),
        },
    }
    if method != "full":
        from qwen_ft.model.adapters import DEFAULT_DROPOUT

        lora: dict[str, object] = {"r": s.lora_r, "alpha": s.lora_alpha, "train_embeddings": method == "lora_emb"}
        if s.lora_dropout != DEFAULT_DROPOUT:  # the default is qwen-ft's own: 0 on adapted experts, as the baseline's
            lora["dropout"] = s.lora_dropout
        sections["lora"] = lora
    if method.startswith("qlora"):
        sections["quant"] = {"backend": method.split("_")[1]}
    return sections
