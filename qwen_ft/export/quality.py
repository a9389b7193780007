"""Quality probes for exported models: perplexity on held-out ChatML conversations."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from qwen_ft.data.conversations import ReadReport, read_conversations
from qwen_ft.errors import QwenFtError
from qwen_ft.train.loss import causal_lm_loss


def load_conversations(files: list[str], limit: int) -> list[dict]:
    """Up to `limit` normalised conversations (formats.py), bad rows skipped."""
    out = []
    for conv in read_conversations(files, None, "skip", ReadReport()):
        out.append(conv.conv)
        if len(out) >= limit:
            break
    if not out:
        raise QwenFtError(f"no valid conversation in {', '.join(files)} to measure perplexity on")
    return out


def held_out(run_config: Path | None, eval_data: str | None, limit: int = 8) -> tuple[list, str]:
    """Conversations to measure on and a description of where they came from.

    --eval-data wins; else the run's eval files; else its training files (said so: not held out).
    """
    if eval_data:
        return load_conversations([eval_data], limit), f"{limit} conversations of {eval_data}"
    if run_config is not None and run_config.is_file():
        import yaml

        data = (yaml.safe_load(run_config.read_text()) or {}).get("data", {})
        if data.get("eval_files"):
            return load_conversations(data["eval_files"], limit), "the run's eval files"
        if data.get("train_files") and all(Path(f).is_file() for f in data["train_files"]):
            return load_conversations(data["train_files"], limit), "training conversations (not held out)"
    raise QwenFtError("no conversations to measure perplexity on; pass --eval-data FILE")


def perplexity(model, tok, conversations: list, max_length: int = 2048) -> float:
    """exp(mean next-token loss over the assistant replies) of `model` on `conversations`."""
    from qwen_ft.data.render import Renderer
    from qwen_ft.data.schema import RowError

    total, count = 0.0, 0
    device = next(model.parameters()).device
    renderer = Renderer.of(tok)
    rendered = [r for r in renderer.render_many(conversations) if not isinstance(r, RowError)]  # bad rows skipped
    with torch.no_grad():
        for ids, labels, _ in rendered:
            batch = {
                "input_ids": torch.tensor([ids[:max_length]], device=device),
                "labels": torch.tensor([labels[:max_length]], device=device),
            }
            loss, n = causal_lm_loss(model, batch)
            total, count = total + loss.item(), count + n
    return math.exp(total / max(count, 1))
