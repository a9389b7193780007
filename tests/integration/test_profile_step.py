"""scripts/profile_step.py on CPU: one profiled step of the real training code, its report, its split."""

from __future__ import annotations

import json

from tests.conftest import load_script


def test_kernel_names_fall_into_their_categories():
    ps = load_script("profile_step")
    assert ps.category("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert ps.category("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == "attention"
    assert ps.category("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert ps.category("void at::native::bfloat16_copy_kernel_cuda(at::TensorIteratorBase&)") == "copies/casts"
    assert ps.category("void at::native::(anonymous namespace)::fused_dropout_kernel_vec<...>") == "dropout (fused)"
    # compiled kernels carry every fused op's name: an RMSNorm and a dropout are not copies because of `_to_copy`
    assert ps.category("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_1") == "rmsnorm (fused)"
    assert ps.category("triton_poi_fused__to_copy_native_dropout_2") == "dropout (fused)"
    assert ps.category("triton_poi_fused__to_copy_3") == "copies/casts"
    assert ps.category("aten::mm") == "gemm" and ps.category("aten::_log_softmax") == "elementwise"
    assert ps.category("Optimizer.step#AdamW.step") == "other"


def test_profiles_one_step_of_the_real_loop(run_config, tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert load_script("profile_step").main([run_config(), "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["wall_s"] > 0 and rep["kernel_s"] > 0 and rep["top"]
    assert abs(sum(rep["split"].values()) - 1) < 1e-3 and rep["split"].get("gemm", 0) > 0
    assert isinstance(rep["host_syncs"], int) and rep["host_syncs"] >= 1  # at least the loss read once per step
    text = capsys.readouterr().out
    assert "profiled step:" in text and "split: " in text


def test_sync_sites_count_only_sync_warnings_by_line():
    import warnings

    def caught(message, filename, lineno):
        return warnings.WarningMessage(UserWarning(message), UserWarning, filename, lineno)

    rows = [
        caught("called a synchronizing CUDA operation", "/x/qwen_ft/train/loop.py", 120),
        caught("called a synchronizing CUDA operation", "/x/qwen_ft/train/loop.py", 120),
        caught("called a synchronizing CUDA operation", "/tmp/torchinductor/ab/cabc.py", 7),
        caught("something else", "/x/qwen_ft/train/loop.py", 3),
    ]
    assert load_script("profile_step").sync_sites(rows) == {
        "qwen_ft/train/loop.py:120": 2,
        "torchinductor/ab/cabc.py:7": 1,
    }
