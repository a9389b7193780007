"""The group feed: the next accumulation group collated on a background thread, used only if it is
exactly the group the loop asks for; the loop's group order across epochs."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from qwen_ft.train import loop
from qwen_ft.train.feed import GroupFeed


def collate_group(group):
    return [{"input_ids": torch.tensor(rows), "thread": threading.current_thread().name} for rows in group]


def test_prepared_group_is_collated_on_the_feed_thread_and_used():
    with GroupFeed(collate_group, torch.device("cpu")) as feed:
        feed.prepare([[1, 2], [3]])
        got = feed.take([[1, 2], [3]])
        assert (feed.prepared, feed.used) == (1, 1)
    assert [b["input_ids"].tolist() for b in got] == [[1, 2], [3]]
    assert all(b["thread"].startswith("qwen-ft-feed") for b in got)


def test_a_different_group_is_collated_on_the_spot():
    with GroupFeed(collate_group, torch.device("cpu")) as feed:
        feed.prepare([[1, 2]])
        got = feed.take([[1, 3]])
        assert feed.used == 0
        assert feed.take([[1, 2]])[0]["thread"] == threading.current_thread().name  # the prepared one was dropped
    assert got[0]["input_ids"].tolist() == [1, 3] and got[0]["thread"] == threading.current_thread().name


def test_an_error_in_the_thread_surfaces_in_take():
    def broken(group):
        raise ValueError(f"row {group[0][0]} is bad")

    with GroupFeed(broken, torch.device("cpu")) as feed:
        feed.prepare([[7]])
        with pytest.raises(ValueError, match="row 7 is bad"):
            feed.take([[7]])


def test_the_group_peeked_after_a_take_is_the_next_take_across_epochs():
    """As the loop does it: take a group, then peek at the one after it (which may plan the next epoch)."""
    planned = {e: [[e * 10 + i] for i in range(5)] for e in range(3)}  # 5 micro-batches per epoch
    tr = SimpleNamespace(epoch_batches=lambda e: planned[e], train=SimpleNamespace(grad_accum=2))
    state, cache, taken, peeked = SimpleNamespace(epoch=0, batch_offset=0), {}, [], []
    for _ in range(7):
        taken.append(loop.next_group(tr, state, cache))
        peeked.append(loop.group_at(tr, (state.epoch, state.batch_offset), cache)[0])
    assert peeked[:-1] == taken[1:]
    assert taken[:4] == [[[0], [1]], [[2], [3]], [[4]], [[10], [11]]]  # an epoch's last group may be short
    assert (state.epoch, state.batch_offset) == (2, 2) and set(cache) == {2}
