"""Parquet written in large row groups on a background thread, and the concatenation of Parquet parts."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routelab.io.files import atomic_path


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
        temporaries, slowed every later tensor op (benchmarks/README.md). Small batches are copied
        together, ``_COPY_EVERY`` at a time (a copy has a fixed cost per column and buffer), so a batch
        must not be changed after it is appended."""
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


def concat_parquet(sources: Sequence[str | os.PathLike], dest: str | os.PathLike,
                   row_group_size: int = 1 << 20) -> None:
    """Concatenate Parquet files with one schema, in order, into ``dest`` (atomically, streaming by batch).

    One source (an unsharded route job without intermediate checkpoints) is taken as it is, hard-linked
    (or copied where linking fails) instead of decoded and re-encoded: for an OLMoE-sized run that is
    hundreds of MB of routing log not written twice.
    """
    import shutil

    import pyarrow.parquet as pq

    if not sources:
        raise ValueError("concat_parquet: no source files")
    schema = pq.read_schema(sources[0])  # also: a readable Parquet footer
    if len(sources) == 1:
        with atomic_path(dest) as tmp:
            try:
                os.link(sources[0], tmp)
            except OSError:
                shutil.copyfile(sources[0], tmp)
        return
    with atomic_path(dest) as tmp:
        writer = BatchedParquetWriter(tmp, schema, row_group_size)
        for source in sources:
            part = pq.ParquetFile(source)
            if not part.schema_arrow.equals(schema):
                raise ValueError(f"{source}: schema differs from {sources[0]}'s; parts of one run share one schema")
            for batch in part.iter_batches(batch_size=1 << 16):
                writer.append(batch)
        writer.close()
