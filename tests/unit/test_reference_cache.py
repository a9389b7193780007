"""The precomputed reference's cache key changes with whatever changes the reference's numbers."""

from __future__ import annotations

from types import SimpleNamespace

from qwen_ft.config.schema import DataConfig, ModelConfig, QuantConfig, RunConfig
from qwen_ft.train.reference_cache import table_path


def test_the_key_follows_the_data_the_weights_the_method_and_the_quantization(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"a" * 64)
    data = SimpleNamespace(train=SimpleNamespace(_fingerprint="x"), eval=None)
    cfg = RunConfig(model=ModelConfig(path=str(base)), data=DataConfig(cache_dir=str(tmp_path / "c")), objective="dpo")
    key = lambda c, d=data: table_path(c, d, "fp32", "sdpa")  # noqa: E731
    first = key(cfg)
    assert first.parent == tmp_path / "c" / "reference" and key(cfg) == first
    changed = {
        "data": key(cfg, SimpleNamespace(train=SimpleNamespace(_fingerprint="y"), eval=None)),
        "method": key(RunConfig(**{**cfg.__dict__, "method": "qlora"})),
        "quant": key(RunConfig(**{**cfg.__dict__, "method": "qlora", "quant": QuantConfig(quant_type="fp4")})),
    }
    (base / "model.safetensors").write_bytes(b"b" * 64)  # the same size, other weights
    changed["weights"] = key(cfg)
    (base / "model.safetensors").unlink()
    (base / "pytorch_model.bin").write_bytes(b"b" * 64)  # pickle weights count too
    changed["bin"] = key(cfg)
    assert len({first, *changed.values()}) == 6, changed
