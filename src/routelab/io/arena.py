"""Host memory for the recorders' batches until their row group is written: one buffer per batch,
carved from large reused chunks, filled by one torch op."""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np


def arrow_backed(dtype: Any, size: int) -> tuple[Any, np.ndarray]:
    """A new buffer of ``size`` values of numpy ``dtype`` in Arrow's memory pool and a writable numpy view
    of it: columns filled with numpy and handed to Arrow without a copy (the writer thread's expansions),
    off the C heap (long-lived numpy blocks there, between a model's large temporaries, slow its later
    tensor ops)."""
    import pyarrow as pa

    buffer = pa.allocate_buffer(size * np.dtype(dtype).itemsize)
    return buffer, np.frombuffer(buffer, dtype=dtype)


class BufferArena:
    """Host memory for batches kept until their row group is written, carved from a few large chunks
    (anonymous memory maps, off the C heap) that are reused once no batch refers to them.

    An allocation per batch from Arrow's pool, and the page faults of fresh memory on first touch, cost
    more than the statistics of a batch (see benchmarks/README.md); here a batch is a slice of a chunk,
    and once the first row groups are written a long run keeps writing into memory that is already
    mapped. A chunk's pages are faulted in when it is mapped, so a short run (or a benchmark) whose
    batches fit the first chunk sees no page faults after it.
    """

    def __init__(self, chunk_bytes: int = 8 << 20):
        self.chunk_bytes = int(chunk_bytes)  # mapped with MAP_POPULATE (where there is one): faulted in at once
        self._chunks: list[tuple[np.ndarray, list]] = []  # (memory, weak references to its live slices)
        self._current: tuple[np.ndarray, list] | None = None
        self._used = 0

    def take(self, nbytes: int) -> np.ndarray:
        """A writable uint8 array of ``nbytes`` bytes, 64-byte aligned, valid while it (or a view of it,
        or an Arrow buffer made from it) is alive; nothing else is handed out over it until then."""
        size = max(64, -(-nbytes // 64) * 64)
        if self._current is None or self._used + size > self._current[0].size:
            self._current, self._used = self._free_chunk(size), 0
        memory, slices = self._current
        view = memory[self._used: self._used + nbytes]
        slices.append(weakref.ref(view))
        self._used += size
        return view

    def _free_chunk(self, size: int) -> tuple[np.ndarray, list]:
        for chunk in self._chunks:
            memory, slices = chunk
            if memory.size >= size and chunk is not self._current and all(ref() is None for ref in slices):
                slices.clear()
                return chunk
        import mmap

        size = max(size, self.chunk_bytes)
        if hasattr(mmap, "MAP_ANONYMOUS"):
            # all pages faulted in by the kernel in one call, cheaper than a fault per page on first touch
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            memory = mmap.mmap(-1, size, flags=flags)
        else:  # Windows: anonymous memory without flags
            memory = mmap.mmap(-1, size)
        chunk = (np.frombuffer(memory, dtype=np.uint8), [])
        self._chunks.append(chunk)
        return chunk

    @property
    def mapped_bytes(self) -> int:
        """Bytes of all chunks mapped so far."""
        return sum(memory.size for memory, _ in self._chunks)


def pack_for_writer(parts: Sequence[Any], arena: BufferArena) -> tuple[Any, list[int]]:
    """Copy tensors (any device and dtype, each contiguous) back to back into one host buffer taken from
    ``arena``, with a single torch op: a ``cat`` into it on CPU, one device-to-host copy otherwise.
    Returns it as a ``pyarrow.Buffer`` and each part's byte offset in it. Put parts with 4-byte values
    before 2-byte ones so that every part is aligned to its type.

    The recorders keep each batch so until its row group is written: one op, where a ``.numpy()`` per
    tensor costs four calls into torch and a copy per part would cost another."""
    import pyarrow as pa
    import torch

    views = [part.reshape(-1).view(torch.uint8) for part in parts]
    offsets = list(itertools.accumulate((view.numel() for view in views), initial=0))
    raw = arena.take(offsets[-1])
    host = torch.from_numpy(raw)
    if all(view.device.type == "cpu" for view in views):
        torch.cat(views, out=host)
    else:
        host.copy_(torch.cat(views))
    return pa.py_buffer(raw), offsets[:-1]
