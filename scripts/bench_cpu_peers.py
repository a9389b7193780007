"""CPU side-by-side: qwen-ft against QwenLM's pad-to-max recipe and TRL's packed SFTTrainer.

Run: python scripts/bench_cpu_peers.py [--n 60] [--max-length 1024] [--rounds 2] [--out peers.json]
     [--tools qwen-ft,qwenlm,trl] [--before DIR]

`--before DIR` adds "qwen-ft-before": the same qwen-ft run from another checkout of qwen-ft (for
example `git worktree add DIR COMMIT`), alternated with the others in the same run.

One tiny Qwen3-shaped model with the real 151,936-token vocabulary, N generated conversations with
a realistic length spread (`bench_preprocess.generate`), LoRA r 8 / alpha 16 / dropout 0 on all
linear layers, fp32, gradient checkpointing, one epoch. Each tool runs in its own process, the
tools alternate round by round, and the figures are:
- process_s: the whole process (imports, load, tokenization, training; qwen-ft also saves its
  adapter, the peers save nothing), timed from outside;
- train_s: the training loop alone (qwen-ft's `loop.train`; `Trainer.train()` for the others).

The contenders, as their users run them:
- qwen-ft: `finetune.py` with packing, micro-batch 1 x accumulation 4;
- qwenlm: QwenLM finetune.py's recipe: its `preprocess` pads every conversation to max length,
  batch 1 x accumulation 8 through transformers' Trainer + peft;
- trl: `SFTTrainer` with `packing=True` (best-fit packing, padding-free), batch 1 x accumulation 4,
  on the tokenizer's own chat template. Needs `pip install trl` (skipped, and said, without it).
QwenLM masks as its `preprocess` does; TRL learns every token (Qwen's templates have no generation
markers for its assistant-only mask). Neither changes their compute: both project every position
onto the vocabulary, where qwen-ft projects only the learned ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_preprocess import generate, qwenlm_preprocess

TOOLS = ("qwen-ft", "qwenlm", "trl", "qwen-ft-before")
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LR = 1e-3


def setup(root: Path, n: int) -> None:
    """The shared model and data under `root`."""
    from qwen_ft.model.tiny import make_tiny_model

    make_tiny_model(root / "model")
    generate(root / "convs.jsonl", n, seed=1)


def conversations(root: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in open(root / "convs.jsonl", encoding="utf-8")]


def run_qwen_ft(root: Path, work: Path, max_len: int) -> float:
    """`finetune.py` on a fresh cache (tokenization counted); returns the seconds of `loop.train`."""
    cfg = {
        "model": {
            "path": str(root / "model"),
            "dtype": "fp32",
            "attn_implementation": "sdpa",
            "gradient_checkpointing": True,
        },
        "data": {
            "train_files": [str(root / "convs.jsonl")],
            "max_length": max_len,
            "packing": True,
            "cache_dir": str(work / "cache"),
        },
        "method": "lora",
        "lora": LORA,
        "train": {
            "output_dir": str(work / "out"),
            "micro_batch_size": 1,
            "grad_accum": 4,
            "epochs": 1,
            "learning_rate": LR,
        },
    }
    return train_seconds(work, cfg)


def train_seconds(work: Path, cfg: dict) -> float:
    """Run `finetune.py` on the config `cfg` (written into `work`); returns the seconds of `loop.train`."""
    import yaml

    from qwen_ft.cli.train import main
    from qwen_ft.train import loop

    (work / "run.yaml").write_text(yaml.safe_dump(cfg))
    seconds, plain = [], loop.train

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t0)

    loop.train = timed
    try:
        if main(["--config", str(work / "run.yaml")]) != 0:
            raise SystemExit("qwen-ft failed")
    finally:
        loop.train = plain
    return seconds[0]


def _lora_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qwen_ft.model.families import FAMILIES  # the linear layers qwen-ft adapts by default

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    model.enable_input_require_grads()  # QwenLM's recipe: needed by gradient checkpointing under LoRA
    cfg = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=list(FAMILIES["qwen3"].lora_targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def _common_args(work: Path, accum: int) -> dict:
    return {
        "output_dir": str(work / "out"),
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": accum,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "gradient_checkpointing": True,
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "disable_tqdm": True,
    }


def run_qwenlm(root: Path, work: Path, max_len: int) -> float:
    """QwenLM finetune.py: eager `preprocess` padding to max length, Trainer + peft, batch 1 x 8."""
    import torch
    from transformers import PreTrainedTokenizerFast, Trainer, TrainingArguments

    tok = PreTrainedTokenizerFast(tokenizer_file=str(root / "model/tokenizer.json"), pad_token="<|endoftext|>")
    sources = [
        [{"from": m["role"], "value": m["content"]} for m in c if m["role"] != "system"] for c in conversations(root)
    ]
    ids, labels, mask = qwenlm_preprocess(sources, tok, max_len)

    class Supervised(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i].long(), "labels": labels[i].long(), "attention_mask": mask[i]}

    trainer = Trainer(
        model=_lora_model(root / "model"),
        args=TrainingArguments(
            **_common_args(work, 8), weight_decay=0.1, adam_beta2=0.95, warmup_steps=0.01, lr_scheduler_type="cosine"
        ),
        train_dataset=Supervised(),
    )
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def run_trl(root: Path, work: Path, max_len: int) -> float:
    """TRL's SFTTrainer with packing on the tokenizer's chat template, batch 1 x 4."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(root / "model", local_files_only=True)
    data = Dataset.from_list([{"messages": c} for c in conversations(root)])
    args = SFTConfig(**_common_args(work, 4), max_length=max_len, packing=True)
    trainer = SFTTrainer(model=_lora_model(root / "model"), args=args, train_dataset=data, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


WORKERS = {"qwen-ft": run_qwen_ft, "qwen-ft-before": run_qwen_ft, "qwenlm": run_qwenlm, "trl": run_trl}


def one_process(tool: str, root: Path, max_len: int, before: str | None) -> dict:
    """Run `tool` in a fresh process; returns its whole-process and training-loop seconds."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if tool == "qwen-ft-before":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(before), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(dir=root) as work:
        result = Path(work) / "result.json"
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            tool,
            "--root",
            str(root),
            "--max-length",
            str(max_len),
            "--result",
            str(result),
        ]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        process_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{tool} failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        got = json.loads(result.read_text())
        return {"process_s": round(process_s, 2), "train_s": round(got["train_s"], 2), "code": got["code"]}


def available(tools: list[str], before: str | None) -> list[str]:
    if before and "qwen-ft-before" not in tools:
        tools = [*tools, "qwen-ft-before"]
    if "trl" in tools and importlib.util.find_spec("trl") is None:
        print("trl: not installed, left out (pip install trl)")
        return [t for t in tools if t != "trl"]
    return tools


def summary(runs: dict[str, list[dict]]) -> dict:
    """Mean seconds per tool, and qwen-ft's speed-ups over each peer."""
    mean = {t: {k: sum(r[k] for r in rs) / len(rs) for k in ("process_s", "train_s")} for t, rs in runs.items()}
    ours = mean["qwen-ft"]
    ratios = {}
    for peer in (t for t in mean if t != "qwen-ft"):  # qwen-ft-before too: its ratios are the change
        ratios[peer] = {
            "loop_vs_loop": mean[peer]["train_s"] / ours["train_s"],
            "process_vs_process": mean[peer]["process_s"] / ours["process_s"],
            "our_process_vs_their_loop": mean[peer]["train_s"] / ours["process_s"],
        }
    return {"mean": mean, "speedup": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=60)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tools", default=",".join(TOOLS))
    p.add_argument("--out", default=None, help="write the runs and summary as JSON")
    p.add_argument("--before", default=None, help="another qwen-ft checkout, run as qwen-ft-before")
    p.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        import qwen_ft

        seconds = WORKERS[args.worker](Path(args.root), Path(args.result).parent, args.max_length)
        Path(args.result).write_text(json.dumps({"train_s": seconds, "code": str(Path(qwen_ft.__file__).parent)}))
        return
    from qwen_ft.quiet import quiet_third_party

    quiet_third_party()  # its offline hub settings reach the workers through the environment
    if args.before and not (Path(args.before) / "qwen_ft").is_dir():
        raise SystemExit(f"--before {args.before}: no qwen_ft package there (a checkout of qwen-ft is expected)")
    tools = available(args.tools.split(","), args.before)
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    with tempfile.TemporaryDirectory() as tmp:
        setup(Path(tmp), args.n)
        for r in range(args.rounds):
            for tool in tools[r % len(tools) :] + tools[: r % len(tools)]:  # rotate the order each round
                runs[tool].append(one_process(tool, Path(tmp), args.max_length, args.before))
                print(
                    f"round {r + 1} {tool:8s} process {runs[tool][-1]['process_s']:7.2f} s, "
                    f"training loop {runs[tool][-1]['train_s']:7.2f} s",
                    flush=True,
                )
    out = {"n": args.n, "max_length": args.max_length, "runs": runs, **summary(runs)}
    for peer, r in out["speedup"].items():
        print(
            f"qwen-ft vs {peer}: loop {r['loop_vs_loop']:.2f}x, process {r['process_vs_process']:.2f}x, "
            f"qwen-ft's whole process vs {peer}'s loop {r['our_process_vs_their_loop']:.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
