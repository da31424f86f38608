"""Encoded prompts kept between epochs, up to a memory budget.

A training example's prompt (its question, options and picture) is the same at every epoch and stage; only the latent
slots and the target after it change. Encoding it (chat template, tokenizer, the image processor's resize and
normalisation) is about a quarter of a tiny model's training step on a CPU, so the collator keeps what it encoded
and reuses it: the same tensors, so the batches are bit-identical to encoding again.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import torch

#: Default budget of one collator's cache (per process): the demo's 2,000 pictures at 112 px take about 600 MiB.
DEFAULT_CACHE_BYTES = 1 << 30

T = TypeVar("T")


class PromptCache(Generic[T]):
    """Least-recently-used entries whose tensors and token lists fit ``max_bytes``; ``max_bytes=0`` keeps nothing."""

    def __init__(self, max_bytes: int, size_of: Callable[[T], int]):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self._size_of = max_bytes, size_of
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The entry under ``key``, made (and kept if it fits) on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]
        self.misses += 1
        value = make()
        size = self._size_of(value)
        if size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
            self._entries[key] = (value, size)
            self.bytes += size
        return value


def tensor_bytes(tensors: list[torch.Tensor], token_count: int) -> int:
    """Memory of an encoded prompt: its tensors' storage plus its Python token lists (about 8 bytes a token)."""
    return sum(t.numel() * t.element_size() for t in tensors) + 8 * token_count
