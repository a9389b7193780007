"""The next accumulation group, collated (and on CUDA pinned) on a background thread.

Collating a group reads its rows from the Arrow table and builds the tensors: host work that,
done between steps on the main thread, leaves the device idle while it runs. Here it runs while
the current group trains. The order of the data never depends on the thread: the loop says which
group it needs, and a prepared group is used only if it is exactly that one (otherwise it is
collated on the spot), so results, resume and the non-finite rewind are those of a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

HostBatch = dict[str, torch.Tensor]


def _key(group: list) -> tuple:
    return tuple(tuple(rows) for rows in group)


def pinned(batch: HostBatch) -> HostBatch:
    """The batch in page-locked memory (once), so its copy to the GPU does not block the host."""
    return {k: v if not isinstance(v, torch.Tensor) or v.is_pinned() else v.pin_memory() for k, v in batch.items()}


class GroupFeed:
    """Collates the group the loop will need next while the current one trains."""

    def __init__(self, collate_group: Callable[[list], list[HostBatch]], device: torch.device):
        self._collate, self._pin = collate_group, device.type == "cuda"
        # The thread must allocate pinned memory on this process's GPU, not on device 0 (DataLoader's
        # pin thread does the same), or every rank of a node would open a context on GPU 0.
        init = (lambda: torch.cuda.set_device(device)) if self._pin else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="qwen-ft-feed", initializer=init)
        self._ahead: tuple[tuple, Future] | None = None
        self.prepared = self.used = 0

    def _make(self, group: list) -> list[HostBatch]:
        batches = self._collate(group)
        return [pinned(b) for b in batches] if self._pin else batches

    def prepare(self, group: list) -> None:
        """Start collating `group` in the background (replacing any group prepared before)."""
        self._drop()
        if group:
            self._ahead = (_key(group), self._pool.submit(self._make, group))
            self.prepared += 1

    def take(self, group: list) -> list[HostBatch]:
        """The host batches of `group`: the prepared ones if they are this group, else collated now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == _key(group):
            self.used += 1
            return ahead[1].result()  # an error raised in the thread surfaces here, in the loop
        if ahead is not None:
            ahead[1].cancel()
        return self._make(group)

    def _drop(self) -> None:
        if self._ahead is not None:
            self._ahead[1].cancel()
            self._ahead = None

    def close(self) -> None:
        self._drop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> GroupFeed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
