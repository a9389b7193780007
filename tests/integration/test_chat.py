"""Chat: --prompt answers once and exits; generation stops at <|im_end|>."""

from __future__ import annotations

import torch

from qwen_ft.cli.main import main
from qwen_ft.infer.chat import reply


class FakeModel:
    """Stands in for generate(): emits 'Hi!' then <|im_end|>, and records the stop ids it was given."""

    device = torch.device("cpu")

    def __init__(self, tok):
        self.tok, self.kwargs = tok, {}

    def generate(self, input_ids, streamer, **kwargs):
        self.kwargs = {"input_ids": input_ids, **kwargs}
        streamer.put(input_ids)
        for t in self.tok.encode("Hi! 你好") + [self.tok.im_end_id]:
            streamer.put(torch.tensor([t]))
        streamer.end()


def test_reply_streams_and_stops_at_im_end(qwen3_tok):
    model, pieces = FakeModel(qwen3_tok), []
    text = reply(model, qwen3_tok, [("system", "S"), ("user", "hello")], pieces.append)
    assert text == "Hi! 你好" and "".join(pieces) == "Hi! 你好"
    assert "\ufffd" not in "".join(pieces)  # multi-byte characters are never split
    assert model.kwargs["eos_token_id"] == [151645, 151643]
    prompt = model.kwargs["input_ids"][0].tolist()
    assert prompt[-3:] == [151644, 77091, 198]  # ends with <|im_start|>assistant\n


def test_chat_prompt_answers_once_and_exits(tiny_model_dir, capsys):
    assert main(["chat", str(tiny_model_dir), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")  # the random model's words are arbitrary; it answered and returned


def test_interactive_chat_over_stdin(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "qwen_ft.cli.main", "chat", str(tiny_model_dir),
                           "--max-new-tokens", "3"], input="Hello\n/reset\nAgain\n/exit\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2 and proc.stdout.count("user> ") == 4
