"""Preference pairs through a real Qwen3.5 template and vocabulary: the prompt keeps the ids a server
sends, where the whole conversation's tokenization merges tokens across the prompt's end."""

from __future__ import annotations

from qwen_ft.data.preference import pair_of, render_pair
from qwen_ft.data.render import Renderer
from qwen_ft.tokenizer import load_tokenizer

USER = {"role": "user", "content": "What is 2 + 2?"}


def test_qwen3_5_pairs_keep_the_served_prompt_ids_where_tokens_merge_across_its_end(qwen3_5_dirs, qwen3_5_hf):
    renderer = Renderer.of(load_tokenizer(qwen3_5_dirs["qwen35"]))
    hf = qwen3_5_hf["qwen35"]
    pair = pair_of({"prompt": [USER], "chosen": "4.", "rejected": "5."}, "f:1", None)
    prompt, chosen, rejected = render_pair(renderer, pair)
    served = hf.apply_chat_template([USER], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert prompt == served and hf.decode(served).endswith("<|im_start|>assistant\n<think>\n")
    for reply, completion in (("4.", chosen), ("5.", rejected)):
        conversation = [USER, {"role": "assistant", "content": reply}]
        text = hf.apply_chat_template(conversation, tokenize=False)
        whole = hf.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert hf.decode(prompt + completion) == text  # the same text ...
        assert whole[: len(prompt)] != prompt  # ... whose whole tokenization merges "\n" + "\n" after <think>
        assert completion == hf.encode(text[len(hf.decode(prompt)) :], add_special_tokens=False)
