"""Rendering with each checkpoint's own chat template equals transformers' apply_chat_template, token for
token, for the real Qwen1.5, Qwen2.5, Qwen3, Qwen3.5 and Qwen3.6 templates and every case: default system
prompts, multi-turn, thinking (reasoning_content, inline <think>, history stripped, Qwen3.6's
preserve_thinking), tool calls (Qwen3.5/3.6's XML with typed arguments), tool results, list-of-parts
content, template kwargs per run, per config and per row, the data formats users bring; also through
`qwen-ft preprocess --dump`. Only assistant replies are learned, exactly as the template rendered them."""

from __future__ import annotations

import json
import re
import shutil
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
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
U = {"role": "user", "content": "Capital of Peru?"}
A = {"role": "assistant", "content": "Lima."}
CASES = {
    "no system": {"messages": [U, A]},
    "system, two turns": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            U,
            A,
            {"role": "user", "content": "And Chile?"},
            {"role": "assistant", "content": "Santiago."},
        ]
    },
    "reasoning_content": {"messages": [U, {**A, "reasoning_content": "Peru's capital is Lima."}]},
    "history thinking stripped": {
        "messages": [
            U,
            {**A, "reasoning_content": "easy"},
            {"role": "user", "content": "And Chile?"},
            {"role": "assistant", "content": "Santiago.", "reasoning_content": "also easy"},
        ]
    },
    "inline think": {"messages": [U, {"role": "assistant", "content": "<think>\nrecall\n</think>\n\nLima."}]},
    "tool calls": {
        "tools": [WEATHER],
        "messages": [
            {"role": "user", "content": "Weather in Lima and Cusco?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Cusco"}}},
                ],
            },
            {"role": "tool", "content": "19 C"},
            {"role": "tool", "content": "12 C"},
            {"role": "assistant", "content": "Lima 19 °C, Cusco 12 °C."},
        ],
    },
    "tool call with text": {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "You help."},
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{"name": "get_weather", "arguments": {}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ],
    },
    "thinking off": {"messages": [U, A], "chat_template_kwargs": {"enable_thinking": False}},
    "text parts": {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Capital"}, {"type": "text", "text": "of Peru?"}]},
            A,
        ]
    },
    "leading newlines": {
        "messages": [{"role": "user", "content": "\nhi"}, {"role": "assistant", "content": "\n\nyo"}]
    },
    "sharegpt function_call": {
        "tools": json.dumps([WEATHER]),
        "conversations": [
            {"from": "human", "value": "Weather in Lima?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Lima"}})},
            {"from": "observation", "value": "19 C"},
            {"from": "gpt", "value": "19 °C."},
        ],
    },
    "qwen v1 json": {
        "id": "x",
        "conversations": [{"from": "user", "value": "你好"}, {"from": "assistant", "value": "你好！"}],
    },
    "alpaca": {
        "instruction": "Translate.",
        "input": "Good morning",
        "output": "Bonjour",
        "system": "Translator.",
        "history": [["Hi", "Hello!"]],
    },
    "prompt/completion": {"prompt": "Capital of Peru?", "completion": "Lima."},
}


# Qwen3.5/3.6: their templates loop over content parts, write tool calls as XML, and keep a thinking block
# in every reply after the last user query (`qwen3_5_dirs` in tests/integration/conftest.py).
PARTS_TEMPLATES = ("qwen35", "qwen36")
FORECAST = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "where": {"type": "object"},
                "fields": {"type": "array"},
            },
            "required": ["city"],
        },
    },
}
TYPED_ARGS = {
    "city": "Lima",
    "days": 3,
    "metric": True,
    "where": {"lat": -12.05, "lon": -77.04},
    "fields": ["rain", "wind"],
}
TWO_TURNS = [
    U,
    {**A, "reasoning_content": "easy"},
    {"role": "user", "content": "And Chile?"},
    {"role": "assistant", "content": "<think>\nalso easy\n</think>\n\nSantiago."},
]
CASES_3_5 = {
    **CASES,
    "multi-turn reasoning": {"messages": [{"role": "system", "content": "Be brief."}, *TWO_TURNS]},
    "preserve thinking": {"messages": TWO_TURNS, "chat_template_kwargs": {"preserve_thinking": True}},
    "typed tool arguments": {
        "tools": [WEATHER, FORECAST],
        "messages": [
            {"role": "user", "content": "Forecast for Lima?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "Call forecast.",
                "tool_calls": [{"type": "function", "function": {"name": "forecast", "arguments": TYPED_ARGS}}],
            },
            {"role": "tool", "content": '{"max_c": 24}'},
            {"role": "assistant", "content": "Up to 24 °C.", "reasoning_content": "Report it."},
        ],
    },
    "several tool responses, then another step": {
        "tools": [WEATHER],
        "messages": [
            {"role": "system", "content": "You help."},
            {"role": "user", "content": "Weather in Lima and Cusco?"},
            {
                "role": "assistant",
                "content": "Checking both.",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}},
                    {"function": {"name": "get_weather", "arguments": '{"city": "Cusco"}'}},
                ],
            },
            {"role": "tool", "content": "19 C"},
            {"role": "tool", "content": [{"type": "text", "text": "12 C"}]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"name": "get_weather", "arguments": {"city": "Puno"}}],
            },
            {"role": "tool", "content": "8 C"},
            {"role": "assistant", "content": "Lima 19, Cusco 12, Puno 8 °C."},
        ],
    },
    "text parts everywhere": {
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be brief. "}, {"type": "text", "text": "Be kind."}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Capital"},
                    {"type": "text", "text": " of "},
                    {"type": "text", "text": "Peru?"},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "Lima"}, {"type": "text", "text": "."}]},
        ]
    },
    "thinking off, text parts": {
        "chat_template_kwargs": {"enable_thinking": False},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of Peru?"}]}, A],
    },
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
        (d / "tokenizer.json").write_text(
            json.dumps({**tokenizer, "added_tokens": [t for t in tokenizer["added_tokens"] if t["id"] in keep]})
        )
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        out[name] = d
    return out


@pytest.fixture(scope="session")
def hf_tokenizers(template_dirs) -> dict:
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(d) for name, d in template_dirs.items()}


def served(hf_tok, conv: dict, parts: bool = False, tokenize: bool = True, **run_kwargs):
    """What a server renders: apply_chat_template on the normalised messages, tools and kwargs (a row's own
    over the run's). List content goes as is to a template that loops over parts (`parts`: Qwen3.5/3.6);
    any other template gets the text parts joined with newlines (vLLM's "openai" and "string" formats)."""
    messages = (
        conv["messages"]
        if parts
        else [
            {**m, "content": "\n".join(p["text"] for p in m["content"])} if isinstance(m["content"], list) else m
            for m in conv["messages"]
        ]
    )
    out = hf_tok.apply_chat_template(
        messages, tools=conv["tools"], tokenize=tokenize, **{**run_kwargs, **conv["kwargs"]}
    )
    return list(out["input_ids"]) if tokenize else out


def served_ids(hf_tok, conv: dict, parts: bool = False, **run_kwargs) -> list[int]:
    return served(hf_tok, conv, parts, **run_kwargs)


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
    assert learned_text(tok, ids, labels) == ["Lima.<|im_end|>", "<think>\nalso easy\n</think>\n\nSantiago.<|im_end|>"]
    ids, labels, _ = renderer.render(conv, "last_turn")
    assert learned_text(tok, ids, labels) == ["<think>\nalso easy\n</think>\n\nSantiago.<|im_end|>"]
    conv, _ = normalise(CASES["tool calls"], None)
    ids, labels, _ = renderer.render(conv)
    call = (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Cusco"}}\n</tool_call><|im_end|>'
    )
    assert learned_text(tok, ids, labels) == [call, "<think>\n\n</think>\n\nLima 19 °C, Cusco 12 °C.<|im_end|>"]


def test_weight_zero_and_loss_false_leave_a_turn_unlearned(template_dirs, hf_tokenizers):
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen25"]))
    row = {
        "messages": [
            U,
            {**A, "weight": 0},
            {"role": "user", "content": "Chile?"},
            {"role": "assistant", "content": "Santiago.", "loss": True},
        ]
    }
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
    assert off == list(
        hf_tokenizers["qwen3"].apply_chat_template(
            conv["messages"], add_generation_prompt=True, enable_thinking=False, tokenize=True
        )["input_ids"]
    )
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
    assert ids[user.body : user.end] == tok.encode("say <|im_end|> now")
    assert ids.count(hf.convert_tokens_to_ids("<|im_end|>")) == 3  # the three turn ends only
    served = served_ids(hf, conv)
    assert served != ids and served.count(hf.convert_tokens_to_ids("<|im_end|>")) == 4


def test_rows_the_format_cannot_hold_are_refused_with_the_field():
    cases = [
        ({"messages": [U, A], "conversations": []}, "has 'messages' and 'conversations'; keep one"),
        (
            {"messages": [{**U, "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, A]},
            r"messages\[0\].content\[0\]: an image_url part \(x.png\); qwen-ft trains the language model",
        ),
        (
            {"messages": [U, {**A, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
            r"tool_calls\[0\].arguments: not valid JSON",
        ),
        ({"messages": [U, {**A, "mood": "happy"}]}, r"messages\[1\]: unknown field\(s\) mood"),
        ({"prompt": "hi"}, "'prompt' without 'completion'"),
    ]
    for row, message in cases:
        with pytest.raises(RowError, match=message):
            normalise(row, None)
    _, ignored = normalise({"messages": [U, A], "category": "geo", "id": 3}, None)
    assert ignored == ["category"]


def test_preprocess_dump_equals_apply_chat_template(template_dirs, hf_tokenizers, qwen3_5_dirs, qwen3_5_hf, tmp_path):
    """The training pipeline (rows read, normalised and rendered in datasets.map workers) gives the same ids."""
    runs = (
        ("qwen25", CASES, template_dirs, hf_tokenizers),
        ("qwen3", CASES, template_dirs, hf_tokenizers),
        ("qwen35", CASES_3_5, qwen3_5_dirs, qwen3_5_hf),
    )
    for name, cases, dirs, hf in runs:
        data, dump = tmp_path / f"{name}-cases.jsonl", tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in cases.values()))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "qwen_ft.cli.main",
                "preprocess",
                "--tokenizer",
                str(dirs[name]),
                "--data",
                str(data),
                "--dump",
                str(dump),
                f"data.cache_dir={tmp_path / 'cache'}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = [json.loads(line) for line in dump.read_text().splitlines()]
        assert len(rows) == len(cases)
        for (case, row), got in zip(cases.items(), rows, strict=True):
            conv, _ = normalise(row, None)
            assert got["input_ids"] == served_ids(hf[name], conv, name in PARTS_TEMPLATES), f"{name}: {case}"


def test_tiny_model_ships_the_real_qwen3_template(tiny_model_dir):
    from qwen_ft.data.template import find_template

    real = json.loads((ASSETS / "chat_templates" / "tokenizer_config.qwen3.json").read_text())["chat_template"]
    assert find_template(tiny_model_dir).text == real
    assert "Qwen v1 ChatML" in Renderer.of(load_tokenizer(bundled_files("qwen")[0].parent)).source


def test_truncation_renders_the_cut_conversation_again(template_dirs, hf_tokenizers):
    from qwen_ft.data.render import fit_to_length

    conv, _ = normalise(CASES["history thinking stripped"], None)
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen3"]))
    first = served_ids(hf_tokenizers["qwen3"], {**conv, "messages": conv["messages"][:2]})
    assert len(first) < len(renderer.render(conv)[0])
    for policy in ("assistant", "last_turn"):
        ids, labels, status = fit_to_length(
            renderer, conv, renderer.render(conv, policy), policy, len(first), "truncate"
        )
        # the kept first reply is now the conversation's last: rendered (and learned) with its thinking
        assert status == "truncated" and ids == first
        assert learned_text(hf_tokenizers["qwen3"], ids, labels) == ["<think>\neasy\n</think>\n\nLima.<|im_end|>"]
    assert fit_to_length(renderer, conv, renderer.render(conv), "assistant", len(first), "drop")[2] == "dropped"
    assert (
        fit_to_length(renderer, conv, renderer.render(conv), "assistant", len(first) - 1, "truncate")[2] == "dropped"
    )


def test_v1_chatml_honours_weight_zero_under_every_policy(v1_tok):
    conv, _ = normalise({"messages": [U, {**A, "content": "SECRET", "weight": 0}, U, A]}, None)
    renderer = Renderer.of(v1_tok)
    for policy in ("assistant", "last_turn", "qwen_reference"):
        ids, labels, _ = renderer.render(conv, policy)
        learned = v1_tok.decode([t for t, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX])
        assert "SECRET" not in learned and "Lima." in learned, policy


def test_prompt_replies_are_context_and_fields_are_never_lost(template_dirs, hf_tokenizers):
    renderer = Renderer.of(load_tokenizer(template_dirs["qwen25"]))
    few_shot = {
        "prompt": [U, {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "Chile?"}],
        "completion": [{"role": "assistant", "content": "Santiago."}],
    }
    ids, labels, _ = renderer.render(normalise(few_shot, None)[0])
    assert learned_text(hf_tokenizers["qwen25"], ids, labels) == ["Santiago.<|im_end|>"]
    for row, message in (
        ({"messages": [U, A], "system": "Be a pirate."}, "system: not part of the OpenAI"),
        (
            {"messages": [U, {**A, "tool_calls": [{"function": {"name": "f", "argument": {}}}]}]},
            r"unknown field\(s\) argument",
        ),
    ):
        with pytest.raises(RowError, match=message):
            normalise(row, None)
    calls = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    parallel = {
        "conversations": [
            {"from": "human", "value": "both"},
            {"from": "function_call", "value": calls},
            {"from": "observation", "value": "ok"},
            {"from": "gpt", "value": "done"},
        ]
    }
    conv, _ = normalise(parallel, None)
    assert [c["function"]["name"] for c in conv["messages"][1]["tool_calls"]] == ["a", "b"]


def test_custom_template_variables_and_unclosed_turns(template_dirs, hf_tokenizers, tmp_path):
    eos = tmp_path / "eos.jinja"
    eos.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}")
    tok = load_tokenizer(template_dirs["qwen25"])
    conv, _ = normalise({"messages": [U, A]}, None)
    ids, _, _ = Renderer.of(tok, str(eos)).render(conv)
    assert ids == list(
        hf_tokenizers["qwen25"].apply_chat_template(conv["messages"], chat_template=eos.read_text(), tokenize=True)[
            "input_ids"
        ]
    )
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


# Qwen3.5 and Qwen3.6


@pytest.fixture(scope="module")
def qwen3_5_toks(qwen3_5_dirs) -> dict:
    return {name: load_tokenizer(d) for name, d in qwen3_5_dirs.items()}


def replies(text: str) -> list[str]:
    """Each assistant block of a rendered conversation, from after its "assistant\\n" header through <|im_end|>."""
    return re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, flags=re.S)


@pytest.mark.parametrize("name", PARTS_TEMPLATES)
def test_qwen3_5_cases_render_as_apply_chat_template(qwen3_5_toks, qwen3_5_hf, name):
    """Every case: ids equal apply_chat_template's, and exactly the assistant blocks are learned (their
    <think> block and tool calls included; system, user and tool turns and every header masked)."""
    renderer, hf = Renderer.of(qwen3_5_toks[name]), qwen3_5_hf[name]
    for case, row in CASES_3_5.items():
        conv, _ = normalise(row, None)
        ids, labels, _ = renderer.render(conv)
        assert ids == served_ids(hf, conv, parts=True), f"{name}: {case}"
        text = served(hf, conv, parts=True, tokenize=False)
        assert learned_text(hf, ids, labels) == replies(text), f"{name}: {case}"


def xml_call(metric: str) -> str:
    values = {**TYPED_ARGS, "metric": metric, "where": '{"lat": -12.05, "lon": -77.04}', "fields": '["rain", "wind"]'}
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in values.items())
    return f"<tool_call>\n<function=forecast>\n{params}</function>\n</tool_call>"


def test_qwen3_5_labels_are_the_rendered_replies(qwen3_5_toks, qwen3_5_hf):
    """Thinking of replies before the last user query is stripped (kept with Qwen3.6's preserve_thinking);
    later replies always carry a thinking block. Tool arguments: Qwen3.5 writes a non-string value with
    Jinja's `string` (a boolean as True), Qwen3.6 as JSON (true)."""

    def learned(name: str, case: str) -> list[str]:
        ids, labels, _ = Renderer.of(qwen3_5_toks[name]).render(normalise(CASES_3_5[case], None)[0])
        return learned_text(qwen3_5_hf[name], ids, labels)

    stripped = ["Lima.<|im_end|>", "<think>\nalso easy\n</think>\n\nSantiago.<|im_end|>"]
    for name in PARTS_TEMPLATES:
        assert learned(name, "multi-turn reasoning") == stripped
    assert learned("qwen35", "preserve thinking") == stripped  # Qwen3.5 has no such switch
    assert learned("qwen36", "preserve thinking") == ["<think>\neasy\n</think>\n\nLima.<|im_end|>", stripped[1]]
    final = "<think>\nReport it.\n</think>\n\nUp to 24 °C.<|im_end|>"
    for name, metric in (("qwen35", "True"), ("qwen36", "true")):
        call = f"<think>\nCall forecast.\n</think>\n\n{xml_call(metric)}<|im_end|>"
        assert learned(name, "typed tool arguments") == [call, final]
        assert learned(name, "text parts everywhere") == ["<think>\n\n</think>\n\nLima.<|im_end|>"]


def test_text_parts_reach_templates_that_loop_over_parts(template_dirs, qwen3_5_dirs, qwen3_5_toks, v1_tok):
    """List content stays a list through normalising; Qwen3.5/3.6 get it as is (and concatenate the parts),
    every other template and Qwen v1 ChatML get the parts joined with newlines, as servers pass them."""
    from qwen_ft.data.template import compile_template, find_template, takes_parts

    for name, d in {**template_dirs, **qwen3_5_dirs}.items():
        text = find_template(d).text
        assert takes_parts(compile_template(text).environment, text) == (name in PARTS_TEMPLATES), name
    conv, _ = normalise(CASES["text parts"], None)
    assert conv["messages"][0]["content"] == CASES["text parts"]["messages"][0]["content"]
    toks = {**{n: load_tokenizer(d) for n, d in template_dirs.items()}, **qwen3_5_toks, "v1": v1_tok}
    for name, tok in toks.items():
        text = tok.decode(Renderer.of(tok).render(conv)[0])
        want = "Capitalof Peru?" if name in PARTS_TEMPLATES else "Capital\nof Peru?"
        assert f"<|im_start|>user\n{want}<|im_end|>" in text, name


def test_control_and_bad_text_inside_parts(qwen3_5_toks, qwen3_5_hf):
    """Special-token text inside a part stays text (the one known difference from apply_chat_template); a
    lone surrogate or the renderer's marks inside a part are refused as in a string."""
    tok, hf = qwen3_5_toks["qwen35"], qwen3_5_hf["qwen35"]
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "say <|im_end|>"}, {"type": "text", "text": " now"}],
            },
            A,
        ]
    }
    conv, _ = normalise(row, None)
    ids, _, blocks = Renderer.of(tok).render(conv)
    assert [b.role for b in blocks] == ["user", "assistant"]
    assert ids[blocks[0].body : blocks[0].end] == tok.encode("say <|im_end|> now")
    assert served_ids(hf, conv, parts=True).count(tok.im_end_id) == 3  # a server would end the turn early
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\ud800"}]}, A]}
    with pytest.raises(RowError, match="lone surrogate U\\+D800"):
        normalise(bad, None)
    marked, _ = normalise({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ufdd0"}]}, A]}, None)
    with pytest.raises(RowError, match="noncharacters U\\+FDD0"):
        Renderer.of(tok).render(marked)


def test_qwen3_5_template_kwargs_per_run_config_and_row(qwen3_5_toks, qwen3_5_hf):
    """preserve_thinking / enable_thinking reach the template from Renderer.of(kwargs=...), from the config's
    data.template_kwargs (the training pipeline's TokenizeSpec) and from a row's chat_template_kwargs, which
    win over the run's; enable_thinking=false changes only the generation prompt."""
    from qwen_ft.config.schema import DataConfig
    from qwen_ft.data.tokenize import TokenizeSpec

    conv, _ = normalise({"messages": TWO_TURNS}, None)
    preserve = {"preserve_thinking": True}
    for name in PARTS_TEMPLATES:
        tok, hf = qwen3_5_toks[name], qwen3_5_hf[name]
        want = served_ids(hf, conv, parts=True, **preserve)
        by_config = TokenizeSpec.from_config(DataConfig(template_kwargs=preserve), tok).renderer(tok)
        assert Renderer.of(tok, kwargs=preserve).render(conv)[0] == by_config.render(conv)[0] == want
        assert Renderer.of(tok).render({**conv, "kwargs": preserve})[0] == want
        assert (want != served_ids(hf, conv, parts=True)) == (name == "qwen36")  # only Qwen3.6 reads it
        row_off = {**conv, "kwargs": {"preserve_thinking": False}}
        assert Renderer.of(tok, kwargs=preserve).render(row_off)[0] == served_ids(hf, conv, parts=True)

        off = Renderer.of(tok, kwargs={"enable_thinking": False})
        served_off = hf.apply_chat_template(
            conv["messages"], add_generation_prompt=True, enable_thinking=False, tokenize=True
        )["input_ids"]
        assert off.prompt(conv) == list(served_off)
        assert hf.decode(off.prompt(conv)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert hf.decode(Renderer.of(tok).prompt(conv)).endswith("<|im_start|>assistant\n<think>\n")
        assert off.render(conv)[0] == Renderer.of(tok).render(conv)[0]  # training ids: no generation prompt


@pytest.mark.parametrize("kwargs", [{"enable_thinking": False}, {"enable_thinking": False, "preserve_thinking": True}])
def test_run_template_kwargs_are_the_recorded_templates_defaults(kwargs, template_dirs, qwen3_5_dirs, tmp_path):
    """Servers read an output's template but not the data.template_kwargs its run rendered with, so those are
    written into it as defaults: a stock AutoTokenizer of the output renders, without them, every prompt and
    whole conversation of the bundled data as the original template with them (the five real templates), and
    a request that passes the opposite value still gets it."""
    from transformers import AutoTokenizer

    from qwen_ft.data.template import find_template, record_template

    lines = (REPO / "data" / "example_chatml.jsonl").read_text().splitlines()
    conversations = [json.loads(line)["messages"] for line in lines]
    prompts = [c[: i + 1] for c in conversations for i, m in enumerate(c) if m["role"] == "user"]
    opposite = {k: not v for k, v in kwargs.items()}
    for name, src in {**template_dirs, **qwen3_5_dirs}.items():
        out = tmp_path / name
        shutil.copytree(src, out)
        record_template(out, find_template(src).text, kwargs)
        original, recorded = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
        assert recorded.chat_template != original.chat_template
        for messages, prompt in [(c, False) for c in conversations] + [(p, True) for p in prompts]:
            for extra in ({}, opposite):
                got = recorded.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **extra)
                want = original.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=prompt, **{**kwargs, **extra}
                )
                assert got == want, (name, messages, extra)
        if name in ("qwen3", "qwen35", "qwen36"):  # these read enable_thinking: the default does change the text
            plain = original.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
            assert recorded.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True) != plain


def test_template_kwargs_that_a_template_cannot_hold_are_refused(tmp_path):
    from qwen_ft.config.schema import DataConfig, RunConfig
    from qwen_ft.config.validate import validate_config
    from qwen_ft.data.template import with_defaults
    from qwen_ft.errors import QwenFtError

    cfg = RunConfig(data=DataConfig(train_files=("x.jsonl",), template_kwargs={"enable-thinking": False, "if": 1}))
    found = [p for p in validate_config(RunConfig(model=cfg.model, data=cfg.data)) if "template_kwargs" in p]
    assert len(found) == 2 and "'enable-thinking' is not a name a chat template can read" in found[0]
    with pytest.raises(QwenFtError, match=r"data.template_kwargs.limit: nan cannot be written"):
        with_defaults("{{ limit }}", {"limit": float("nan")})
    text = with_defaults("{{ a }}|{{ b | tojson }}", {"a": 'say "hi"\n', "b": {"k": [1, 2.5, None, True]}})
    from transformers.utils.chat_template_utils import render_jinja_template

    got = render_jinja_template(conversations=[[]], chat_template=text)[0][0]
    assert got == 'say "hi"\n|{"k": [1, 2.5, null, true]}'
