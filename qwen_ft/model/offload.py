"""Checkpointed layers' inputs kept in host memory between their forward and their recomputation.

A recomputed decoder layer keeps one tensor on the device through the whole forward: its input, [tokens,
hidden] in 16-bit, 16 MiB per 2048 tokens of a 7B layer, 0.97 GiB over 31 of 32 layers for 2 x 2048 tokens. The
backward pass reads it once, to recompute the layer. `model.offload_checkpoint_inputs: true` copies each input
to pinned host memory as its layer's forward ends (on a side stream, overlapping the next layers), lets the
device copy go, and brings it back for the recomputation, the previous layer's input fetched meanwhile.

The recomputation runs on a bitwise copy of the input, so the saved tensors, the gradients and the steps are
those of the plain checkpoint (tests/integration/test_offload.py; on a CPU host and device are one and the
copy is a clone through the same code; tests/gpu/test_offload_cuda.py checks the streams and the dropout).
"""

from __future__ import annotations

import functools
import weakref

import torch
from torch.utils.checkpoint import checkpoint


class HostCopy:
    """One checkpointed layer's input: the tensor itself while its layer's forward runs, then its host copy."""

    def __init__(self, x: torch.Tensor, offloader: Offloader, previous: HostCopy | None):
        self.x: torch.Tensor | None = x
        self.offloader, self.previous = offloader, previous
        self.device, self.requires_grad = x.device, x.requires_grad
        self.host: torch.Tensor | None = None
        self.prefetched: tuple[torch.Tensor, torch.cuda.Event] | None = None

    def get(self) -> torch.Tensor:
        """The forward's input itself (it is in the autograd graph); in the recomputation, its copy."""
        if self.x is not None:
            return self.x
        x = self._take_prefetched() if self.prefetched is not None else self._copy_back()
        if self.previous is not None:  # the layer before is recomputed next: its input crosses meanwhile
            self.previous.prefetch()
        return x.requires_grad_(self.requires_grad)  # the same ops record, the same tensors are saved

    def stash(self) -> None:
        """After the layer's forward: the input to host memory, the device copy left to whoever else holds it."""
        x, self.x = self.x, None
        assert x is not None
        side = self.offloader.side_stream(x.device)
        if side is None:
            self.host = x.detach().to(self.offloader.host, copy=True)
            return
        side.wait_stream(torch.cuda.current_stream(x.device))  # the copy reads what the layers wrote
        with torch.cuda.stream(side):
            self.host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self.host.copy_(x.detach(), non_blocking=True)
        x.record_stream(side)  # its memory is not reused before the copy is done

    def prefetch(self) -> None:
        """Start bringing the input back on the side stream (a CUDA input; elsewhere the copy waits for get)."""
        side = self.offloader.side_stream(self.device)
        if side is None or self.host is None or self.prefetched is not None:
            return
        with torch.cuda.stream(side):
            x = self.host.to(self.device, non_blocking=True)
        self.prefetched = x, side.record_event()

    def _take_prefetched(self) -> torch.Tensor:
        assert self.prefetched is not None
        (x, ready), self.prefetched = self.prefetched, None
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        x.record_stream(current)  # made on the side stream, read on this one
        return x

    def _copy_back(self) -> torch.Tensor:
        assert self.host is not None
        side = self.offloader.side_stream(self.device)
        if side is not None:
            torch.cuda.current_stream(self.device).wait_stream(side)  # the host copy is complete
        return self.host.to(self.device, non_blocking=side is not None)


class Offloader:
    """The checkpoint function of the decoder layers whose inputs wait in host memory (`host`: a CPU device;
    the memory-ledger test passes `meta` to tell the host copies from the device's tensors)."""

    def __init__(self, host: torch.device | str = "cpu"):
        self.host = torch.device(host)
        self.last: weakref.ref[HostCopy] | None = None
        self.last_index = -1
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        """The copies' CUDA stream on `device` (None off CUDA, where copies are plain clones)."""
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def checkpoint(self, index: int, fn, x, *args, **kwargs):
        """transformers' `_gradient_checkpointing_func` for decoder layer `index`: a non-reentrant checkpoint of
        `fn` whose recomputation reads input `x` back from host memory."""
        previous = self.last() if self.last is not None and index == self.last_index + 1 else None
        self.last = None
        # A layer called another way is checkpointed as transformers does; so is an input that is a leaf of the
        # graph (a LoRA run's embedding output, made to require grad), which the graph holds wherever it is copied.
        if not isinstance(x, torch.Tensor) or (x.is_leaf and x.requires_grad):
            return checkpoint(fn, x, *args, use_reentrant=False, **kwargs)
        box = HostCopy(x, self, previous)
        # `anchor` is an empty tensor on the input's device: the checkpoint finds the device whose RNG and autocast
        # state it restores for the recomputation (LoRA dropout) from its tensor arguments, and `x` is not one.
        out = checkpoint(_run, fn, box, x.new_empty(0), *args, use_reentrant=False, **kwargs)
        box.stash()
        self.last, self.last_index = weakref.ref(box), index  # a weak link: nothing outlives the backward
        return out


def _run(fn, box: HostCopy, anchor: torch.Tensor, *args, **kwargs):
    return fn(box.get(), *args, **kwargs)


def offload_checkpoint_inputs(model, host: torch.device | str = "cpu") -> int:
    """Make `model`'s checkpointed decoder layers keep their inputs in `host` memory; returns how many."""
    from qwen_ft.model.load import decoder_layers

    offloader = Offloader(host)
    layers = [layer for layer in decoder_layers(model) if getattr(layer, "gradient_checkpointing", False)]
    for i, layer in enumerate(layers):
        layer._gradient_checkpointing_func = functools.partial(offloader.checkpoint, i)
        layer.inputs_on_host = True  # recipe/steps.py counts them for the run's log
    return len(layers)
