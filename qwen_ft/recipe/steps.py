"""The building steps of a training run, each small; `recipe/run.py` reads them top to bottom."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_ft.config.load import config_from_dict, config_to_dict, dump_config, load_config
from qwen_ft.config.schema import DataConfig, PreferenceSettings, RunConfig, TrainConfig
from qwen_ft.errors import ConfigError, QwenFtError
from qwen_ft.recipe.preflight import run_problems
from qwen_ft.train import checkpoint as ck
from qwen_ft.train.distributed import DistInfo, barrier, init_distributed, local_main_first, print0, wrap_ddp

if TYPE_CHECKING:
    import torch

    from qwen_ft.data.packing import BatchPlan
    from qwen_ft.data.prepare import PreparedData
    from qwen_ft.model.families import Family
    from qwen_ft.model.load import Precision
    from qwen_ft.tokenizer.base import ChatTokenizer
    from qwen_ft.train.loop import TrainingRun
    from qwen_ft.train.ownership import (
        OutputLock,  # the steps import what they build lazily, so that `qwen-ft --help` stays fast
    )
    from qwen_ft.train.plan import RunPlan
    from qwen_ft.train.protocols import Backend, LossFn, Saver


def checked_config(config: str | Path | RunConfig, overrides: list[str]) -> RunConfig:
    """Load (or take), validate and check the config against this machine; refuse what this version
    cannot run."""
    if isinstance(config, RunConfig):
        cfg, source = config_from_dict(config_to_dict(config), overrides, source="RunConfig"), "RunConfig"
    else:
        cfg, source = load_config(str(config), overrides), str(config)
    problems = run_problems(cfg)
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def distributed(train: TrainConfig | None = None) -> DistInfo:
    """Join the torchrun job (or run alone), its collectives bounded by train.collective_timeout."""
    return init_distributed(train.collective_timeout if train else 300)


def native_checkpoint(cfg: RunConfig, dist: DistInfo) -> RunConfig:
    """The config to train with: a Qwen v1 model.path is converted to the native Qwen2 layout first
    (once, cached under data.cache_dir); the user's config object itself is never changed."""
    import dataclasses

    from qwen_ft.model.families import resolve_family

    if resolve_family(cfg.model.family, cfg.model.path).name != "qwen":
        return cfg
    from qwen_ft.model.qwen_v1 import converted_for_training

    with local_main_first(dist):
        converted = converted_for_training(cfg.model.path, cfg.data.cache_dir)
    print0(dist, f"model: Qwen v1 checkpoint {cfg.model.path} converted to the native layout in {converted}")
    tokenizer = (
        cfg.tokenizer
        if cfg.tokenizer.path not in (None, cfg.model.path)
        else dataclasses.replace(cfg.tokenizer, path=str(converted))
    )
    model = dataclasses.replace(cfg.model, path=str(converted), family="qwen2")
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer)


def runtime(cfg: RunConfig, dist: DistInfo) -> tuple[Precision, str, Family]:
    """Precision, attention implementation and model family for this device and checkpoint."""
    from qwen_ft.model.families import resolve_family
    from qwen_ft.model.load import resolve_attention, resolve_dtype

    family = resolve_family(cfg.model.family, cfg.model.path)
    precision = resolve_dtype(cfg.model.dtype, dist.device)
    return precision, resolve_attention(cfg.model.attn_implementation, dist.device, precision.name), family


def tokenizer_and_data(
    cfg: RunConfig, dist: DistInfo, family: Family
) -> tuple[ChatTokenizer, PreparedData, BatchPlan]:
    """Tokenizer (of the family's vocabulary), data and the first epoch's batch plan: local rank 0 of
    each node builds the cache (once per node, or once in all on a shared filesystem), the other
    processes wait and then memory-map it."""
    from qwen_ft.data.prepare import format_stats, plan_for, prepare_data
    from qwen_ft.model.checks import check_vocabulary
    from qwen_ft.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_path)
    check_vocabulary(family, tok, cfg.tokenizer_path, cfg.model.path)
    with local_main_first(dist):
        data = prepare_data(cfg.data, tok, cfg.train.seed, cfg.objective)
    print0(dist, f"data ({data.stats.cache}: {data.stats.cache_path}), rendered by {template_source(cfg.data, tok)}")
    first = plan_for(cfg.data, cfg.train, data)
    print0(dist, format_stats(data.stats, first, cfg.data, cfg.train.micro_batch_size))
    return tok, data, first


def template_source(data: DataConfig, tok: ChatTokenizer) -> str:
    """Where the chat template that renders the data comes from (said once per run)."""
    from qwen_ft.data.render import Renderer

    return Renderer.of(tok, data.chat_template).source


def deepspeed(cfg: RunConfig, precision: Precision, dist: DistInfo) -> tuple[dict[str, Any] | None, object]:
    """(DeepSpeed config or None, object that must stay alive while a ZeRO-3 model loads)."""
    if cfg.dist.deepspeed == "none":
        return None, None
    from qwen_ft.train.deepspeed import import_deepspeed
    from qwen_ft.train.distributed import single_process_group
    from qwen_ft.train.ds_config import deepspeed_config, zero_stage

    ds = deepspeed_config(cfg.dist, cfg.train, precision.name, dist.world)  # ZeRO-3 conflicts: config/validate.py
    import_deepspeed()
    single_process_group(dist)
    if zero_stage(ds) != 3:
        return ds, None
    from transformers.integrations import HfDeepSpeedConfig

    return ds, HfDeepSpeedConfig(ds)  # from_pretrained then partitions weights while loading (zero.Init)


def model(cfg: RunConfig, family: Family, precision: Precision, attn: str, dist: DistInfo) -> torch.nn.Module:
    """The model to train; prints the trainable-parameter count."""
    import torch

    from qwen_ft.model.adapters import count_parameters
    from qwen_ft.model.build import build_model

    torch.manual_seed(cfg.train.seed)  # adapter init and dropout follow train.seed (same on every rank)
    unwrapped = build_model(
        cfg.model, cfg.method_spec, family, precision, attn, dist.device, packing=cfg.data.packing, seed=cfg.train.seed
    )
    trainable, total = count_parameters(unwrapped)
    print0(
        dist,
        f"model: {family.name} from {cfg.model.path}, method {cfg.method}, {precision.name}, {attn}; "
        f"trainable parameters {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)",
    )
    if family.moe:
        print0(dist, experts_line(cfg, family, unwrapped))
    if cfg.model.fused_lora:
        fused = sum(hasattr(m, "_peft_forward") for m in unwrapped.modules())
        print0(dist, f"fused LoRA function on {fused} layers (the others run peft's forward)")
    if cfg.model.offload_checkpoint_inputs:
        offloaded = sum(getattr(m, "inputs_on_host", False) for m in unwrapped.modules())
        but = "" if cfg.method == "full" else " but the first's (a leaf of the graph in an adapter run)"
        print0(dist, f"inputs of {offloaded} recomputed layers{but} kept in host memory until their recomputation")
    return unwrapped


def checkpointing_for_budget(cfg: RunConfig, precision: Precision, dist: DistInfo) -> RunConfig:
    """model.memory_budget_gib: the config recomputing the fewest layers whose estimate fits it (else `cfg`)."""
    from qwen_ft.recipe.estimate import layers_for_budget, recomputing

    budget = cfg.model.memory_budget_gib
    if budget is None or not cfg.model.gradient_checkpointing:
        return cfg
    k, layers, peak = layers_for_budget(cfg, budget, dist.world, precision.name)
    print0(dist, f"memory budget {budget:g} GiB: recomputing {k} of {layers} decoder layers (estimate {peak:.2f} GiB)")
    return recomputing(cfg, k, layers)


def host_embedding(cfg: RunConfig, unwrapped, dist: DistInfo):
    """model.host_embedding: the input embedding taken off the device (None when not asked for)."""
    if not cfg.model.host_embedding:
        return None
    from qwen_ft.model.host_embedding import move_embedding_to_host

    host = move_embedding_to_host(unwrapped)
    rows, width = host.weight.shape
    gib = host.weight.element_size() * rows * width / 2**30
    print0(dist, f"input embedding ({rows:,} x {width:,}, {gib:.2f} GiB) in host memory: looked up with each batch")
    return host


def reference_model(
    cfg: RunConfig, family: Family, precision: Precision, attn: str, dist: DistInfo, table: tuple | None = None
):
    """A frozen copy of the base, for an objective with a reference in a full fine-tune; else None (a LoRA
    model is its own reference, and precomputed reference log-probs every process can read need none)."""
    from qwen_ft.config.schema import REFERENCE_OBJECTIVES
    from qwen_ft.model.build import frozen_copy

    if cfg.objective not in REFERENCE_OBJECTIVES or cfg.method != "full" or (table and table[1]):
        return None
    print0(dist, f"reference: a frozen copy of {cfg.model.path} ({precision.name})")
    return frozen_copy(cfg.model, family, precision, attn, dist.device, packing=cfg.data.packing)


def reference_table(cfg: RunConfig, data, precision: Precision, attn: str, dist: DistInfo) -> tuple | None:
    """(path, every process can read it) of preference.precompute_ref's reference log-probs; None when off."""
    if not cfg.preference.precompute_ref:
        return None
    from qwen_ft.train.reference_cache import table_path, table_ready

    path = table_path(cfg, data, precision.name, attn)
    return path, table_ready(path, dist)


def precompute_reference(tr, table: tuple) -> None:
    """Read or compute the reference log-probs into the run; the frozen copy that computed them goes."""
    from qwen_ft.train.reference_cache import reference_tables

    tr.reference = reference_tables(tr, *table)
    tr.loss_fn.release_frozen()


def experts_line(cfg: RunConfig, family: Family, unwrapped: torch.nn.Module) -> str:
    """What a mixture of experts trains and how its experts run (said once per run)."""
    from qwen_ft.model.experts import implementation, split_targets

    text = f"experts: run through {implementation(unwrapped)}"
    if cfg.method == "full":
        return text + "; every expert and the router are trained"
    adapted = split_targets(cfg.lora.target_modules, family)[1]
    if not any("experts." in t for t in adapted):
        return text + (
            "; the routed experts are NOT adapted (lora.target_modules leaves them out: add "
            f"{', '.join(family.experts)} to train them)"
        )
    router = "" if any(t.endswith("mlp.gate.weight") for t in adapted) else " (the router is not: add mlp.gate.weight)"
    return text + f"; LoRA on {', '.join(t for t in adapted if 'experts.' in t)}{router}"


def router_loss(train: TrainConfig, unwrapped: torch.nn.Module, family: Family, dist: DistInfo):
    """The router's load-balancing loss of a mixture of experts (None: dense, or switched off)."""
    if not family.moe:
        return None
    from qwen_ft.train.router import RouterLoss, router_coef

    coef = router_coef(train.router_aux_loss_coef, unwrapped)
    source = "train.router_aux_loss_coef" if train.router_aux_loss_coef is not None else "the checkpoint's"
    if coef == 0:
        print0(dist, f"router loss: off ({source} router_aux_loss_coef is 0)")
        return None
    print0(
        dist, f"router loss: load-balancing aux loss x {coef:g} ({source} router_aux_loss_coef), logged as aux_loss"
    )
    return RouterLoss(unwrapped, coef)


def backend(
    cfg: RunConfig, unwrapped: torch.nn.Module, precision: Precision, dist: DistInfo, ds_config: dict[str, Any] | None
) -> Backend:
    """Optimizer plus the backend that steps it: DeepSpeed engine, DDP, or a single process."""
    from qwen_ft.train.backends import DeepSpeedBackend, TorchBackend
    from qwen_ft.train.schedule import build_optimizer

    if ds_config is None:
        optimizer = build_optimizer(unwrapped, cfg.train)
        model = wrap_ddp(unwrapped, dist)
        return TorchBackend(model, unwrapped, optimizer, precision, dist.device, cfg.train.max_grad_norm, dist.rank)
    from qwen_ft.train.deepspeed import initialize

    return DeepSpeedBackend(initialize(cfg.train, unwrapped, ds_config), unwrapped, dist.rank)


def run_plan(
    cfg: RunConfig, dist: DistInfo, first_epoch: BatchPlan, precision: Precision, attn: str, family: Family
) -> RunPlan:
    """Step counts for this world size; reports micro-batches left over by uneven division."""
    from qwen_ft.train.plan import make_run_plan

    n = len(first_epoch.batches)
    plan = make_run_plan(cfg.train, dist.device, precision, attn, dist.world, n, family.packing == "gdn")
    if n % dist.world:
        print0(
            dist,
            f"note: {n % dist.world} of {n} micro-batches per epoch are left out so that each of "
            f"{dist.world} processes gets {n // dist.world} (a different set each epoch)",
        )
    print0(
        dist,
        f"plan: {plan.total_steps} steps ({plan.steps_per_epoch} per epoch), warmup {plan.warmup_steps}, "
        f"{cfg.train.micro_batch_size} rows x {cfg.train.grad_accum} accumulation x {dist.world} processes",
    )
    return plan


def loss_function(
    train: TrainConfig,
    unwrapped: torch.nn.Module,
    ds_config: dict[str, Any] | None,
    objective: str = "sft",
    preference: PreferenceSettings | None = None,
    frozen: torch.nn.Module | None = None,
) -> LossFn:
    """Chunked output layer + cross-entropy unless disabled or under ZeRO-3 (partitioned head weights); for a
    preference objective, its loss over the sequences' log-probs (`frozen`: a separate reference model)."""
    from qwen_ft.train.ds_config import zero_stage
    from qwen_ft.train.loss import ChunkedLoss, causal_lm_loss

    if objective != "sft":
        from qwen_ft.train.preference_loss import PreferenceLoss

        return PreferenceLoss(unwrapped, objective, preference, train.loss_chunk_tokens, frozen)

    if train.loss_chunk_tokens == 0 or zero_stage(ds_config or {}) == 3:
        return causal_lm_loss
    return ChunkedLoss(unwrapped, train.loss_chunk_tokens, kernel=train.loss_kernel)


def lock_output_dir(train: TrainConfig, dist: DistInfo) -> OutputLock | None:
    """The main process locks train.output_dir for the run (a second run into it is refused)."""
    from qwen_ft.train.ownership import OutputLock

    return OutputLock(train.output_dir).acquire() if dist.is_main else None


def resume_checkpoint(cfg: RunConfig, dist: DistInfo) -> Path | None:
    """The verified checkpoint of this same run to resume from; or None, after making sure a fresh run
    writes over no other run's outputs (train.overwrite_output_dir clears them). Before any work."""
    from qwen_ft.config.load import config_to_dict
    from qwen_ft.train.ownership import check_same_run, claim_fresh
    from qwen_ft.train.resume import resume_path
    from qwen_ft.train.saving import remove_stale_saves

    if dist.is_main:  # under the output lock: nothing else writes there
        for path in remove_stale_saves(cfg.train.output_dir):
            print0(dist, f"resume: removed {path}, left by a save that was cut short")
    ckpt = resume_path(cfg.train.resume, cfg.train.output_dir, say=lambda text: print0(dist, text))
    if ckpt is not None:
        check_same_run(ckpt, config_to_dict(cfg), config_to_dict(RunConfig()))
    elif dist.is_main:
        claim_fresh(cfg.train.output_dir, cfg.train.overwrite_output_dir)
    barrier(dist)
    return ckpt


def resume_state(
    cfg: RunConfig, backend: Backend, data: PreparedData, dist: DistInfo, ckpt: Path | None
) -> ck.TrainState:
    """The TrainState: fresh, or restored (weights, optimizer, RNG) from `ckpt`."""
    from qwen_ft.train.resume import check_same_data, data_changes

    key, inputs = Path(data.stats.cache_path).name, data.stats.inputs
    if ckpt is None:
        if cfg.train.resume == "auto":
            print0(dist, f"resume: no intact checkpoint in {cfg.train.output_dir}/checkpoints; starting fresh")
        return ck.TrainState(data_key=key, data_inputs=inputs)
    changes = data_changes(ck.read_state(ckpt), key, inputs)
    if cfg.train.resume_data == "continue":
        check_same_data(changes, ckpt)
    state = backend.load_state(ckpt, cfg.method)
    print0(dist, f"resume: from {ckpt} at step {state.step}")
    if cfg.train.resume_data == "restart":
        state.epoch, state.batch_offset, state.data_key, state.data_inputs = 0, 0, key, inputs
        why = f" ({'; '.join(changes)})" if changes else ""
        print0(dist, f"resume: train.resume_data=restart: the data starts over at step {state.step}{why}")
    return state


def saver(
    cfg: RunConfig, unwrapped: torch.nn.Module, tok: ChatTokenizer, family: Family, backend: Backend, dist: DistInfo
) -> Saver:
    """Callable run on every rank: gathers ZeRO-3 weights, then the main process writes weights,
    run_config.yaml, manifest.json and tokenizer files into a directory."""
    from qwen_ft.data.template import find_template
    from qwen_ft.model.families import checkpoint_model_type
    from qwen_ft.model.layout import BaseLayout

    manifest = ck.build_manifest(
        cfg.model, cfg.method_spec, cfg.tokenizer_path, family.name, checkpoint_model_type(cfg.model.path)
    )
    text = dump_config(cfg)
    override = find_template(tok.directory, cfg.data.chat_template) if cfg.data.chat_template else None
    layout = BaseLayout.of(cfg.model.path, family)
    kwargs = dict(cfg.data.template_kwargs)

    def save(out: Path) -> None:
        state_dict = backend.saved_state_dict(cfg.method)  # every rank: ZeRO-3 gathers
        if dist.is_main:
            ck.save_model_files(unwrapped, out, state_dict, layout)
            ck.write_description(out, text, manifest, tok, override.text if override else None, kwargs)

    return save


def save_final(trainer: TrainingRun, state: ck.TrainState) -> None:
    """Final weights and description in output_dir itself (main process), with the loss history. They are
    written into a temporary directory and moved into place once complete: a save that fails (a full
    disk) leaves no half-written weights in output_dir, only the last checkpoint to resume from."""
    import json
    import os
    import shutil

    from qwen_ft.files import flush_tree
    from qwen_ft.train.saving import failed_saves_stop

    out, main = Path(trainer.train.output_dir), trainer.dist.is_main
    tmp = out / f".final.tmp-{os.getpid()}"  # only the main process writes; the others gather weights
    try:
        with failed_saves_stop(out, out / "checkpoints"):
            if main:
                tmp.mkdir()
            barrier(trainer.dist)
            trainer.save_fn(tmp)
            if main:
                ck.compact_adapter(tmp, ck.training_dtype(trainer.unwrapped))
                serving_guide(tmp, out, trainer.train.serve_for)
                (tmp / "train_history.json").write_text(json.dumps(state.history, indent=1))
                flush_tree(tmp)
                for f in sorted(tmp.iterdir()):
                    if (out / f.name).is_dir():
                        shutil.rmtree(out / f.name)  # a directory is replaced whole (additional_chat_templates/)
                    os.replace(f, out / f.name)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    barrier(trainer.dist)


def serving_guide(tmp: Path, out: Path, servers: tuple[str, ...] = ()) -> None:
    """SERVING.md for the final output being written in `tmp`, naming `out`, where it will be; for `servers`
    (train.serve_for), or every server."""
    import json

    from qwen_ft.export.servers import write_serving

    adapter = (tmp / "adapter_config.json").is_file()
    base = json.loads((tmp / "manifest.json").read_text())["base_model"]["path"] if adapter else None
    write_serving(tmp, list(servers) or None, base=base, at=out.resolve())


def summary(output_dir: str, state: ck.TrainState) -> str:
    """Closing lines: loss before/after and where things are."""
    losses = [h["loss"] for h in state.history if "loss" in h]
    evals = [h["eval_loss"] for h in state.history if "eval_loss" in h]
    if not losses:
        raise QwenFtError("no training step was run; check train.max_steps / train.epochs")
    text = f"done: {state.step} steps, train loss {losses[0]:.4f} -> {losses[-1]:.4f}"
    text += f", eval loss {evals[-1]:.4f}" if evals else ""
    return text + f"; model in {output_dir} (loss plot: loss.png, TensorBoard: tensorboard/)"
