"""Chat: --prompt answers once and exits; generation stops at <|im_end|>."""

from __future__ import annotations

import shutil

import pytest
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
    text = reply(
        model, qwen3_tok, [{"role": "system", "content": "S"}, {"role": "user", "content": "hello"}], pieces.append
    )
    assert text == "Hi! 你好" and "".join(pieces) == "Hi! 你好"
    assert "\ufffd" not in "".join(pieces)  # multi-byte characters are never split
    assert model.kwargs["eos_token_id"] == [151645, 151643]
    prompt = model.kwargs["input_ids"][0].tolist()
    assert prompt[-3:] == [151644, 77091, 198]  # ends with <|im_start|>assistant\n (Qwen3's thinking prompt)
    reply(
        model,
        qwen3_tok,
        [{"role": "user", "content": "hello"}],
        pieces.append,
        template_kwargs={"enable_thinking": False},
    )
    no_think = model.kwargs["input_ids"][0].tolist()
    assert qwen3_tok.decode(no_think[-7:]) == "<|im_start|>assistant\n<think>\n\n</think>\n\n"


@pytest.fixture
def talkative_model_dir(tiny_model_dir, tmp_path):
    """The tiny model with a random final norm: with tied embeddings and random weights it otherwise
    repeats the prompt's last token ("\\n") forever, which would hide a dropped or extra token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        norm = model.model.norm.weight
        norm.copy_(torch.randn(norm.shape, generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "talkative"
    model.save_pretrained(out)
    for f in tiny_model_dir.iterdir():  # tokenizer files
        if not (out / f.name).exists():
            shutil.copyfile(f, out / f.name)
    return out


def greedy_answer(model_dir, system: str, prompt: str, max_new_tokens: int) -> str:
    """The expected answer, computed with transformers alone: the checkpoint's own chat template and
    greedy generate(), stopping at <|im_end|> or <|endoftext|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()
    inputs = tok.apply_chat_template(
        [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    stop = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    out = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=stop[1]
    )
    return tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_chat_prompt_answers_once_and_exits(talkative_model_dir, capsys):
    expected = greedy_answer(talkative_model_dir, "Be brief.", "Hello", 5)
    assert len(expected.strip()) > 3  # the fixture's point: an answer of several different tokens
    assert (
        main(["chat", str(talkative_model_dir), "--system", "Be brief.", "--prompt", "Hello", "--max-new-tokens", "5"])
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"  # exactly the greedy answer, printed once


def test_interactive_chat_over_stdin(tiny_model_dir):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "qwen_ft.cli.main", "chat", str(tiny_model_dir), "--max-new-tokens", "3"],
        input="/help\nHello\n/reset\nAgain\n/nope\n/exit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("assistant> ") == 2 and proc.stdout.count("user> ") == 6
    assert "(new conversation)" in proc.stderr and "unknown command /nope" in proc.stderr
    assert proc.stderr.count("/reset start a new conversation") == 3  # banner, /help, unknown command
    ended = subprocess.run(
        [sys.executable, "-m", "qwen_ft.cli.main", "chat", str(tiny_model_dir), "--max-new-tokens", "2"],
        input="Hello\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ended.returncode == 0 and "Traceback" not in ended.stderr  # Ctrl-D (end of input) ends cleanly


def test_ctrl_c_stops_the_answer_not_the_chat(capsys):
    from qwen_ft.cli.chat import chat_loop

    seen, lines = [], iter(["first", "^C", "second", "/exit"])  # ^C: Ctrl-C at the prompt

    def answer(messages):
        seen.append([m["content"] for m in messages])
        if len(seen) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer is being written
        return "ok"

    def read(_prompt):
        line = next(lines)
        if line == "^C":
            raise KeyboardInterrupt
        return line

    assert chat_loop([{"role": "system", "content": "S"}], answer, read) == 0
    assert seen == [["S", "first"], ["S", "second"]]  # the stopped turn is not kept in the history
    err = capsys.readouterr().err
    assert "(answer stopped)" in err and "/exit or Ctrl-D ends the chat" in err
