"""The comparison: the same workload through transformers' Trainer + peft, written as a user would.

Defaults everywhere except what defines the workload (batch 1 x accumulation 8, steps, learning
rate, LoRA settings, gradient checkpointing, bf16 where the GPU has it). The quantized bases load
as peft's Q-LoRA recipe says (bitsandbytes nf4 + prepare_model_for_kbit_training); a GPTQ base
loads with the same trainable torch kernel qwen-ft uses, so that part compares like with like.
"""

from __future__ import annotations

import torch

from qwen_ft.bench.measure import StepClock
from qwen_ft.model.families import resolve_family


def _load(model_dir: str, method: str, bf16: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPTQConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if method == "full":
        kwargs["dtype"] = torch.float32  # fp32 master weights under bf16 autocast (Trainer's bf16=True)
    elif method == "qlora_bnb":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    elif method == "qlora_gptq":
        kwargs["quantization_config"] = GPTQConfig(bits=4, backend="torch", use_exllama=False)
    if torch.cuda.is_available() and method.startswith("qlora"):
        kwargs["device_map"] = {"": 0}
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def _with_lora(model, method: str, case: dict):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method.startswith("qlora"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case["gradient_checkpointing"])
    from qwen_ft.model.experts import split_targets

    # the same layers as qwen-ft's defaults: on a mixture of experts the routed experts through peft's
    # target_parameters (which take no dropout)
    modules, parameters = split_targets((), resolve_family("auto", case["model_dir"]))
    config = LoraConfig(
        r=case["lora_r"],
        lora_alpha=case["lora_alpha"],
        lora_dropout=0.0 if parameters else case["lora_dropout"],
        target_modules=modules,
        target_parameters=parameters or None,
        task_type="CAUSAL_LM",
        modules_to_save=["embed_tokens", "lm_head"] if method == "lora_emb" else None,
    )
    return get_peft_model(model, config)


def run_baseline(case: dict, device: torch.device) -> StepClock:
    """Train case["steps"] optimizer steps with Trainer; returns the clock of step ends."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    method = case["method"]
    model = _load(case["model_dir"], method, bf16)
    if method != "full":
        model = _with_lora(model, method, case)
    clock = StepClock(device)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.restart()

        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    args = TrainingArguments(
        output_dir=case["work"] + "/baseline",
        per_device_train_batch_size=case["micro_batch_size"],
        gradient_accumulation_steps=case["grad_accum"],
        max_steps=case["steps"],
        learning_rate=case["learning_rate"],
        bf16=bf16,
        use_cpu=device.type == "cpu",
        gradient_checkpointing=case["gradient_checkpointing"],
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    rows = Dataset.from_json(case["rows"])
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    return clock
