"""A training DataLoader that resumes mid-epoch exactly where a checkpoint left it.

Lightning saves ``state_dict()`` of every training dataloader that has one into the checkpoint and calls
``load_state_dict()`` before iterating again (its "stateful dataloader" support). Here the state is two numbers:
the epoch and how many of its batches were trained on. The order of an epoch depends only on ``(seed, epoch)``
(:class:`EpochSampler`), so on resume the loader rebuilds that order and skips the trained batches by index,
without loading their images: no sample of the interrupted epoch is repeated or skipped.

Under DDP, Lightning wraps :class:`EpochSampler` in its ``DistributedSamplerWrapper`` (forwarding ``set_epoch``),
each rank takes its slice of the same order, and the skip applies to each rank's own batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Indices in an order fixed by ``(seed, epoch)``: a fresh random permutation each epoch, reproducible.

    Args:
        size: number of samples.
        shuffle: permute (else 0..size-1).
        seed: base seed; epoch ``e`` uses ``seed + e`` (as ``DistributedSampler`` does).
    """

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class _SkipFirstBatches:
    """The DataLoader's batch sampler, minus the first ``skip`` batches of the next pass (one-shot)."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.skip = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        # A generator, so the skip is taken by the pass that yields the first batch: a multi-worker DataLoader
        # iterator calls iter() twice when it is built (in __init__, then in _reset) and only advances the second.
        skip, self.skip = self.skip, 0
        yield from islice(iter(self.batches), skip, None)


def _epoch_samplers(loader: DataLoader) -> list[Any]:
    """The loader's samplers that take ``set_epoch`` (the sampler, its distributed wrapper's inner one)."""
    found = []
    for sampler in (loader.sampler, getattr(loader.batch_sampler, "sampler", None)):
        if sampler is not None and hasattr(sampler, "set_epoch") and sampler not in found:
            found.append(sampler)
    return found


class ResumableDataLoader(DataLoader):
    """A map-style DataLoader with Lightning's ``state_dict`` / ``load_state_dict`` protocol.

    Args:
        *args: DataLoader's arguments; give ``sampler=EpochSampler(...)`` so an epoch's order can be rebuilt.
        position: returns how many batches of the current epoch have been trained on (the data module reads it
            from the trainer's progress, which already accounts for the batch Lightning prefetches).
        **kwargs: DataLoader's keyword arguments.
    """

    def __init__(self, *args: Any, position: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position = position
        self._skipper: _SkipFirstBatches | None = None

    @property
    def _index_sampler(self) -> Any:  # what DataLoader iterators draw indices (or index batches) from
        if self._skipper is None:
            self._skipper = _SkipFirstBatches(super()._index_sampler)
        return self._skipper

    def _epoch(self) -> int:
        samplers = _epoch_samplers(self)
        return int(getattr(samplers[0], "epoch", 0)) if samplers else 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch(), "batches": int(self.position()) if self.position is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        for sampler in _epoch_samplers(self):
            sampler.set_epoch(epoch)
        # The Lightning fit loop draws its first batch before it calls set_epoch again for the resumed epoch, so
        # the epoch is set here and the skip happens at the next pass over the batch sampler.
        self._index_sampler.skip = batches


__all__ = ["EpochSampler", "ResumableDataLoader"]
