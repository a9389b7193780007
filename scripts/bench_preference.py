"""CPU side-by-side for DPO with LoRA: qwen-ft against TRL's DPOTrainer, whole processes, alternating.

Run: python scripts/bench_preference.py [--n 48] [--max-length 1024] [--rounds 2] [--out dpo.json]
     [--tools qwen-ft,qwen-ft-precompute,trl]

One tiny Qwen3-shaped model with the real 151,936-token vocabulary (`make_tiny_model`), N preference
pairs made from generated conversations (`bench_preprocess.generate`: the conversation up to its last
reply is the prompt, that reply the chosen completion, another conversation's last reply the rejected
one), LoRA r 8 / alpha 16 / dropout 0 on all linear layers, fp32 (TRL's default is bf16 autocast,
switched off), gradient checkpointing, DPO sigmoid, beta 0.1, one epoch, 8 pairs per optimizer step.
Each tool runs in its own process and the order rotates each round. Figures per run:
- process_s: the whole process (imports, load, tokenization, training), timed from outside;
- train_s: the training loop alone (qwen-ft's `loop.train`, TRL's `Trainer.train()`);
- tokens_per_s: the pairs' tokens (prompt + completion, chosen and rejected, as qwen-ft renders them:
  the same ids TRL makes for this template) over train_s;
- peak_rss_mb: the process's peak resident memory (`getrusage`).

The contenders, as their users run them: qwen-ft packs pairs into rows of 2 x max_length tokens
(micro-batch 1 x accumulation 4, its reference the model with the adapter off, computed in the same
step); `qwen-ft-precompute` adds `preference.precompute_ref: true` (the reference once, before
training: counted in process_s, not in train_s); TRL pads each batch of 2 pairs (batch 2 x
accumulation 4), its reference also the adapter-disabled model. Needs `pip install trl`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu_peers import train_seconds
from bench_preprocess import generate

TOOLS = ("qwen-ft", "qwen-ft-precompute", "trl")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LR, ACCUM = 1e-4, 4


def setup(root: Path, n: int) -> None:
    """The shared model and pairs under `root`."""
    from qwen_ft.model.tiny import make_tiny_model

    make_tiny_model(root / "model")
    generate(root / "convs.jsonl", n, seed=2)
    convs = [json.loads(line)["messages"] for line in open(root / "convs.jsonl", encoding="utf-8")]
    others = [c[-1] for c in convs]
    random.Random(0).shuffle(others)
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as fh:
        for conv, other in zip(convs, others, strict=True):
            rejected = other if other != conv[-1] else {"role": "assistant", "content": "I do not know."}
            fh.write(json.dumps({"prompt": conv[:-1], "chosen": [conv[-1]], "rejected": [rejected]}) + "\n")


def run_qwen_ft(root: Path, work: Path, max_len: int, precompute: bool) -> float:
    """`finetune.py` on a fresh cache; returns the seconds of `loop.train`."""
    cfg = {
        "model": {"path": str(root / "model"), "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {
            "train_files": [str(root / "pairs.jsonl")],
            "max_length": max_len,
            "packing": True,
            "cache_dir": str(work / "cache"),
        },
        "method": "lora",
        "objective": "dpo",
        "preference": {"beta": 0.1, "precompute_ref": precompute},
        "lora": LORA,
        "train": {
            "output_dir": str(work / "out"),
            "micro_batch_size": 1,
            "grad_accum": ACCUM,
            "epochs": 1,
            "learning_rate": LR,
        },
    }
    return train_seconds(work, cfg)


def run_trl(root: Path, work: Path, max_len: int, precompute: bool) -> float:
    """TRL's DPOTrainer with a fresh LoRA (its reference: the adapter disabled), batch 2 x 4."""
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from qwen_ft.model.families import FAMILIES  # the linear layers qwen-ft adapts by default

    model = AutoModelForCausalLM.from_pretrained(root / "model", local_files_only=True, attn_implementation="sdpa")
    lora = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(FAMILIES["qwen3"].lora_targets),
        task_type="CAUSAL_LM",
    )
    args = DPOConfig(
        output_dir=str(work / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUM,
        num_train_epochs=1,
        learning_rate=LR,
        beta=0.1,
        max_length=max_len,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=get_peft_model(model, lora),
        args=args,
        train_dataset=load_dataset("json", data_files=str(root / "pairs.jsonl"), split="train"),
        processing_class=AutoTokenizer.from_pretrained(root / "model", local_files_only=True),
    )
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def pair_tokens(root: Path, max_len: int) -> int:
    """Tokens of every pair's two sequences (prompt + completion each), as qwen-ft renders and cuts them."""
    from qwen_ft.data.preference import pair_of, pair_rows, render_pair
    from qwen_ft.data.render import Renderer
    from qwen_ft.tokenizer import load_tokenizer

    renderer = Renderer.of(load_tokenizer(root / "model"))
    total = 0
    for i, line in enumerate(open(root / "pairs.jsonl", encoding="utf-8")):
        pair = pair_of(json.loads(line), f"pairs:{i + 1}", "")
        rows, status = pair_rows(*render_pair(renderer, pair), max_len, "truncate")
        total += len(rows[0]) + len(rows[2]) if status != "dropped" else 0
    return total


def one_process(tool: str, root: Path, max_len: int) -> dict:
    """Run `tool` in a fresh process; its whole-process and training-loop seconds and peak RSS."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(dir=root) as work:
        result = Path(work) / "result.json"
        cmd = [sys.executable, __file__, "--worker", tool, "--root", str(root), "--max-length", str(max_len)]
        t0 = time.perf_counter()
        done = subprocess.run([*cmd, "--result", str(result)], capture_output=True, text=True, env=env)
        process_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{tool} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        got = json.loads(result.read_text())
        return {"process_s": round(process_s, 2), "train_s": round(got["train_s"], 2), "peak_rss_mb": got["rss_mb"]}


def summary(runs: dict[str, list[dict]], tokens: int) -> dict:
    """Means per tool, tokens/s, and qwen-ft's ratios over TRL."""
    keys = ("process_s", "train_s", "peak_rss_mb")
    mean = {t: {k: sum(r[k] for r in rs) / len(rs) for k in keys} for t, rs in runs.items() if rs}
    for m in mean.values():
        m["tokens_per_s"] = tokens / m["train_s"]
    ratios = {}
    if "trl" in mean:
        for ours in (t for t in mean if t != "trl"):
            ratios[ours] = {
                "tokens_per_s_vs_trl": mean[ours]["tokens_per_s"] / mean["trl"]["tokens_per_s"],
                "process_vs_trl": mean["trl"]["process_s"] / mean[ours]["process_s"],
                "peak_rss_vs_trl": mean[ours]["peak_rss_mb"] / mean["trl"]["peak_rss_mb"],
            }
    return {"tokens": tokens, "mean": mean, "ratios": ratios}


def worker(tool: str, root: Path, result: Path, max_len: int) -> None:
    run = run_trl if tool == "trl" else run_qwen_ft
    seconds = run(root, result.parent, max_len, tool == "qwen-ft-precompute")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result.write_text(json.dumps({"train_s": seconds, "rss_mb": round(rss_mb, 1)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--out", default=None, help="write the runs and summary as JSON")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, Path(args.root), Path(args.result), args.max_length)
    from qwen_ft.quiet import quiet_third_party

    quiet_third_party()  # its offline hub settings reach the workers through the environment
    tools = args.tools.split(",")
    if "trl" in tools and importlib.util.find_spec("trl") is None:
        raise SystemExit("trl is not installed: pip install trl==1.16.0 (or bash scripts/install_extras.sh)")
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    with tempfile.TemporaryDirectory() as tmp:
        setup(Path(tmp), args.n)
        tokens = pair_tokens(Path(tmp), args.max_length)
        for r in range(args.rounds):
            for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:  # rotate the order each round
                runs[tool].append(one_process(tool, Path(tmp), args.max_length))
                got = runs[tool][-1]
                print(
                    f"round {r + 1} {tool:18s} process {got['process_s']:7.2f} s, training loop "
                    f"{got['train_s']:7.2f} s, peak RSS {got['peak_rss_mb']:7.1f} MB",
                    flush=True,
                )
    out = {"n": args.n, "max_length": args.max_length, "runs": runs, **summary(runs, tokens)}
    for ours, r in out["ratios"].items():
        print(
            f"{ours} vs trl: tokens/s {r['tokens_per_s_vs_trl']:.2f}x, whole process {r['process_vs_trl']:.2f}x "
            f"faster, peak RSS {r['peak_rss_vs_trl']:.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
