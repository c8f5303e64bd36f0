"""Atomic file output: every artifact appears complete or not at all."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for directories (``save_pretrained`` targets): the temporary path lies in the
    same directory, so the final rename is atomic on POSIX file systems.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to the temporary path for {path}")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically. NaN is written as ``null``."""
    text = json.dumps(_replace_nan(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def _replace_nan(value: Any) -> Any:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, np.floating) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _replace_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_nan(v) for v in value]
    return value


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, table: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame or pyarrow Table to Parquet (zstd), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


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

    One allocation per batch from Arrow's pool cost ~90 µs on average (rare multi-millisecond stalls
    when the allocator maps a new segment), and fresh memory costs a page fault per 4 KiB on first
    touch (~2.5 µs each on the development machine); here a batch is a slice of a chunk, and once the
    first row groups are written a long run keeps writing into memory that is already mapped. A chunk's
    pages are faulted in when it is mapped, so a short run (or a benchmark) whose batches fit the first
    chunk, mapped with the first batch, sees no page faults after it.
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
            # all pages faulted in by the kernel in one call (~30 % cheaper than a fault per page on first touch)
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


class BatchedParquetWriter:
    """Parquet (zstd) written in large row groups from many small record batches, on a background thread.

    :meth:`append` collects batches until ``row_group_size`` rows have arrived, then hands them to a
    writer thread that builds, compresses and writes the row group while the caller goes on (pyarrow
    releases the GIL); the thread is woken once per row group, not per batch. At most ``max_queued``
    row groups wait, so a slow disk slows the producer instead of filling memory. An error on the
    thread is raised by the next :meth:`append` or by :meth:`close`. The file is written under a
    temporary name and renamed onto ``path`` by a successful :meth:`close`, so ``path`` never holds a
    partial file; the row groups, and so the file's content, do not depend on the thread's timing.
    ``parquet_options`` go to ``pyarrow.parquet.ParquetWriter`` (compression defaults to zstd).
    """

    _DONE = object()
    _COPY_EVERY = 64

    def __init__(self, path: str | os.PathLike, schema: Any, row_group_size: int, max_queued: int = 2,
                 **parquet_options: Any):
        import queue
        import threading

        import pyarrow.parquet as pq

        self.path = Path(path)
        self.schema, self.row_group_size = schema, row_group_size
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{id(self):x}.partial")
        self._writer = pq.ParquetWriter(str(self._tmp), schema, **{"compression": "zstd", **parquet_options})
        self._pending: list = []  # batches of the next row group, in order
        self._uncopied: list = []  # record batches not yet copied (they follow _pending)
        self._pending_rows = 0
        self._queue: Any = queue.Queue(maxsize=max_queued)
        self._error: BaseException | None = None
        self.encode_seconds = 0.0  # CPU time the writer thread spent building, compressing and writing
        self._thread = threading.Thread(target=self._work, name=f"parquet-writer:{self.path.name}", daemon=True)
        self._thread.start()

    def append(self, batch: Any) -> None:
        """Add one ``pyarrow.RecordBatch`` (with :attr:`schema`); blocks while ``max_queued`` row groups wait.

        ``batch`` may also be any object with ``num_rows`` and a ``to_batch()`` method returning the
        record batch: the writer thread calls it, just before the row group is written (a compact form
        is cheaper to keep, and the expansion leaves the caller's thread); such objects are kept as given,
        and consecutive ones whose type has a static ``batch_of(list)`` are built by one call of it.

        Record batches are kept as copies in Arrow's memory pool: a batch built from numpy arrays shares
        their memory, and thousands of such long-lived blocks on the C heap, between the model's large
        temporaries, slowed every later tensor op (measured: the recorder's statistics 4x slower by the
        end of a row group). Small batches are copied together, ``_COPY_EVERY`` at a time (a copy has a
        fixed cost per column and buffer), so a batch must not be changed after it is appended."""
        self._raise_pending()
        if self._writer is None:
            raise RuntimeError(f"{self.path}: append after close")
        if hasattr(batch, "to_batch"):
            self._copy_uncopied()  # keeps the order of the batches
            self._pending.append(batch)
        else:
            self._uncopied.append(batch)
        self._pending_rows += batch.num_rows
        if len(self._uncopied) >= self._COPY_EVERY or self._pending_rows >= self.row_group_size:
            self._copy_uncopied()
        if self._pending_rows >= self.row_group_size:
            self._queue.put(self._pending)
            self._pending, self._pending_rows = [], 0

    def _copy_uncopied(self) -> None:
        """Move the batches kept by reference into :attr:`_pending` as one copy in Arrow's pool."""
        if self._uncopied:
            import pyarrow as pa

            try:
                copied = pa.concat_batches(self._uncopied)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:  # e.g. a batch with another schema
                self._discard()
                raise RuntimeError(f"writing {self.path} failed: {error}") from error
            self._pending.append(copied)
            self._uncopied = []

    def _work(self) -> None:
        import pyarrow as pa

        while True:
            batches = self._queue.get()
            if batches is self._DONE:
                return
            if self._error is not None:  # after a failure: drain, so the producer never blocks on put
                continue
            start = time.thread_time()
            try:
                batches = _expand(batches)
                self._writer.write_table(pa.Table.from_batches(batches, schema=self.schema),
                                         row_group_size=self.row_group_size)
            except BaseException as exc:  # handed to the caller's thread by _raise_pending
                self._error = exc
            batches = None  # written: let their memory go now, not when the next row group arrives
            self.encode_seconds += time.thread_time() - start

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, _AlreadyRaised()
            self._discard()
            raise RuntimeError(f"writing {self.path} failed: {error}") from error

    def _stop(self) -> None:
        self._queue.put(self._DONE)
        self._thread.join()

    def _discard(self) -> None:
        if self._writer is not None:
            self._stop()
            self._writer.close()
            self._writer = None
        self._pending, self._uncopied = [], []
        self._tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Write what is left, wait for the thread, then rename the file onto ``path``."""
        if self._writer is None:
            return
        self._copy_uncopied()
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []
        self._stop()
        self._raise_pending()
        self._writer.close()
        self._writer = None
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        """Stop without producing ``path`` (e.g. the run failed): the temporary file is removed."""
        self._error = self._error or _AlreadyRaised()
        self._discard()


def _expand(batches: list) -> list:
    """Record batches from a row group's pending batches, in order: compact batches of a type with a
    ``batch_of(list)`` static method are built together, one record batch per run of them; others by
    their own ``to_batch()``; record batches are kept."""
    out = []
    for kind, run in itertools.groupby(batches, key=type):
        run = list(run)
        if hasattr(kind, "batch_of"):
            out.append(kind.batch_of(run))
        else:
            out.extend(b.to_batch() if hasattr(b, "to_batch") else b for b in run)
    return out


class _AlreadyRaised(Exception):
    """Marks a writer whose thread's error was already raised (or that was aborted)."""
