"""Rendering with each checkpoint's own chat template equals transformers' apply_chat_template, token for
token, for the real Qwen1.5, Qwen2.5 and Qwen3 templates and every case: default system prompts,
multi-turn, Qwen3 thinking (reasoning_content, inline <think>, history stripped), tool calls, tool
results, template kwargs, the data formats users bring; also through `qwen-ft preprocess --dump`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwen_ft.data.chatml import IGNORE_INDEX
from qwen_ft.data.formats import normalise
from qwen_ft.data.render import Renderer
from qwen_ft.data.schema import RowError
from qwen_ft.tokenizer import load_tokenizer
from qwen_ft.tokenizer.bundled import bundled_files
from tests.conftest import ASSETS, REPO

TEMPLATES = ("qwen15", "qwen25", "qwen3")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
U = {"role": "user", "content": "Capital of Peru?"}
A = {"role": "assistant", "content": "Lima."}
CASES = {
    "no system": {"messages": [U, A]},
    "system, two turns": {"messages": [{"role": "system", "content": "Be brief."}, U, A,
                                       {"role": "user", "content": "And Chile?"},
                                       {"role": "assistant", "content": "Santiago."}]},
    "reasoning_content": {"messages": [U, {**A, "reasoning_content": "Peru's capital is Lima."}]},
    "history thinking stripped": {"messages": [U, {**A, "reasoning_content": "easy"},
                                               {"role": "user", "content": "And Chile?"},
                                               {"role": "assistant", "content": "Santiago.",
                                                "reasoning_content": "also easy"}]},
    "inline think": {"messages": [U, {"role": "assistant", "content": "<think>\nrecall\n</think>\n\nLima."}]},
    "tool calls": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Lima and Cusco?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Lima\"}"}},
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Cusco"}}}]},
        {"role": "tool", "content": "19 C"}, {"role": "tool", "content": "12 C"},
        {"role": "assistant", "content": "Lima 19 °C, Cusco 12 °C."}]},
    "tool call with text": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You help."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"name": "get_weather", "arguments": {}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]},
    "thinking off": {"messages": [U, A], "chat_template_kwargs": {"enable_thinking": False}},
    "text parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital"},
                                                             {"type": "text", "text": "of Peru?"}]}, A]},
    "leading newlines": {"messages": [{"role": "user", "content": "\nhi"},
                                      {"role": "assistant", "content": "\n\nyo"}]},
    "sharegpt function_call": {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Lima?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})},
        {"from": "observation", "value": "19 C"}, {"from": "gpt", "value": "19 °C."}]},
    "qwen v1 json": {"id": "x", "conversations": [{"from": "user", "value": "你好"},
                                                  {"from": "assistant", "value": "你好！"}]},
    "alpaca": {"instruction": "Translate.", "input": "Good morning", "output": "Bonjour", "system": "Translator.",
               "history": [["Hi", "Hello!"]]},
    "prompt/completion": {"prompt": "Capital of Peru?", "completion": "Lima."},
}


@pytest.fixture(scope="session")
def template_dirs(tmp_path_factory) -> dict:
    """A tokenizer directory per real template: Qwen3's tokenizer.json with the added tokens the
    checkpoint's tokenizer_config.json lists, and that config."""
    tokenizer = json.loads(bundled_files("qwen3")[0].read_text())
    out = {}
    for name in TEMPLATES:
        d = tmp_path_factory.mktemp(name)
        config = json.loads((ASSETS / "chat_templates" / f"tokenizer_config.{name}.json").read_text())
        keep = {int(k) for k in config["added_tokens_decoder"]}
        (d / "tokenizer.json").write_text(json.dumps(
            {**tokenizer, "added_tokens": [t for t in tokenizer["added_tokens"] if t["id"] in keep]}))
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = d
    return out


@pytest.fixture(scope="session")
def hf_tokenizers(template_dirs) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(d) for name, d in template_dirs.items()}


def served_ids(hf_tok, conv: dict) -> list[int]:
    """What a server renders: apply_chat_template on the normalised messages, tools and kwargs."""
    out = hf_tok.apply_chat_template(conv["messages"], tools=conv["tools"], tokenize=True, **conv["kwargs"])
    return list(out["input_ids"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_case_renders_as_apply_chat_template(template_dirs, hf_tokenizers, name):
    renderer = Renderer.of(load_tokenizer(template_dirs[name]))
    for case, row in CASES.items():
        conv, _ = normalise(row, None)
        ids, labels, _ = renderer.render(conv)
        assert ids == served_ids(hf_tokenizers[name], conv), f"{name}: {case}"
        assert len(labels) == len(ids) and any(x != IGNORE_INDEX for x in labels), f"{name}: {case}"


def learned_text(hf_tok, ids: list[int], labels: list[int]) -> list[str]:
    """The learned spans, decoded."""
    spans, current = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans, current = spans + [hf_tok.decode(current)], []
    return spans + ([hf_tok.decode(current)] if current else [])


def test_labels_follow_the_rendered_assistant_turns(template_dirs, hf_tokenizers):
    tok = hf_tokenizers["qwen3"]
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen3"]))
    conv, _ = normalise(CASES["history thinking stripped"], None)
    ids, labels, _ = renderer.render(conv)
    # the first reply's thinking is stripped by the template; the last keeps it, and both end at <|im_end|>
    assert learned_text(tok, ids, labels) == ["Lima.<|im_end|>",
                                              "<think>\nalso easy\n</think>\n\nSantiago.<|im_end|>"]
    ids, labels, _ = renderer.render(conv, "last_turn")
    assert learned_text(tok, ids, labels) == ["<think>\nalso easy\n</think>\n\nSantiago.<|im_end|>"]
    conv, _ = normalise(CASES["tool calls"], None)
    ids, labels, _ = renderer.render(conv)
    call = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Cusco"}}\n</tool_call><|im_end|>')
    assert learned_text(tok, ids, labels) == [call, "<think>\n\n</think>\n\nLima 19 °C, Cusco 12 °C.<|im_end|>"]


def test_weight_zero_and_loss_false_leave_a_turn_unlearned(template_dirs, hf_tokenizers):
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen25"]))
    row = {"messages": [U, {**A, "weight": 0}, {"role": "user", "content": "Chile?"},
                        {"role": "assistant", "content": "Santiago.", "loss": True}]}
    conv, _ = normalise(row, None)
    ids, labels, _ = renderer.render(conv)
    assert learned_text(hf_tokenizers["qwen25"], ids, labels) == ["Santiago.<|im_end|>"]
    assert ids == served_ids(hf_tokenizers["qwen25"], conv)  # the switch changes labels, never the ids
    with pytest.raises(RowError, match=r"messages\[0\].weight: only assistant messages are learned"):
        normalise({"messages": [{**U, "weight": 0}, A]}, None)


def test_template_kwargs_per_run_and_per_row(template_dirs, hf_tokenizers):
    tok = load_tokenizer(template_dirs["qwen3"])
    conv, _ = normalise({"messages": [U, A]}, None)
    off = Renderer.of(tok, kwargs={"enable_thinking": False}).prompt(conv)
    assert off == list(hf_tokenizers["qwen3"].apply_chat_template(conv["messages"], add_generation_prompt=True,
                                                                   enable_thinking=False, tokenize=True)["input_ids"])
    assert off != Renderer.of(tok).prompt(conv)
    row_on, _ = normalise({**CASES["thinking off"], "chat_template_kwargs": {"enable_thinking": True}}, None)
    assert Renderer.of(tok, kwargs={"enable_thinking": False}).prompt(row_on) == Renderer.of(tok).prompt(row_on)


def test_control_text_in_content_stays_text(template_dirs, hf_tokenizers):
    """The one known difference: apply_chat_template would encode a control token where a message's text
    says "<|im_end|>"; qwen-ft encodes that content as ordinary text, so no one can forge a turn end."""
    tok = load_tokenizer(template_dirs["qwen25"])
    hf = hf_tokenizers["qwen25"]
    conv, _ = normalise({"messages": [{"role": "user", "content": "say <|im_end|> now"}, A]}, None)
    ids, _, blocks = Renderer.of(tok).render(conv)
    assert [b.role for b in blocks] == ["system", "user", "assistant"]
    user = blocks[1]
    assert ids[user.body:user.end] == tok.encode("say <|im_end|> now")
    assert ids.count(hf.convert_tokens_to_ids("<|im_end|>")) == 3  # the three turn ends only
    served = served_ids(hf, conv)
    assert served != ids and served.count(hf.convert_tokens_to_ids("<|im_end|>")) == 4


def test_rows_the_format_cannot_hold_are_refused_with_the_field():
    cases = [
        ({"messages": [U, A], "conversations": []}, "has 'messages' and 'conversations'; keep one"),
        ({"messages": [{**U, "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, A]},
         r"messages\[0\].content\[0\]: a image_url part"),
        ({"messages": [U, {**A, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
         r"tool_calls\[0\].arguments: not valid JSON"),
        ({"messages": [U, {**A, "mood": "happy"}]}, r"messages\[1\]: unknown field\(s\) mood"),
        ({"prompt": "hi"}, "'prompt' without 'completion'"),
    ]
    for row, message in cases:
        with pytest.raises(RowError, match=message):
            normalise(row, None)
    _, ignored = normalise({"messages": [U, A], "category": "geo", "id": 3}, None)
    assert ignored == ["category"]


def test_preprocess_dump_equals_apply_chat_template(template_dirs, hf_tokenizers, tmp_path):
    data = tmp_path / "cases.jsonl"
    data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in CASES.values()))
    for name in ("qwen25", "qwen3"):
        dump = tmp_path / f"{name}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "qwen_ft.cli.main", "preprocess", "--tokenizer",
                               str(template_dirs[name]), "--data", str(data), "--dump", str(dump),
                               f"data.cache_dir={tmp_path / 'cache'}"], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in dump.read_text().splitlines()]
        assert len(rows) == len(CASES)
        for (case, row), got in zip(CASES.items(), rows, strict=True):
            conv, _ = normalise(row, None)
            assert got["input_ids"] == served_ids(hf_tokenizers[name], conv), f"{name}: {case}"


def test_tiny_model_ships_the_real_qwen3_template(tiny_model_dir):
    from qwen_ft.data.template import find_template

    real = json.loads((ASSETS / "chat_templates" / "tokenizer_config.qwen3.json").read_text())["chat_template"]
    assert find_template(tiny_model_dir).text == real
    assert "Qwen v1 ChatML" in Renderer.of(load_tokenizer(bundled_files("qwen")[0].parent)).source


def test_truncation_renders_the_cut_conversation_again(template_dirs, hf_tokenizers):
    from qwen_ft.data.render import fit

    conv, _ = normalise(CASES["history thinking stripped"], None)
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen3"]))
    first = served_ids(hf_tokenizers["qwen3"], {**conv, "messages": conv["messages"][:2]})
    assert len(first) < len(renderer.render(conv)[0])
    for policy in ("assistant", "last_turn"):
        ids, labels, status = fit(renderer, conv, renderer.render(conv, policy), policy, len(first), "truncate")
        # the kept first reply is now the conversation's last: rendered (and learned) with its thinking
        assert status == "truncated" and ids == first
        assert learned_text(hf_tokenizers["qwen3"], ids, labels) == ["<think>\neasy\n</think>\n\nLima.<|im_end|>"]
    assert fit(renderer, conv, renderer.render(conv), "assistant", len(first), "drop")[2] == "dropped"
    assert fit(renderer, conv, renderer.render(conv), "assistant", len(first) - 1, "truncate")[2] == "dropped"


def test_v1_chatml_honours_weight_zero_under_every_policy(v1_tok):
    conv, _ = normalise({"messages": [U, {**A, "content": "SECRET", "weight": 0}, U, A]}, None)
    renderer = Renderer.of(v1_tok)
    for policy in ("assistant", "last_turn", "qwen_reference"):
        ids, labels, _ = renderer.render(conv, policy)
        learned = v1_tok.decode([t for t, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX])
        assert "SECRET" not in learned and "Lima." in learned, policy


def test_prompt_replies_are_context_and_fields_are_never_lost(template_dirs, hf_tokenizers):
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen25"]))
    few_shot = {"prompt": [U, {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "Chile?"}],
                "completion": [{"role": "assistant", "content": "Santiago."}]}
    ids, labels, _ = renderer.render(normalise(few_shot, None)[0])
    assert learned_text(hf_tokenizers["qwen25"], ids, labels) == ["Santiago.<|im_end|>"]
    for row, message in (({"messages": [U, A], "system": "Be a pirate."}, "system: not part of the OpenAI"),
                         ({"messages": [U, {**A, "tool_calls": [{"function": {"name": "f", "argument": {}}}]}]},
                          r"unknown field\(s\) argument")):
        with pytest.raises(RowError, match=message):
            normalise(row, None)
    calls = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    parallel = {"conversations": [{"from": "human", "value": "both"}, {"from": "function_call", "value": calls},
                                  {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "done"}]}
    conv, _ = normalise(parallel, None)
    assert [c["function"]["name"] for c in conv["messages"][1]["tool_calls"]] == ["a", "b"]


def test_custom_template_variables_and_unclosed_turns(template_dirs, hf_tokenizers, tmp_path):
    eos = tmp_path / "eos.jinja"
    eos.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}")
    tok = load_tokenizer(template_dirs["qwen25"])
    conv, _ = normalise({"messages": [U, A]}, None)
    ids, _, _ = Renderer.of(tok, str(eos)).render(conv)
    assert ids == list(hf_tokenizers["qwen25"].apply_chat_template(conv["messages"], chat_template=eos.read_text(),
                                                                   tokenize=True)["input_ids"])
    open_turn = tmp_path / "open.jinja"
    open_turn.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}\n{% endfor %}")
    with pytest.raises(RowError, match="without <|im_end|>|opens a turn inside another"):
        Renderer.of(tok, str(open_turn)).render(conv)


def test_named_templates_render_tools_through_tool_use(template_dirs, hf_tokenizers, tmp_path):
    """A tokenizer_config.json listing named templates: rows with tools render through "tool_use",
    others through "default", as apply_chat_template picks them."""
    config = json.loads((template_dirs["qwen25"] / "tokenizer_config.json").read_text())
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    tools = "<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n" + plain
    config["chat_template"] = [{"name": "default", "template": plain}, {"name": "tool_use", "template": tools}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((template_dirs["qwen25"] / "tokenizer.json").read_bytes())
    from transformers import AutoTokenizer

    check_tool_use_choice(tmp_path)
    # transformers 5's saved layout: chat_template.jinja + additional_chat_templates/tool_use.jinja
    saved = tmp_path / "saved"
    AutoTokenizer.from_pretrained(tmp_path).save_pretrained(saved)
    assert (saved / "additional_chat_templates" / "tool_use.jinja").is_file()
    check_tool_use_choice(saved)
    copy = load_tokenizer(saved).save_files(tmp_path / "copy")  # what checkpoints and merges carry
    assert (copy / "additional_chat_templates" / "tool_use.jinja").read_text() == tools


def check_tool_use_choice(tokenizer_dir):
    """Renderer.of and the training pipeline's TokenizeSpec both pick the template apply_chat_template picks."""
    from transformers import AutoTokenizer

    from qwen_ft.config.schema import DataConfig
    from qwen_ft.data.tokenize import TokenizeSpec

    hf_tok, tok = AutoTokenizer.from_pretrained(tokenizer_dir), load_tokenizer(tokenizer_dir)
    renderers = (Renderer.of(tok), TokenizeSpec.from_config(DataConfig(), tok).renderer(tok))
    for row in ({"messages": [U, A]}, {"tools": [WEATHER], "messages": [U, A]}):
        conv, _ = normalise(row, None)
        for renderer in renderers:
            ids, labels, _ = renderer.render(conv)
            assert ids == served_ids(hf_tok, conv)
            assert ("Tools: get_weather" in hf_tok.decode(ids)) == ("tools" in row)
            assert learned_text(hf_tok, ids, labels) == ["Lima.<|im_end|>"]
