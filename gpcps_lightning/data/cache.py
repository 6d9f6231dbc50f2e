"""An in-memory cache of decoded, resized uint8 arrays that DataLoader workers share.

Decoding and resizing JPEGs is the loader's main cost. The cache is one preallocated uint8 buffer
(sized from the item shapes known at setup) plus a "filled" flag per item. With DataLoader workers it
lives in shared memory, so an item decoded by any worker in any epoch is reused by every worker
afterwards, and workers need not be persistent; without workers it is ordinary memory.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["SharedUInt8Cache"]


class SharedUInt8Cache:
    """Fixed-capacity cache of uint8 tensors with per-item shapes known in advance.

    Args:
        shapes: Shape of each item (all items of one cache may differ in shape).
        shared: Allocate in shared memory (needed when DataLoader workers fill it).
        what: How to name the cache in error messages.

    Raises:
        MemoryError: If shared memory (``/dev/shm``) is too small for the cache.
    """

    def __init__(self, shapes: Sequence[tuple[int, ...]], shared: bool, what: str = "cache") -> None:
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        nbytes = int(self.offsets[-1]) + len(self.shapes)
        if shared:
            _check_shared_memory(nbytes, what)
        self.buffer = torch.empty(int(self.offsets[-1]), dtype=torch.uint8)
        self.filled = torch.zeros(len(self.shapes), dtype=torch.uint8)
        if shared:
            self.buffer.share_memory_()
            self.filled.share_memory_()

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return int(self.buffer.numel() + self.filled.numel())

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, i: int) -> Tensor | None:
        """Item ``i`` (a view into the cache: clone it before changing it), or ``None`` if not cached yet."""
        if not bool(self.filled[i]):
            return None
        return self.buffer[int(self.offsets[i]) : int(self.offsets[i + 1])].view(self.shapes[i])

    def put(self, i: int, value: Tensor) -> None:
        """Store item ``i``.

        Raises:
            ValueError: If ``value`` does not have the item's shape or is not uint8.
        """
        if tuple(value.shape) != self.shapes[i] or value.dtype != torch.uint8:
            raise ValueError(
                f"Cache item {i} must be uint8 of shape {self.shapes[i]}, "
                f"got {value.dtype} {tuple(value.shape)}."
            )
        self.buffer[int(self.offsets[i]) : int(self.offsets[i + 1])].copy_(value.reshape(-1))
        self.filled[i] = 1  # written after the data, so a reader never sees a half-written item as filled


def _check_shared_memory(nbytes: int, what: str) -> None:
    """Refuse (clearly) a shared-memory cache larger than the free space of /dev/shm (Linux)."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/dev/shm"):
        return
    stat = os.statvfs("/dev/shm")
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise MemoryError(
            f"cache=True needs {nbytes / 2**20:.0f} MiB of shared memory for the {what}, but /dev/shm has "
            f"only {free / 2**20:.0f} MiB free. Enlarge it (Docker: --shm-size=2g or --ipc=host), use "
            "num_workers=0 (the cache then lives in ordinary memory), a smaller image_size, or cache=False."
        )
