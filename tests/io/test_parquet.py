"""The background Parquet writer and the host memory arena the recorders keep batches in."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest


def _int_batch(values, name="x"):
    import pyarrow as pa

    return pa.RecordBatch.from_pydict({name: pa.array(values, pa.int32())})


class _Compact:
    """A compact pending batch as the recorders append: expanded by the writer thread via to_batch()."""

    def __init__(self, values):
        self.values, self.num_rows, self.built_on = values, len(values), None

    def to_batch(self):
        import threading

        self.built_on = threading.current_thread()
        return _int_batch(self.values)


def _address(array):
    return array.__array_interface__["data"][0]


def test_batched_writer_row_groups_and_content(tmp_path):
    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=8)
    sizes, start = [5, 7, 3, 10, 1], 0
    for i, size in enumerate(sizes):
        # record batches (copied later, in groups) and compact batches: the order is the order of appends
        values = list(range(start, start + size))
        writer.append(_int_batch(values) if i % 2 == 0 else _Compact(values))
        start += size
    assert not path.exists(), "the file appears only when complete"
    writer.close()
    # Batches gather until >= 8 rows, then go out in row groups of at most 8:
    # 5+7 = 12 -> 8, 4; 3+10 = 13 -> 8, 5; the last 1 at close.
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [8, 4, 8, 5, 1]
    assert pq.read_table(path)["x"].to_pylist() == list(range(26))
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"], "no temporary file left"


def test_batched_writer_copies_many_small_batches_in_groups_in_order(tmp_path, monkeypatch):
    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    monkeypatch.setattr(BatchedParquetWriter, "_COPY_EVERY", 3)
    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=10)
    for start in range(0, 40, 2):
        writer.append(_int_batch([start, start + 1]) if start % 14 else _Compact([start, start + 1]))
        assert len(writer._uncopied) < 3
    writer.close()
    assert pq.read_table(path)["x"].to_pylist() == list(range(40))
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [10] * 4


def test_batched_writer_expands_compact_batches_on_its_thread_in_order(tmp_path):
    """Objects with num_rows and to_batch() (the recorders' compact pending rows) are expanded by the
    writer thread when their row group is written, in the order of appends, between ordinary batches."""
    import threading

    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=4)
    compact = [_Compact([0, 1, 2]), _Compact([5, 6])]
    writer.append(compact[0])
    assert compact[0].built_on is None, "kept compact until its row group is written"
    writer.append(_int_batch([3, 4]))  # 5 rows: the row group goes to the thread
    writer.append(compact[1])
    writer.append(_int_batch([7]))
    writer.close()
    assert pq.read_table(path)["x"].to_pylist() == list(range(8))
    assert all(item.built_on not in (None, threading.main_thread()) for item in compact)


def test_buffer_arena_reuses_a_chunk_only_once_nothing_refers_to_it():
    from routelab.io.arena import BufferArena

    arena = BufferArena(chunk_bytes=4096)
    first, second = arena.take(1000), arena.take(1000)
    assert _address(second) - _address(first) == 1024 and second.size == 1000  # 64-byte aligned slices
    first[:], second[:] = 1, 2
    third = arena.take(3000)  # does not fit the first chunk: a second one
    assert arena.mapped_bytes == 8192 and (first == 1).all() and (second == 2).all()
    start = _address(first)
    del first
    kept = arena.take(3000)  # the first chunk still has a live slice, the second is in use: a third
    assert arena.mapped_bytes == 3 * 4096 and _address(kept) != start
    del second, third
    reused = arena.take(3000)  # no slice of the first chunk is alive any more: it is reused
    assert arena.mapped_bytes == 3 * 4096 and _address(reused) == start
    big = arena.take(10000)  # larger than a chunk: a chunk of its own (10000 rounded up to 64 bytes)
    assert big.size == 10000 and arena.mapped_bytes == 3 * 4096 + 10048


def test_batched_writer_lets_written_batches_memory_be_reused(tmp_path):
    """Compact batches living in arena memory: once their row group is written nothing refers to them,
    so a long run keeps writing into the same few chunks."""
    import pyarrow as pa

    from routelab.io.arena import BufferArena
    from routelab.io.parquet import BatchedParquetWriter

    class Held:
        def __init__(self, arena, values):
            raw = arena.take(4 * len(values))
            raw.view(np.int32)[:] = values
            self.buffer, self.num_rows = pa.py_buffer(raw), len(values)

        def to_batch(self):
            return pa.RecordBatch.from_arrays([pa.Array.from_buffers(pa.int32(), self.num_rows, [None, self.buffer])],
                                              names=["x"])

    arena = BufferArena(chunk_bytes=1 << 16)
    writer = BatchedParquetWriter(tmp_path / "x.parquet", pa.schema([("x", pa.int32())]), row_group_size=4096)
    for start in range(0, 200 * 1024, 1024):  # 50 row groups of 4096 rows, 800 KB in all
        writer.append(Held(arena, np.arange(start, start + 1024)))
    writer.close()
    assert pq.read_table(tmp_path / "x.parquet")["x"].to_numpy().tolist() == list(range(200 * 1024))
    assert arena.mapped_bytes <= 8 * (1 << 16), arena.mapped_bytes  # at most a few row groups' worth


def test_batched_writer_builds_runs_of_combinable_batches_together_in_order(tmp_path):
    from routelab.io.parquet import BatchedParquetWriter

    class Combined(_Compact):
        calls = []

        @staticmethod
        def batch_of(items):
            Combined.calls.append(len(items))
            return _int_batch([v for item in items for v in item.values])

    writer = BatchedParquetWriter(tmp_path / "x.parquet", _int_batch([0]).schema, row_group_size=100)
    for part in ([1, 2], [3], [4, 5]):
        writer.append(Combined(part))
    writer.append(_Compact([6]))
    writer.append(_int_batch([7]))
    for part in ([8], [9, 10]):
        writer.append(Combined(part))
    writer.close()
    assert pq.read_table(tmp_path / "x.parquet")["x"].to_pylist() == list(range(1, 11))
    assert Combined.calls == [3, 2]  # one call per run of them


def test_batched_writer_batch_of_another_schema_fails_cleanly(tmp_path):
    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=100)
    writer.append(_int_batch([1, 2]))
    writer.append(_int_batch([3], name="wrong"))
    with pytest.raises(RuntimeError, match=f"writing {path} failed"):
        writer.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_batched_writer_error_on_thread_reaches_the_caller(tmp_path):
    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=4)
    writer.append(_int_batch([1, 2, 3, 4, 5], name="wrong"))  # fails on the thread when written
    with pytest.raises(RuntimeError, match=f"writing {path} failed"):
        for _ in range(100):  # raised by a later append at the latest by close
            writer.append(_int_batch([1]))
        writer.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_batched_writer_abort_leaves_nothing(tmp_path):
    import pyarrow as pa

    from routelab.io.parquet import BatchedParquetWriter

    writer = BatchedParquetWriter(tmp_path / "out.parquet", pa.schema([("x", pa.int32())]), row_group_size=4)
    writer.append(_int_batch([1, 2]))
    writer.abort()
    writer.close()  # a no-op after abort
    assert list(tmp_path.iterdir()) == []
