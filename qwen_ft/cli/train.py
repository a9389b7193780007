"""The story of a run: config -> checks -> tokenizer -> data -> model -> train -> save.

Run: torchrun --nproc_per_node N finetune.py --config configs/X.yaml [key=value ...]
     python finetune.py --config configs/tiny_cpu_smoke.yaml
     qwen-ft train configs/tiny_cpu_smoke.yaml [key=value ...]
All three run `train()` below.
"""

from __future__ import annotations

import argparse
import sys

from qwen_ft.errors import QwenFtError

HELP = "fine-tune a model (same as: torchrun finetune.py --config CONFIG)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """CONFIG [key=value ...]."""
    p.add_argument("config", help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_trainer(cfg, dist):
    """Everything a run needs, built in order: returns (trainer, TrainState: fresh or resumed)."""
    from qwen_ft.cli import setup
    from qwen_ft.train import loop

    cfg = setup.native_checkpoint(cfg, dist)
    precision, attn, family = setup.runtime(cfg, dist)
    ds_config, _zero3_loading = setup.deepspeed(cfg, precision, dist)  # kept alive while the model loads
    tok, data, first_epoch = setup.tokenizer_and_data(cfg, dist)
    unwrapped = setup.model(cfg, family, precision, attn, dist)
    plan = setup.run_plan(cfg, dist, first_epoch, precision, attn)
    backend = setup.backend(cfg, unwrapped, precision, dist, ds_config)
    state = setup.resume_state(cfg, backend, data, dist)
    trainer = loop.Trainer(cfg, plan, dist, backend, unwrapped, data, tok.endoftext_id,
                           setup.saver(cfg, unwrapped, tok, family, backend, dist),
                           setup.loss_function(cfg, unwrapped, ds_config))
    return trainer, state


def fit(cfg, dist):
    """Build everything for `cfg` and train; returns (trainer, final TrainState)."""
    from qwen_ft.cli import setup
    from qwen_ft.train import loop
    from qwen_ft.train.distributed import print0
    from qwen_ft.train.logging import RunLogger

    trainer, state = build_trainer(cfg, dist)
    logger = RunLogger(trainer.cfg.train.output_dir, trainer.plan.total_steps, state.step, dist.is_main)
    state = loop.run(trainer, state, logger)
    setup.save_final(trainer, state)
    logger.close(state.history)
    print0(dist, setup.summary(trainer.cfg, state))
    return trainer, state


def train(config: str, overrides: list[str]) -> int:
    """Run one fine-tuning job end to end; returns the exit status."""
    from qwen_ft.cli import setup
    from qwen_ft.train.distributed import shutdown

    cfg = setup.checked_config(config, overrides)
    dist = setup.distributed()
    try:
        fit(cfg, dist)
        return 0
    finally:
        shutdown(dist)


def run(args: argparse.Namespace) -> int:
    """`qwen-ft train` entry."""
    return train(args.config, args.overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry for finetune.py; user errors print a message and return 1."""
    from qwen_ft.cli.main import parse_with_overrides, quiet_third_party_logs

    quiet_third_party_logs()
    p = argparse.ArgumentParser(prog="finetune.py", description="Fine-tune a Qwen model from one YAML config.")
    p.add_argument("--config", required=True, help="run YAML")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parse_with_overrides(p, argv)
    try:
        return train(args.config, args.overrides)
    except QwenFtError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

