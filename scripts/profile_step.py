"""Profile one optimizer step of the real training code and say where its time goes.

Run: python scripts/profile_step.py CONFIG [key=value ...] [--json OUT.json] [--trace OUT.trace.json]

One warm-up step, then one profiled step (forward, backward, clip, optimizer) through
`build_run` and the loop's own `train_step`. Prints the top kernels (device time on a GPU,
operator self time on a CPU), the split into GEMM / attention / RMSNorm / dropout / elementwise / copies+casts /
other, how busy the device was, and the number of host syncs: on a GPU, the calls that made the
host wait for the device (CUDA's sync debug mode counts them in a third step, with the Python line
that made each); on a CPU, the
operators that would sync if their tensors were on a GPU (`.item()`, `int(tensor)`, `nonzero`),
an upper bound, since some of them run on host tensors by design.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# Order matters: the first category whose pattern is in the (lower-cased) kernel name wins.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa")),
    (
        "gemm",
        (
            "gemm",
            "cutlass",
            "nvjet",
            "xmma",
            "cublas",
            "aten::mm",
            "aten::addmm",
            "aten::bmm",
            "aten::baddbmm",
            "matmul",
            "wgmma",
            "sm90_",
            "splitk",
        ),
    ),
    # compiled kernels are named after every op they fuse, casts included ("triton_per_fused__to_copy_add_mean_
    # mul_pow_rsqrt" is an RMSNorm): the norm and dropout ones are named as such, before copies/casts
    ("rmsnorm (fused)", ("rsqrt", "rms_norm", "rmsnorm")),
    ("dropout (fused)", ("dropout", "bernoulli", "philox")),
    ("copies/casts", ("copy", "memcpy", "memset", "cast", "to_copy", "convert", "fill", "cat", "index")),
    (
        "elementwise",
        (
            "elementwise",
            "vectorized",
            "reduce",
            "unrolled",
            "softmax",
            "dropout",
            "aten::mul",
            "aten::add",
            "aten::silu",
            "aten::pow",
            "aten::rsqrt",
            "aten::mean",
            "aten::sum",
            "norm",
            "aten::neg",
            "aten::div",
            "aten::exp",
            "aten::log",
            "aten::sqrt",
            "nll",
            "bernoulli",
            "where",
            "foreach",
            "sigmoid",
        ),
    ),
)
SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::item",
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaMemcpy DtoH",
    "Memcpy DtoH",
)


def category(name: str) -> str:
    """The bucket a kernel or operator name falls into."""
    low = name.lower()
    for cat, patterns in CATEGORIES:
        if any(p in low for p in patterns):
            return cat
    return "other"


def leaf_times(prof, on_gpu: bool) -> Counter:
    """Device time per kernel (GPU) or self CPU time per operator (CPU), in microseconds."""
    times: Counter = Counter()
    for ev in prof.key_averages():
        t = ev.self_device_time_total if on_gpu else ev.self_cpu_time_total
        if on_gpu and ev.device_type.name != "CUDA":
            continue
        if t > 0:
            times[ev.key] += t
    return times


def sync_count(prof) -> int:
    """Calls that block the host on the device (counted the same on CPU and GPU)."""
    return sum(
        ev.count
        for ev in prof.key_averages()
        if any(s in ev.key for s in SYNC_OPS) and ev.key != "aten::nonzero_static"
    )


def report(times: Counter, syncs: int, wall: float, top: int = 15) -> dict:
    """The profile as a dict: total, split by category (share of time), top kernels, syncs."""
    total = sum(times.values()) or 1
    split = Counter()
    for name, t in times.items():
        split[category(name)] += t
    return {
        "wall_s": wall,
        "kernel_s": total / 1e6,
        "host_syncs": syncs,
        "split": {k: round(v / total, 4) for k, v in split.most_common()},
        "top": [
            {"name": n[:120], "ms": round(t / 1e3, 2), "share": round(t / total, 4), "category": category(n)}
            for n, t in times.most_common(top)
        ],
    }


def print_report(rep: dict) -> None:
    busy = rep["kernel_s"] / rep["wall_s"] if rep["wall_s"] else 0.0
    print(
        f"profiled step: {rep['wall_s']:.3f} s wall, {rep['kernel_s']:.3f} s in kernels/operators "
        f"({busy:.0%} busy), {rep['host_syncs']} host syncs"
    )
    for row in rep.get("sync_sites", []):
        print(f"  sync x{row['count']} at {row['site']}")
    print("split: " + ", ".join(f"{k} {v:.1%}" for k, v in rep["split"].items()))
    for row in rep["top"]:
        print(f"  {row['ms']:9.2f} ms {row['share']:6.1%}  {row['category']:<12} {row['name']}")


def one_step(tr, state, cache) -> None:
    """One optimizer step exactly as loop.train takes it (minus logging and checkpoints)."""
    from qwen_ft.train import loop

    loop.train_step(tr, tr.host_group(loop.next_group(tr, state, cache)))
    grad_norm = tr.backend.clip()
    tr.backend.step(grad_norm)
    state.step += 1


def sync_sites(caught: list) -> Counter:
    """Where each recorded sync warning was raised, as `dir/file.py:line` of the Python frame that
    called into torch (a compiled graph's frame names the generated code), with counts."""
    return Counter(
        f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )


def count_syncs_gpu(fn) -> tuple[int, Counter]:
    """Run fn with CUDA's sync debug mode on; every synchronising call warns, and is counted by site."""
    import warnings

    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    sites = sync_sites(caught)
    return sum(sites.values()), sites


def profile(config: str, overrides: list[str], trace: str | None) -> dict:
    import time

    import torch
    from torch.profiler import ProfilerActivity

    from qwen_ft.recipe import steps
    from qwen_ft.recipe.run import build_run

    dist = steps.distributed()
    tr, state = build_run(steps.checked_config(config, overrides), dist)
    on_gpu = tr.plan.device.type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cache: dict = {}
    one_step(tr, state, cache)  # warm-up: kernels chosen, allocator settled
    sync()
    # Kernels only on a GPU: recording every CPU operator of a 7B step takes minutes to summarise.
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        one_step(tr, state, cache)
        sync()
        wall = time.perf_counter() - t0
    if trace:
        prof.export_chrome_trace(trace)
    syncs, sites = count_syncs_gpu(lambda: one_step(tr, state, cache)) if on_gpu else (sync_count(prof), Counter())
    rep = report(leaf_times(prof, on_gpu), syncs, wall)
    rep["sync_sites"] = [{"site": k, "count": n} for k, n in sites.most_common(10)]
    return rep


def main(argv: list[str]) -> int:
    from qwen_ft.errors import QwenFtError
    from qwen_ft.quiet import quiet_third_party

    quiet_third_party()
    p = argparse.ArgumentParser(prog="profile_step.py", description=__doc__.split("\n")[0])
    p.add_argument("config", help="run YAML (as for qwen-ft train)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--trace", help="write a Chrome trace here")
    args = p.parse_args(argv)
    try:
        rep = profile(args.config, args.overrides, args.trace)
    except QwenFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_report(rep)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
