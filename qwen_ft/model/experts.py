"""Mixture-of-experts layers: which LoRA targets are expert parameters, and LoRA on the fused experts
run through transformers' grouped matmuls.

transformers 5 fuses a layer's routed experts into two 3-D parameters, `gate_up_proj` [E, 2I, H]
and `down_proj` [E, H, I]. They are not `nn.Linear`, so peft's `target_modules` never reaches them;
its `target_parameters` wraps them (`ParamWrapper`: one rank-r adapter per expert). Stock peft then
runs each forward with the weight W + B·A materialised for every expert, routed or not. qwen-ft keeps
peft's modules and their saved layout (the adapter loads in stock peft) but runs the wrapped experts
itself: the base product through transformers' own grouped path (`torch.nn.functional.grouped_mm`
where it runs, else transformers' grouped fallback), plus the low-rank term x·Aᵀ·Bᵀ on each routed
token only, through the same grouped matmuls. Mathematically the same function, without a Python
loop over experts.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qwen_ft.model.families import Family


def is_parameter_target(name: str) -> bool:
    """A LoRA target that names a parameter (peft `target_parameters`), not a module: the fused
    experts (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`) or a router weight (`mlp.gate.weight`)."""
    return "experts." in name or name.endswith(".weight")


def split_targets(entries: tuple[str, ...], family: Family) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of `lora.target_modules`, or of the family's defaults
    (every linear layer, and every routed expert of an MoE) when it is empty; the family's
    `linears_by_weight` go by their weight (see families.py)."""
    chosen = [
        f"{t}.weight" if t in family.linears_by_weight else t for t in entries or family.lora_targets + family.experts
    ]
    return [t for t in chosen if not is_parameter_target(t)], [t for t in chosen if is_parameter_target(t)]


def fused_names(names: set[str]) -> tuple[set[str], set[str]]:
    """(module names, parameter-target names) of a mixture of experts as transformers 5 loads it, from
    the module names on disk: the per-expert linears (`mlp.experts.3.gate_proj`) are fused into
    `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, and the router `mlp.gate` is no linear layer
    but a `mlp.gate.weight` parameter."""
    import re

    modules, parameters = set(), set()
    for name in names:
        expert = re.match(r"(.*\.experts)\.\d+\.(gate|up|down)_proj$", name)
        if expert:
            parameters.add(f"{expert[1]}.{'down_proj' if expert[2] == 'down' else 'gate_up_proj'}")
        elif name.endswith("mlp.gate"):
            parameters.add(name + ".weight")
        else:
            modules.add(name)
    return modules, parameters


def expert_modules(model: torch.nn.Module) -> list[Any]:
    """The fused-experts modules of `model` (below any peft wrappers)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Experts") and hasattr(m, "gate_up_proj")]


def implementation(model: torch.nn.Module) -> str:
    """How transformers runs the experts of `model` here: grouped_mm (torch's grouped kernel, or
    transformers' grouped fallback where torch has none for this device and dtype), batched_mm or eager."""
    experts = expert_modules(model)
    if not experts:
        return "none"
    name = str(experts[0].config._experts_implementation)
    if name != "grouped_mm":
        return name
    from qwen_ft.model.experts_4bit import describe, weight_compute_dtype

    w = experts[0].gate_up_proj
    kernel = _grouped_kernel_runs(w.device, weight_compute_dtype(w))
    name = "grouped_mm (torch kernel)" if kernel else "grouped_mm (transformers' grouped fallback)"
    return name + (f", {describe(w)}" if describe(w) else "")


def never_a_loop(model: Any) -> None:
    """Where transformers fell back to its eager experts (a Python loop over experts, when grouped_mm
    cannot dispatch here), use its batched path instead."""
    experts = expert_modules(model)
    if experts and experts[0].config._experts_implementation == "eager":
        model.set_experts_implementation("batched_mm")


def runs_grouped(experts: Any) -> bool:
    """Whether qwen-ft's grouped forward runs this experts module: where transformers' does, and always
    for quantized experts (which no transformers path can read)."""
    from qwen_ft.model.experts_4bit import is_quantized

    return experts.config._experts_implementation == "grouped_mm" or is_quantized(experts.gate_up_proj)


def _grouped_kernel_runs(device: torch.device, dtype: torch.dtype) -> bool:
    from transformers.integrations.moe import _can_use_grouped_mm

    x = torch.zeros(2, 8, device=device, dtype=dtype)
    w = torch.zeros(1, 8, 8, device=device, dtype=dtype)
    return bool(_can_use_grouped_mm(x, w, torch.tensor([2], device=device, dtype=torch.int32)))


def install_lora_experts(model: torch.nn.Module) -> int:
    """Run every LoRA-wrapped experts module of `model` through `lora_experts_forward` (idempotent);
    returns how many are."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    nested = {id(m.base_layer) for m in wrappers}  # inner wrappers of a chain (peft nests one per parameter)
    count = 0
    for module in wrappers:
        if id(module) in nested:
            continue
        base: Any = module.get_base_layer()
        if not (type(base).__name__.endswith("Experts") and runs_grouped(base)):
            continue
        if not getattr(module, "_qwen_ft_grouped", False):
            setattr(module, "forward", functools.partial(lora_experts_forward, module, module.forward))  # noqa: B010
            setattr(module, "_qwen_ft_grouped", True)  # noqa: B010 - not an attribute mypy knows
        count += 1
    _unadapted_quantized(model, {id(m.get_base_layer()) for m in wrappers})
    return count


def _unadapted_quantized(model: torch.nn.Module, adapted: set[int]) -> None:
    """Quantized experts that no adapter wraps (left out of lora.target_modules) run through the grouped
    forward too: transformers' own reads a 16-bit tensor they no longer have."""
    from qwen_ft.model.experts_4bit import is_quantized

    for experts in expert_modules(model):
        if id(experts) not in adapted and is_quantized(experts.gate_up_proj):
            setattr(experts, "forward", functools.partial(grouped_experts_forward, experts, {}))  # noqa: B010


def lora_factors(outer) -> tuple[torch.nn.Module, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] | None:
    """(base experts module, {parameter: (Aᵀ [E, in, r], Bᵀ [E, r, out], scaling)}) of a ParamWrapper
    chain with one active, unmerged adapter (no factors while adapters are disabled: the base alone);
    None when peft's own path must run (merged, several adapters)."""
    factors, layer = {}, outer
    while hasattr(layer, "parameter_name"):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if layer.merged or len(active) != 1 or not layer._did_swap_in_out_features:
            return None
        if layer.disable_adapters:
            layer = layer.base_layer
            continue
        a, b = layer.lora_A[active[0]].weight, layer.lora_B[active[0]].weight
        e = layer.num_experts
        # [E, in, r] and [E, r, out], each a transposed view of contiguous per-expert matrices, the
        # layout grouped_mm takes (B's expert axis is its last one in peft's layout: copied, it is small)
        a_t = a.reshape(e, -1, a.shape[-1]).transpose(1, 2)
        b_t = b.reshape(b.shape[0], -1, e).permute(2, 0, 1).contiguous().transpose(1, 2)
        factors[layer.parameter_name] = (a_t, b_t, layer.scaling[active[0]])
        layer = layer.base_layer
    return layer, factors


def lora_experts_forward(
    outer, peft_forward, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers' grouped experts forward with each projection's LoRA term added on the routed
    tokens (see the module docstring); peft's own forward where this cannot apply."""
    found = lora_factors(outer)
    if found is None or getattr(found[0], "_is_expert_parallel", False) or found[0].has_bias:
        _peft_can_run(outer)
        return peft_forward(hidden_states, top_k_index, top_k_weights)
    return grouped_experts_forward(found[0], found[1], hidden_states, top_k_index, top_k_weights)


def grouped_experts_forward(
    experts: Any, factors: dict, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The routed tokens through each expert's projections (grouped), with the LoRA `factors` of
    `lora_factors` added where given, weighted and summed back per token."""
    k = top_k_index.size(-1)
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    offsets = _offsets(expert_ids, experts.num_experts)
    x = hidden_states[perm // k]
    up = _projection(x, experts.gate_up_proj, factors.get("gate_up_proj"), offsets)
    down = _projection(experts._apply_gate(up), experts.down_proj, factors.get("down_proj"), offsets)
    weighted = down * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    restored = torch.empty_like(weighted).index_copy_(0, perm, weighted)  # back to (token, k) order
    return restored.view(-1, k, weighted.size(-1)).sum(dim=1).to(hidden_states.dtype)


def _peft_can_run(outer) -> None:
    """peft's own forward reads the 16-bit expert weights, which quantized experts no longer have."""
    from qwen_ft.errors import QwenFtError
    from qwen_ft.model.experts_4bit import is_quantized

    if is_quantized(outer.get_base_layer().gate_up_proj):
        raise QwenFtError(
            "quantized experts run only through qwen-ft's grouped forward, with one active, unmerged "
            "adapter; merge into the original-precision base instead (qwen-ft merge)"
        )


def _offsets(sorted_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Cumulative token counts per expert (int32), as transformers' grouped path makes them (histc:
    no host sync; float on CPU, int on CUDA, for determinism)."""
    ids = sorted_ids.float() if sorted_ids.device.type in ("cpu", "mps") else sorted_ids.int()
    counts = torch.histc(ids, bins=num_experts, min=0, max=num_experts - 1)
    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def _projection(x: torch.Tensor, weight: torch.Tensor, lora, offsets: torch.Tensor) -> torch.Tensor:
    """x·Wₑᵀ per expert group, plus scaling·(x·Aₑᵀ)·Bₑᵀ when the parameter is adapted."""
    from transformers.integrations.moe import _grouped_mm

    from qwen_ft.model.experts_4bit import grouped_linear, weight_compute_dtype

    out = grouped_linear(x, weight, offsets)
    if lora is None:
        return out
    a_t, b_t, scaling = lora
    dtype = weight_compute_dtype(weight)
    grouped = _grouped_mm if _aligned(a_t.shape[-1], weight.device, dtype) else _grouped_fallback
    low = grouped(x, a_t.to(dtype), offs=offsets)
    return out + grouped(low, b_t.to(dtype), offs=offsets) * scaling


def _aligned(rank: int, device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA's grouped kernel needs 16-byte aligned rows: a rank of 8 in bf16 is, 4 is not (then
    transformers' grouped fallback runs the low-rank products)."""
    return device.type != "cuda" or (rank * dtype.itemsize) % 16 == 0


def _grouped_fallback(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch.ops.transformers.grouped_mm_fallback(x.to(weight.dtype), weight, offs=offs)


def z3_leaf_classes(model: torch.nn.Module) -> list[type]:
    """The sparse-MoE block classes of `model`, for DeepSpeed's `set_z3_leaf_modules` (its answer to
    ranks that route to different experts fetching different parameters). transformers 5's fused
    experts are one parameter per projection, so routing cannot split the gathers even without it
    (tests/integration/test_deepspeed_models.py passed both ways); it is kept as DeepSpeed recommends."""
    return sorted(
        {type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")}, key=lambda c: c.__name__
    )
