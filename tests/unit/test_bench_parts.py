"""The benchmark's pure parts: shapes, FLOPs, reference figures, exact-length workload, report."""

from __future__ import annotations

import pytest

from qwen_ft.bench.flops import device_peak_tflops, hardware_flops, mfu, step_flops, torchtitan_flops
from qwen_ft.bench.reference import reference
from qwen_ft.bench.report import estimate_lines, goal_lines, record, speedups, table
from qwen_ft.bench.shapes import shape_config
from qwen_ft.bench.workload import conversation, run_sections
from qwen_ft.errors import QwenFtError
from qwen_ft.model.shape import Shape

SEVEN_B = Shape.from_config(shape_config("7b"))


def test_named_shapes_have_the_released_parameter_counts():
    # Qwen-7B has 7.72B parameters (its model card); the others pin the shapes against accidental edits.
    assert round(SEVEN_B.params() / 1e9, 2) == 7.72
    assert round(Shape.from_config(shape_config("1.8b")).params() / 1e9, 2) == 1.84
    assert round(Shape.from_config(shape_config("14b")).params() / 1e9, 2) == 14.17
    with pytest.raises(QwenFtError, match="unknown shape '3b'"):
        shape_config("3b")


def test_qwen3_5_shape_is_the_9b_text_model_and_counts_gdn_flops():
    """qwen3.5-9b: transformers' Qwen3.5-9B text shape (9.41B with its vision tower, 8.95B without), 24 GDN
    layers whose delta-rule FLOPs add to the matmuls and whose cost does not grow with the length."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from qwen_ft.bench.flops import gdn_flops_per_token

    config = shape_config("qwen3.5-9b")
    shape = Shape.from_config(config)
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3_5TextConfig(**settings))
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert round(shape.params() / 1e9, 2) == 8.95 and shape.gdn.layers == 24 and shape.attention_layers == 8
    per_token = [step_flops(shape, "lora", n, 1, learned=0) / n for n in (1024, 2048)]
    assert per_token[1] - per_token[0] == pytest.approx(6 * 8 * 16 * 256 * 1024)  # the 8 attention layers only
    assert gdn_flops_per_token(shape) == 3 * 24 * 32 * (4 * 128 * 128 + 2 * 64 * 256)


def test_full_finetuning_flops_follow_the_6n_rule_at_short_lengths():
    tokens = 8 * 16
    flops = step_flops(SEVEN_B, "full", 16, 8, learned=tokens)
    matmul_weights = SEVEN_B.linear_params() + SEVEN_B.vocab * SEVEN_B.hidden  # layers + output layer
    assert flops == pytest.approx(6 * matmul_weights * tokens, rel=1e-3)


def test_frozen_base_needs_two_thirds_and_attention_grows_with_length():
    lora = step_flops(SEVEN_B, "lora", 16, 8, learned=128)
    assert lora == pytest.approx(step_flops(SEVEN_B, "full", 16, 8, learned=128) * 2 / 3, rel=1e-3)
    per_token = [step_flops(SEVEN_B, "lora", n, 1, learned=0) / n for n in (1024, 2048)]
    assert per_token[1] - per_token[0] == pytest.approx(6 * SEVEN_B.layers * 4096 * 1024)
    assert step_flops(SEVEN_B, "lora", 16, 8, 128, adapter_params=10) - lora == 6 * 10 * 128


def test_mfu_and_device_peaks():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA H200") == 989.4
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("cpu") is None
    assert mfu(5e14, 1.0, 1000.0) == 0.5 and mfu(5e14, 1.0, None) is None


def test_reference_figures_from_qwenlm_table():
    assert reference("7b", "lora", 2048) == (23.8, 5.2)
    assert reference("7b", "lora_emb", 8192) == (48.5, 21.7)
    assert reference("1.8b", "qlora_gptq", 256) == (5.8, 1.4)
    assert reference("7b", "qlora_bnb", 4096) == (16.9, 11.6)
    assert reference("14b", "lora", 2048) is None and reference("7b", "full", 2048) is None
    assert reference("7b", "lora", 300) is None


@pytest.mark.parametrize("length", [64, 65, 256, 1000, 2048])
def test_workload_conversations_render_to_exactly_the_length(qwen3_tok, length):
    from qwen_ft.data.render import Renderer

    messages = conversation(qwen3_tok, length, seed=3)
    ids, labels, _ = Renderer.of(qwen3_tok).render({"messages": messages, "learn": [True]})  # as training renders
    assert len(ids) == length
    learned = sum(x != -100 for x in labels)
    assert abs(learned - length / 2) < 40  # about half the row is the learned reply


def test_workload_refuses_lengths_without_room(qwen3_tok):
    with pytest.raises(QwenFtError, match="leaves no room"):
        conversation(qwen3_tok, 20, seed=0)


def test_run_sections_per_method(tmp_path):
    emb = run_sections("lora_emb", "m", "d.jsonl", 512, 4, tmp_path)
    assert emb["method"] == "lora" and emb["lora"]["train_embeddings"] and emb["lora"]["r"] == 64
    assert emb["train"]["micro_batch_size"] == 1 and emb["train"]["grad_accum"] == 8
    gptq = run_sections("qlora_gptq", "m", "d.jsonl", 512, 4, tmp_path)
    assert gptq["method"] == "qlora" and gptq["quant"] == {"backend": "gptq"}
    full = run_sections("full", "m", "d.jsonl", 512, 4, tmp_path)
    assert "lora" not in full and full["train"]["learning_rate"] == 1e-5
    with pytest.raises(QwenFtError, match="unknown benchmark method 'dora'"):
        run_sections("dora", "m", "d.jsonl", 512, 4, tmp_path)


def _case(impl, method="lora", shape="7b", length=2048):
    return {
        "impl": impl,
        "shape": shape,
        "method": method,
        "length": length,
        "warmup": 1,
        "micro_batch_size": 1,
        "grad_accum": 8,
        "learned_per_step": 8 * 1000,
        "adapter_params": 0,
    }


def test_report_records_speedup_and_goals():
    ours = record(_case("qwen-ft"), {"step_seconds": [9.0, 2.0, 4.0], "peak_gb": 18.5, "device": "x"}, SEVEN_B, 989.4)
    base = record(_case("baseline"), {"step_seconds": [9.0, 6.0], "peak_gb": 30.0, "device": "x"}, SEVEN_B, 989.4)
    assert ours["seconds_per_step"] == 3.0 and ours["tokens_per_s"] == pytest.approx(8 * 2048 / 3)
    assert ours["reference"] == {"peak_gb": 23.8, "seconds_per_step": 5.2} and base["goal"] is None
    assert speedups([ours, base]) == {("7b", "lora", 2048, "1x8"): pytest.approx(2.0)}
    expected_mfu = step_flops(SEVEN_B, "lora", 2048, 8, 8000) / 3.0 / 989.4e12
    assert ours["mfu"] == pytest.approx(expected_mfu)
    assert goal_lines([ours]) == [
        f"goal 7b lora 2048: <= 19.0 GiB, MFU >= 40%: {'met' if expected_mfu >= 0.40 else 'MISSED'}"
    ]
    assert goal_lines([ours, base])[-1] == "goal 7b lora 2048: tokens/s >= 2.0x Trainer + peft (1x8): 2.00x met"
    # the median step (not the mean: one slow step moves it less), and HFU with every layer recomputed
    slow = {"step_seconds": [9.0, 2.0, 4.0, 30.0], "peak_gb": 18.5, "device": "x", "recomputed_fraction": 1.0}
    checkpointed = record(_case("qwen-ft"), slow, SEVEN_B, 989.4)
    assert checkpointed["seconds_per_step"] == 4.0 and checkpointed["recomputed_fraction"] == 1.0
    counted = (SEVEN_B, "lora", 2048, 8, 8000)
    assert checkpointed["hfu"] == pytest.approx(hardware_flops(*counted, fraction=1.0) / 4.0 / 989.4e12)
    assert checkpointed["mfu"] < checkpointed["hfu"] and ours["hfu"] == pytest.approx(ours["mfu"])
    assert checkpointed["mfu_torchtitan"] == pytest.approx(torchtitan_flops(SEVEN_B, 2048, 8) / 4.0 / 989.4e12)
    oom = record(_case("qwen-ft", "full"), {"error": "out of memory"}, SEVEN_B, None)
    text = table([ours, base, oom])
    assert "2.00" in text and "out of memory" in text and "23.8G 5.2s" in text


def test_baselines_at_two_layouts_give_one_ratio_each():
    """The baseline at 2x4 (as qwen-ft) and at QwenLM's 1x8: each its own line and its own ratio."""
    ours = record(
        {**_case("qwen-ft"), "micro_batch_size": 2, "grad_accum": 4},
        {"step_seconds": [9.0, 2.0], "peak_gb": 18.5, "device": "x"},
        SEVEN_B,
        989.4,
    )
    pair = record(
        {**_case("baseline"), "micro_batch_size": 2, "grad_accum": 4},
        {"step_seconds": [9.0, 3.0], "peak_gb": 25.0, "device": "x"},
        SEVEN_B,
        989.4,
    )
    qwenlm = record(_case("baseline"), {"step_seconds": [9.0, 5.0], "peak_gb": 21.0, "device": "x"}, SEVEN_B, 989.4)
    assert speedups([ours, pair, qwenlm]) == {
        ("7b", "lora", 2048, "2x4"): pytest.approx(1.5),
        ("7b", "lora", 2048, "1x8"): pytest.approx(2.5),
    }
    lines = table([ours, pair, qwenlm]).splitlines()[1:]
    assert len(lines) == 2 and "1.50" in lines[0] and "2x4 25.0GiB" in lines[0] and "2.50" in lines[1]
    assert goal_lines([ours, pair, qwenlm])[-2:] == [
        "goal 7b lora 2048: tokens/s >= 2.0x Trainer + peft (2x4): 1.50x MISSED",
        "goal 7b lora 2048: tokens/s >= 2.0x Trainer + peft (1x8): 2.50x met",
    ]


def test_estimator_is_checked_only_against_gpu_peaks():
    case = {**_case("qwen-ft"), "estimate_gb": 20.0}
    gpu = record(case, {"step_seconds": [1.0, 1.0], "peak_gb": 16.0, "device": "NVIDIA H100"}, SEVEN_B, None)
    cpu = record(case, {"step_seconds": [1.0, 1.0], "peak_gb": 19.0, "device": "cpu"}, SEVEN_B, None)
    assert gpu["estimate_error"] == pytest.approx(0.25)
    assert estimate_lines([gpu]) == [
        "estimator 7b lora 2048: predicted 20.0 GiB, measured 16.0 GiB (+25%, outside 15%)"
    ]
    assert "needs GPU peaks" in estimate_lines([cpu])[0]


def test_qwen3_moe_shape_counts_every_expert_and_flops_the_active_ones():
    """qwen3-30b-a3b: Qwen3-30B-A3B's config (30.53B parameters, 3.35B of them per token); its FLOPs
    follow the active weights, and an LoRA adapter on every expert matches stock peft's count."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from qwen_ft.model.shape import lora_params

    config = shape_config("qwen3-30b-a3b")
    shape = Shape.from_config(config)
    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**settings))
    assert shape.params() == sum(p.numel() for p in model.parameters()) == 30_532_122_624
    active = shape.params() - shape.moe.idle_params(shape.hidden)
    assert active == 3_353_032_704
    tokens = 8 * 16
    flops = step_flops(shape, "full", 16, 8, learned=tokens)
    attention = tokens * 48 * 6 * 16 * 32 * 128
    routers = 48 * 128 * shape.hidden  # every token passes through its layer's router
    assert shape.router_params() == routers
    assert flops == pytest.approx(
        6 * (shape.active_linear_params() + routers + shape.vocab * shape.hidden) * tokens + attention
    )
    assert shape.active_linear_params() < shape.linear_params() / 8
    tiny = Shape.from_config(shape_config("tiny-qwen3-moe"))
    tiny_settings = {
        k: v for k, v in shape_config("tiny-qwen3-moe").items() if k not in ("model_type", "architectures")
    }
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(Qwen3MoeConfig(**tiny_settings))
        adapted = get_peft_model(
            small,
            LoraConfig(
                r=8,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        )
    assert lora_params(tiny, 8) == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
