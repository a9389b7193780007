"""Time one Gated DeltaNet layer (forward + backward) on CPU: transformers' torch fallback on packed rows
(which leaks across conversations) against qwen-ft's exact per-conversation path, same shape, alternated.

Run: python scripts/bench_gdn.py [--rows 2] [--width 2048] [--conversation 300] [--hidden 512] [--rounds 5]
Prints one JSON line: median seconds of each and their ratio (fallback / qwen-ft: above 1 means faster).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def layer(hidden: int):
    from transformers import Qwen3_5TextConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    heads = max(2, hidden // 128)
    cfg = Qwen3_5TextConfig(
        hidden_size=hidden,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_num_key_heads=heads,
        linear_num_value_heads=2 * heads,
        num_hidden_layers=1,
        layer_types=["linear_attention"],
    )
    return Qwen3_5GatedDeltaNet(cfg, 0)


def lengths_of(width: int, conversation: int, rng: torch.Generator) -> list[int]:
    """Conversations of about `conversation` tokens (0.5x-1.5x) filling one row of `width`."""
    out: list[int] = []
    while sum(out) < width:
        n = int(conversation * (0.5 + torch.rand(1, generator=rng).item()))
        out.append(min(n, width - sum(out)))
    return out


def timed(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).sum().backward()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    from qwen_ft.data.collate import segment_indices
    from qwen_ft.model.linear_attention import install

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--conversation", type=int, default=300)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gdn = layer(args.hidden)
    rng = torch.Generator().manual_seed(0)
    rows = [lengths_of(args.width, args.conversation, rng) for _ in range(args.rows)]
    indices = segment_indices(rows, args.width)
    x = torch.randn(args.rows, args.width, args.hidden, requires_grad=True)
    stock = gdn.forward  # transformers' own forward, before qwen-ft wraps it
    install(gdn)
    modes = {"transformers_fallback": lambda h: stock(h), "qwen_ft_exact": lambda h: gdn(hidden_states=h, **indices)}
    for fn in modes.values():  # warm-up
        timed(fn, x)
    times: dict[str, list[float]] = {k: [] for k in modes}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            times[name].append(timed(fn, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "shape": {
            "rows": args.rows,
            "width": args.width,
            "hidden": args.hidden,
            "conversations": sum(len(r) for r in rows),
            "threads": torch.get_num_threads(),
        },
        "median_s": med,
        "fallback_over_qwen_ft": med["transformers_fallback"] / med["qwen_ft_exact"],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
