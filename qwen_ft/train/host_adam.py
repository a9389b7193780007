"""AdamW whose moments live in host memory between optimizer steps (train.adam_moments_on_host).

AdamW keeps two fp32 moments per trained weight: 1.19 GiB for a 7B model's LoRA r 64 on every linear layer,
held on the GPU through the forward and backward passes although only the optimizer step reads them. Here
they wait in pinned host memory; each step copies them to the device (without blocking), runs torch's own
AdamW update unchanged (the fused kernel on a GPU), and copies them back into the same host buffers. On the
device they exist only during the step, when the activations are already freed, so the training peak is
lower by their size. The update is torch's, so the steps are bit for bit those of torch.optim.AdamW
(tests/integration/test_host_adam.py: on a CPU the same copies run, host to host); checkpoints hold the
same state, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


class HostAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with its moments moved to host memory after each step and back before the next."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._host: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def step(self, closure=None):
        """Moments to the parameters' device, torch's AdamW step, moments back to their host buffers."""
        for p, state in self.state.items():
            for key in MOMENTS:
                if key in state:
                    state[key] = state[key].to(p.device, non_blocking=True, copy=True)
        # torch wraps a class's step with its optimizer-hook runner: AdamW's own, once wrapped, would run them again
        adamw = torch.optim.AdamW.step
        update = adamw.__wrapped__ if getattr(adamw, "hooked", False) else adamw
        try:
            return update(self, closure)
        finally:
            self._to_host()

    def load_state_dict(self, state_dict) -> None:
        """torch moves loaded state to each parameter's device: the moments go back to host memory at once (a
        resumed run's peak is then the one estimated)."""
        super().load_state_dict(state_dict)
        self._to_host()

    def _to_host(self) -> None:
        cuda = False
        for p, state in self.state.items():
            for key in MOMENTS:
                if key not in state:
                    continue
                moment = state[key]
                host = self._host.get((id(p), key))
                if host is None or host.shape != moment.shape:
                    pin = moment.is_cuda
                    host = self._host[(id(p), key)] = torch.empty_like(moment, device="cpu", pin_memory=pin)
                host.copy_(moment, non_blocking=True)
                state[key] = host
                cuda = cuda or moment.is_cuda
        if cuda:  # the host buffers are read (a checkpoint's save) only once the copies have landed
            torch.cuda.current_stream().synchronize()
