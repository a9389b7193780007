"""Multi-turn ChatML generation with streaming, stopping at <|im_end|>."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from qwen_ft.data.chatml import Framing, assemble
from qwen_ft.errors import QwenFtError


class _Stream:
    """transformers streamer: skips the prompt, emits decoded text as it becomes valid UTF-8."""

    def __init__(self, tok, emit: Callable[[str], None]):
        self.tok, self.emit, self.shown, self.prompt_seen = tok, emit, 0, False
        self.ids: list[int] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids += [t for t in value.flatten().tolist() if t not in (self.tok.im_end_id, self.tok.endoftext_id)]
        text = self.tok.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.emit(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids)
        self.emit(text[self.shown:])
        self.shown = len(text)


def load_chat_model(model_dir: str, adapter: str | None = None):
    """(model, tokenizer) from a full model directory, optionally with a LoRA adapter on top.

    A qwen-ft LoRA output given as MODEL_DIR is loaded on the base recorded in its manifest.
    """
    from transformers import AutoModelForCausalLM

    from qwen_ft.tokenizer import load_tokenizer

    path = Path(model_dir)
    if (path / "adapter_config.json").is_file() and adapter is None:
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        base = manifest.get("base_model", {}).get("path")
        if not base:
            raise QwenFtError(f"{path} is an adapter without a recorded base; pass the base as MODEL_DIR and "
                              f"--adapter {path}")
        path, adapter = Path(base), str(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype="auto", local_files_only=True)
    # transformers wraps .to with functools.wraps, whose typeshed type leaves `self` unbound
    model = loaded.to(device).eval()  # type: ignore[arg-type]
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, load_tokenizer(adapter or path)


def reply(model, tok, messages: list[tuple[str, str]], emit: Callable[[str], None], max_new_tokens: int = 256,
          temperature: float = 0.0) -> str:
    """Generate the assistant's next reply to `messages` (system first), streaming it through `emit`."""
    framing = Framing.of(tok)
    ids, _ = assemble([r for r, _ in messages], [tok.encode(c) for _, c in messages], framing)
    prompt = torch.tensor([ids + framing.head("assistant")], device=model.device)
    stream = _Stream(tok, emit)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                       eos_token_id=[tok.im_end_id, tok.endoftext_id], pad_token_id=tok.endoftext_id,
                       use_cache=True, streamer=stream, **sampling)
    return tok.decode(stream.ids)
