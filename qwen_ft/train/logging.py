"""Progress bar, TensorBoard scalars and the final loss plot (main process only)."""

from __future__ import annotations

import threading
from pathlib import Path

from qwen_ft.files import no_room, room_for

FULL = "Free space, then resume with train.resume: auto"
PLOT = "The trained model is saved in full; only the plot is missing (its data is train_history.json)"


class RunLogger:
    """Shows progress (loss, lr, tokens/s), writes TensorBoard scalars, plots loss.png at the end."""

    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int, enabled: bool, every: int = 1):
        from tqdm.auto import tqdm

        self.out = Path(out_dir)
        self.enabled, self.every, self.total = enabled, every, total_steps
        self.window: list[dict[str, float]] = []
        self.bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="training",
            unit="step",
            disable=not enabled,
            dynamic_ncols=True,
        )
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            with self._writing_tensorboard():
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            quiet_writer_thread()

    def _writing_tensorboard(self):
        """A full disk while logging stops training there, its last checkpoint intact."""
        return room_for(self.out / "tensorboard", FULL)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        """Record optimizer step `step` (1-based). Every `every` steps (train.logging_steps) and at the
        last one, TensorBoard and the bar get the window's mean loss and speed and its last lr and
        gradient norm; the history keeps every step regardless."""
        if self.tb is None:  # not enabled
            return
        self.bar.update(1)
        self.window.append(metrics)
        if step % self.every and step < self.total:
            return
        logged = window_mean(self.window)
        self.window = []
        with self._writing_tensorboard():
            for key, value in logged.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)
        aux = {"aux": f"{logged['aux_loss']:.4f}"} if "aux_loss" in logged else {}
        # a preference objective: how often and by how much chosen wins (KTO: its KL estimate)
        for key, short, form in (("rewards/accuracies", "acc", ".2f"), ("rewards/margins", "margin", ".3f")):
            aux |= {short: format(logged[key], form)} if key in logged else {}
        aux |= {"kl": f"{logged['kl']:.3f}"} if "kl" in logged else {}
        self.bar.set_postfix(
            loss=f"{logged['loss']:.4f}", **aux, lr=f"{logged['lr']:.2e}", tok_s=f"{logged['tokens_per_s']:.0f}"
        )

    def eval(self, step: int, loss: float) -> None:
        """Record an eval loss."""
        if self.tb is not None:  # enabled
            with self._writing_tensorboard():
                self.tb.add_scalar("eval/loss", loss, step)
            self.bar.write(f"step {step}: eval loss {loss:.4f}")

    def close(self, history: list[dict]) -> None:
        """Flush TensorBoard and write loss.png from the full history (resumed runs included)."""
        if self.tb is None:  # not enabled
            return
        self.bar.close()
        with self._writing_tensorboard():
            self.tb.close()
        with room_for(self.out / "loss.png", PLOT):
            plot_losses(history, self.out / "loss.png")


def quiet_writer_thread() -> None:
    """TensorBoard writes in a thread of its own; when the disk is full that thread prints a traceback,
    then the next write in the training loop raises the same error, which `room_for` reports. Only that
    thread's out-of-room traceback is left unprinted (once per process)."""
    previous = threading.excepthook
    if getattr(previous, "qwen_ft", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ != "_AsyncWriterThread" or no_room(args.exc_value) is None:
            previous(args)

    hook.qwen_ft = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def window_mean(window: list[dict[str, float]]) -> dict[str, float]:
    """Loss (and an MoE router's aux loss) and speed averaged over the logging window; lr and gradient
    norm as of its last step."""
    last = dict(window[-1])
    for key in ("loss", "aux_loss", "tokens_per_s"):
        if key in last:
            last[key] = sum(m[key] for m in window) / len(window)
    return last


def plot_losses(history: list[dict], path: Path) -> None:
    """Train (and eval) loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
