"""train.adam_moments_on_host: AdamW's moments in host memory between steps. On a CPU the same copies run (host
to host), so the steps must be torch.optim.AdamW's bit for bit, and a resumed run the uninterrupted one."""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

from qwen_ft.train.host_adam import HostAdamW


def test_steps_equal_torch_adamw_and_the_moments_wait_in_their_host_buffers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    twin.load_state_dict(model.state_dict())
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ours = HostAdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    buffers = None
    for step in range(5):
        x = torch.randn(4, 8)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
        held = [state[k] for state in ours.state.values() for k in ("exp_avg", "exp_avg_sq")]
        assert buffers is None or [t.data_ptr() for t in held] == buffers  # the same host buffers every step
        buffers = [t.data_ptr() for t in held]
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b), step
    for (_, a), (_, b) in zip(ours.state_dict()["state"].items(), theirs.state_dict()["state"].items(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_run_with_host_moments_trains_and_resumes_as_one_without(run_config, tmp_path):
    from qwen_ft.cli.main import main

    config = run_config(train={"max_steps": 4, "save_steps": 2})
    runs = {}
    for host in (False, True):
        out = tmp_path / f"host-{host}"
        assert main(["train", config, f"train.adam_moments_on_host={host}", f"train.output_dir={out}"]) == 0
        runs[host] = out
    history = [json.loads((runs[h] / "train_history.json").read_text()) for h in (False, True)]
    assert [x["loss"] for x in history[0]] == [x["loss"] for x in history[1]]
    resumed = tmp_path / "resumed"
    shutil.copytree(runs[True] / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    args = ["train.adam_moments_on_host=true", f"train.output_dir={resumed}", "train.resume=auto"]
    assert main(["train", config, *args]) == 0
    want, got = (load_file(d / "adapter_model.safetensors") for d in (runs[False], resumed))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_the_estimate_holds_the_moments_only_for_the_step(run_config, tiny_model_dir):
    from qwen_ft.config.load import load_config
    from qwen_ft.model.shape import Shape
    from qwen_ft.recipe.estimate import peak_of

    shape = Shape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    on, off = (
        peak_of(load_config(run_config(), [f"train.adam_moments_on_host={v}"]), shape, "bf16", 1, 0, False)
        for v in (True, False)
    )
    assert on.parts["optimizer"] == 0 and on.moments["optimizer step"] == off.parts["optimizer"] > 0


def test_step_hooks_run_once_and_loaded_moments_go_to_their_host_buffers():
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # a plain AdamW first: torch has wrapped AdamW.step
    p = torch.nn.Parameter(torch.ones(3))
    opt = HostAdamW([p], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda *args: calls.append(1))
    p.grad = torch.ones(3)
    opt.step()
    assert calls == [1]
    resumed = HostAdamW([p], lr=0.1)
    resumed.load_state_dict(opt.state_dict())  # torch moves loaded state to the parameters' device
    held = {t.data_ptr() for t in resumed._host.values()}
    assert len(held) == 2 and all(resumed.state[p][k].data_ptr() in held for k in ("exp_avg", "exp_avg_sq"))
