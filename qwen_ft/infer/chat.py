"""Multi-turn generation with streaming, stopping at <|im_end|>: prompts are rendered by the model's
own chat template (`data/render.py`), as training rendered them and as servers render them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from qwen_ft.data.render import Renderer
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
            self.emit(text[self.shown :])
            self.shown = len(text)

    def end(self) -> None:
        text = self.tok.decode(self.ids)
        self.emit(text[self.shown :])
        self.shown = len(text)


def check_model_dir(path: Path, allow_pickle_weights: bool = False) -> None:
    """A directory chat can load: a model (config.json) or an adapter (adapter_config.json); never a hub id.

    Raises:
        QwenFtError: missing, empty or unrecognised, with the fix.
    """
    if not path.is_dir():
        raise QwenFtError(
            f"{path}: no such directory; give a local model or qwen-ft output directory (nothing is downloaded)"
        )
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        what = "is empty" if not any(path.iterdir()) else "holds no config.json or adapter_config.json"
        raise QwenFtError(f"{path} {what}; give a merged model, a full fine-tune or a LoRA output directory")
    if not allow_pickle_weights:
        from qwen_ft.model.checks import pickle_weights_problem

        problem = pickle_weights_problem(path, "chat", "pass --allow-pickle-weights")
        if problem:
            raise QwenFtError(problem)


def load_chat_model(model_dir: str, adapter: str | None = None, allow_pickle_weights: bool = False):
    """(model, tokenizer) from a full model directory, optionally with a LoRA adapter on top.

    A qwen-ft LoRA output given as MODEL_DIR is loaded on the base recorded in its manifest.
    """
    from qwen_ft.model.families import model_class
    from qwen_ft.model.fingerprint import recorded_base
    from qwen_ft.tokenizer import load_tokenizer

    path = Path(model_dir)
    for d in [path] + ([Path(adapter)] if adapter else []):
        check_model_dir(d, allow_pickle_weights)
    if (path / "adapter_config.json").is_file() and adapter is None:
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").is_file() else {}
        base = recorded_base(path, manifest, f"pass the base as MODEL_DIR and --adapter {path}")
        check_model_dir(base, allow_pickle_weights)
        path, adapter = base, str(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = model_class(path).from_pretrained(path, dtype="auto", local_files_only=True)
    model = loaded.to(device).eval()
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, load_tokenizer(adapter or path)


def prompt_ids(tok, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """The ids that ask for the next assistant turn after `messages` ({"role", "content"} dicts)."""
    conv: dict[str, Any] = {
        "messages": messages,
        "tools": None,
        "kwargs": {},
        "learn": [True] * sum(m["role"] == "assistant" for m in messages),
    }
    return Renderer.of(tok, kwargs=template_kwargs).prompt(conv)


def reply(
    model,
    tok,
    messages: list[dict],
    emit: Callable[[str], None],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    template_kwargs: dict | None = None,
) -> str:
    """Generate the assistant's next reply to `messages`, streaming it through `emit`.

    `template_kwargs` go to the chat template (e.g. {"enable_thinking": False} for Qwen3).
    """
    prompt = torch.tensor([prompt_ids(tok, messages, template_kwargs)], device=model.device)
    stream = _Stream(tok, emit)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            eos_token_id=[tok.im_end_id, tok.endoftext_id],
            pad_token_id=tok.endoftext_id,
            use_cache=True,
            streamer=stream,
            **sampling,
        )
    return tok.decode(stream.ids)
