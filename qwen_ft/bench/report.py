"""Benchmark results -> one record per case (JSON) and one printed table."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from qwen_ft.bench.flops import hardware_flops, mfu, step_flops, torchtitan_flops
from qwen_ft.bench.reference import GOALS, SPEEDUP_GOALS, reference
from qwen_ft.model.shape import Shape


def record(case: dict, result: dict, shape: Shape, peak_tflops: float | None) -> dict:
    """Figures of one finished case: peak memory, seconds per step (= per 8 sequences: the median of the
    measured steps), tokens/s, MFU, HFU (recomputation counted) and torchtitan's MFU (`bench/flops.py`)."""
    out = {k: case[k] for k in ("impl", "shape", "method", "length")}
    out.update(error=result.get("error"), device=result.get("device"))
    measured = result.get("step_seconds", [])[case["warmup"] :]
    if out["error"] or not measured:
        out["error"] = out["error"] or "no step measured"
        return out
    seconds = statistics.median(measured)
    sequences = case["micro_batch_size"] * case["grad_accum"]
    counted = (shape, case["method"], case["length"], sequences, case["learned_per_step"], case["adapter_params"])
    flops = step_flops(*counted)
    hardware = hardware_flops(*counted, fraction=result.get("recomputed_fraction", 0.0))
    out.update(
        peak_gb=result["peak_gb"],
        peak_reserved_gb=result.get("peak_reserved_gb"),
        load_peak_gb=result.get("load_peak_gb"),
        seconds_per_step=seconds,
        layout=f"{case['micro_batch_size']}x{case['grad_accum']}",
        sequences_per_step=sequences,
        tokens_per_s=sequences * case["length"] / seconds,
        mfu=mfu(flops, seconds, peak_tflops),
        hfu=mfu(hardware, seconds, peak_tflops),
        mfu_torchtitan=mfu(torchtitan_flops(shape, case["length"], sequences), seconds, peak_tflops),
        recomputed_fraction=result.get("recomputed_fraction"),
        step_seconds=measured,
    )
    ref = reference(case["shape"], case["method"], case["length"])
    out["reference"] = {"peak_gb": ref[0], "seconds_per_step": ref[1]} if ref else None
    if case.get("estimate_gb") is not None and case["impl"] == "qwen-ft":  # the estimator, checked against the peak
        out.update(estimate_gb=case["estimate_gb"], estimate_error=case["estimate_gb"] / result["peak_gb"] - 1)
    goal = GOALS.get((case["shape"], case["method"], case["length"]))
    out["goal"] = {"max_peak_gb": goal[0], "min_mfu": goal[1]} if goal and case["impl"] == "qwen-ft" else None
    return out


def _case(r: dict) -> tuple:
    return r["shape"], r["method"], r["length"]


def speedups(records: list[dict]) -> dict[tuple, float]:
    """qwen-ft tokens/s over the baseline's, per (shape, method, length, baseline layout) where both
    finished; a baseline run at several micro-batch layouts (e.g. 2x4 and QwenLM's 1x8) gives one ratio each."""
    ours = {_case(r): r for r in records if r["impl"] == "qwen-ft" and not r.get("error")}
    return {
        (*_case(b), b.get("layout", "1x8")): ours[_case(b)]["tokens_per_s"] / b["tokens_per_s"]
        for b in records
        if b["impl"] == "baseline" and not b.get("error") and _case(b) in ours
    }


def _cell(r: dict | None) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        return r["error"][:28]
    m, h = (f"{100 * r[k]:.0f}%" if r.get(k) is not None else "n/a" for k in ("mfu", "hfu"))
    return (
        f"{r.get('layout', '1x8')} {r['peak_gb']:.1f}GiB {r['seconds_per_step']:.2f}s "
        f"{r['tokens_per_s']:,.0f}tok/s MFU {m} HFU {h}"
    )


def table(records: list[dict]) -> str:
    """One line per (shape, method, length) and baseline layout: qwen-ft, baseline, speed-up and QwenLM's figures."""
    ratio = speedups(records)
    ours = {_case(r): r for r in records if r["impl"] == "qwen-ft"}
    lines = [
        f"{'shape':<5} {'method':<10} {'len':>5} | {'qwen-ft (layout, peak, s/8 seq, tok/s, MFU)':<50} | "
        f"{'Trainer+peft':<50} | {'x':>5} | QwenLM A100"
    ]
    for key in dict.fromkeys(_case(r) for r in records):
        mine = ours.get(key)
        bases: list[dict | None] = [r for r in records if r["impl"] == "baseline" and _case(r) == key]
        for base in bases or [None]:
            ref = (mine or base or {}).get("reference")
            x = ratio.get((*key, base.get("layout", "1x8"))) if base else None
            qwen = f"{ref['peak_gb']}G {ref['seconds_per_step']}s" if ref else "-"
            lines.append(
                f"{key[0]:<5} {key[1]:<10} {key[2]:>5} | {_cell(mine):<50} | {_cell(base):<50} | "
                f"{f'{x:.2f}' if x else '-':>5} | {qwen}"
            )
    return "\n".join(lines)


def goal_lines(records: list[dict]) -> list[str]:
    """Met / missed for each of qwen-ft's own goals that was measured."""
    out = []
    for r in records:
        g = r.get("goal")
        if not g or r.get("error"):
            continue
        ok = r["peak_gb"] <= g["max_peak_gb"] and (g["min_mfu"] is None or (r["mfu"] or 0) >= g["min_mfu"])
        want = f"<= {g['max_peak_gb']} GiB" + (f", MFU >= {100 * g['min_mfu']:.0f}%" if g["min_mfu"] else "")
        out.append(f"goal {r['shape']} {r['method']} {r['length']}: {want}: {'met' if ok else 'MISSED'}")
    for key, ratio in speedups(records).items():
        goal = SPEEDUP_GOALS.get(key[:3])
        if goal:
            out.append(
                f"goal {' '.join(map(str, key[:3]))}: tokens/s >= {goal}x Trainer + peft ({key[3]}): "
                f"{ratio:.2f}x {'met' if ratio >= goal else 'MISSED'}"
            )
    return out


def write_json(path: Path, meta: dict, records: list[dict]) -> None:
    """Everything measured, with the environment, as JSON."""
    ratios = [
        {"shape": k[0], "method": k[1], "length": k[2], "baseline_layout": k[3], "tokens_per_s_ratio": v}
        for k, v in speedups(records).items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "results": records, "speedup_vs_baseline": ratios}, indent=1))


def estimate_lines(records: list[dict]) -> list[str]:
    """The memory estimator against measured GPU peaks (the goal: within 15%)."""
    gpu = [
        r
        for r in records
        if r["impl"] == "qwen-ft"
        and not r.get("error")
        and r.get("device") != "cpu"
        and r.get("estimate_gb") is not None
    ]
    if not gpu:
        return ["estimator check: needs GPU peaks (on a CPU the peak is the process's resident memory)"]
    return [
        f"estimator {r['shape']} {r['method']} {r['length']}: predicted {r['estimate_gb']:.1f} GiB, measured "
        f"{r['peak_gb']:.1f} GiB ({100 * r['estimate_error']:+.0f}%"
        f"{')' if abs(r['estimate_error']) <= 0.15 else ', outside 15%)'}"
        for r in gpu
    ]
