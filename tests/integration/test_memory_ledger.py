"""`qwen-ft estimate` against a ledger of real training steps at Qwen-7B's shape, run on fake tensors.

The model is built as the training code builds it (transformers' Qwen2 at the 7B shape, bf16, gradient
checkpointing, qwen-ft's LoRA r 64 on every linear layer) on the meta device, its tensors then made fake
(FakeTensorMode: shapes, dtypes and storages, no data), and two optimizer steps of qwen-ft's chunked loss
under bf16 autocast and AdamW run on them. A dispatch mode adds up the bytes of every live storage; its
peak is the ledger's. No GPU and no memory are needed, so the estimate is checked at full size in CI.
"""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

pytestmark = pytest.mark.slow
GIB = 2**30


class Ledger(TorchDispatchMode):
    """Live bytes of every tensor storage made under it (and of those `add`ed before), and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = WeakIdKeyDictionary()

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self.seen:  # a view, or an in-place result
            return
        self.seen[storage] = n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":  # meta: "host memory" (offloaded inputs)
                self.add(t)
        return out


def fake_model(cfg, family, mode):
    """The training model of `cfg` built on the meta device, every parameter and buffer then a fake tensor
    (tied weights stay one parameter)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_ft.model.adapters import apply_method
    from qwen_ft.model.load import enable_gradient_checkpointing

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(cfg.model.path), dtype=torch.bfloat16, attn_implementation="sdpa"
        )
        enable_gradient_checkpointing(model, for_adapters=True)
        model = apply_method(model, cfg.method_spec, family, cfg.train.seed)
    if cfg.model.offload_checkpoint_inputs:  # the host copies made on the meta device, which the ledger leaves out
        from qwen_ft.model.offload import offload_checkpoint_inputs

        offload_checkpoint_inputs(model, host="meta")
    made: dict[int, torch.nn.Parameter] = {}
    with mode:
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None:
                    if id(p) not in made:
                        made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad)
                    module._parameters[key] = made[id(p)]
            for key, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[key] = torch.empty(b.shape, dtype=b.dtype)
    return model.train()


def ledger_peak(cfg, family) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from qwen_ft.data.collate import learned_indices
    from qwen_ft.train.loss import ChunkedLoss

    length = cfg.data.max_length
    ids = torch.randint(0, 1000, (1, length))
    real = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(length)[None]}
    real.update(learned_indices(real["labels"]))  # collate makes them on the host
    mode = FakeTensorMode()
    model = fake_model(cfg, family, mode)
    with mode:
        batch = {k: mode.from_tensor(v) for k, v in real.items()}
        loss_fn = ChunkedLoss(model, cfg.train.loss_chunk_tokens, kernel="qwen-ft")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ledger = Ledger()
        for t in [*model.parameters(), *model.buffers(), *batch.values()]:
            ledger.add(t)
        with ledger:
            for _ in range(2):  # the second step holds AdamW's moments from the first
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = loss_fn(model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    return ledger.peak


@pytest.mark.parametrize("length,offload", [(2048, False), (8192, False), (8192, True)])
def test_estimate_is_within_ten_percent_of_the_7b_lora_ledger(length, offload, tmp_path, capsys):
    from qwen_ft.bench.shapes import shape_config
    from qwen_ft.config.load import config_from_dict
    from qwen_ft.model.families import resolve_family
    from qwen_ft.model.shape import Shape
    from qwen_ft.recipe.estimate import peak_of

    (tmp_path / "config.json").write_text(json.dumps(shape_config("7b")))
    cfg = config_from_dict(
        {
            "model": {"path": str(tmp_path), "dtype": "bf16", "offload_checkpoint_inputs": offload},
            "data": {"train_files": ["unused.jsonl"], "max_length": length},
            "lora": {"r": 64, "alpha": 16},
            "train": {"micro_batch_size": 1},
        }
    )
    shape = Shape.from_config(shape_config("7b"))
    estimate = peak_of(cfg, shape, "bf16", 1, 0, False).total
    peak = ledger_peak(cfg, resolve_family("auto", tmp_path))
    with capsys.disabled():
        how = ", inputs offloaded" if offload else ""
        print(f"\n7B LoRA {length}{how}: ledger {peak / GIB:.2f} GiB, estimate {estimate / GIB:.2f} GiB")
    assert peak > 15 * GIB  # the bf16 base alone is 14.4 GiB: the ledger saw the whole model
    assert abs(estimate / peak - 1) <= 0.10
