"""Routing records: summary reductions on a hand-made histogram, Parquet rows from a real run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import false_discovery_control

from conftest import load_tiny
from routelab.evaluate import score_windows
from routelab.nulls import fit_kde_null
from routelab.patching import install_router
from routelab.decisions import DecisionSampler
from routelab.recording import SCHEMA, RecorderGroup, RoutingRecorder, every_nth_real_token, routing_summary
from routelab.routers import BHRouter, Selection, TopKRouter

# --- routing_summary on a hand-made histogram ----------------------------------------------------

# 4 experts (histogram columns k = 0..4), min_k 1, max_k 3.
#   layer 0: k = 1, 1, 2, 3      -> [0, 2, 1, 1, 0]
#   layer 1: k = 2, 2, 2, 3      -> [0, 0, 3, 1, 0]
#   overall: k = 1,1,2,2,2,2,3,3 -> [0, 2, 4, 2, 0]
K_HIST = np.array([[0, 2, 1, 1, 0], [0, 0, 3, 1, 0]])
EXPERT_COUNTS = np.array([[3, 2, 1, 1], [4, 3, 2, 0]])
# p moments: p over all experts = 0.1, 0.2, 0.3, 0.4; selected p = 0.1, 0.2
#   [sum p, sum p^2, count, sum selected p, count selected] = [1.0, 0.3, 4, 0.3, 2]
P_MOMENTS = np.array([1.0, 0.3, 4.0, 0.3, 2.0])


def test_routing_summary_hand_worked():
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3, p_moments=P_MOMENTS)
    assert summary["total_decisions"] == 8
    # mean = (2*1 + 4*2 + 2*3) / 8 = 2; var = (2*1 + 4*0 + 2*1) / 8 = 0.5 -> std 0.70710678
    assert summary["experts_mean"] == pytest.approx(2.0)
    assert summary["experts_std"] == pytest.approx(0.70710678, rel=1e-8)
    assert summary["experts_median"] == 2
    assert (summary["experts_min"], summary["experts_max"]) == (1, 3)
    # 2 of 8 decisions at max_k = 3 and 2 of 8 at min_k = 1: 25 % each.
    assert summary["ceiling_hit_rate"] == pytest.approx(25.0)
    assert summary["floor_hit_rate"] == pytest.approx(25.0)
    assert (summary["min_k"], summary["max_k"]) == (1, 3)
    # p: mean 1.0 / 4 = 0.25; var = 0.3 / 4 - 0.25^2 = 0.0125 -> std 0.11180340; selected mean 0.3 / 2 = 0.15
    assert summary["pvalue_mean"] == pytest.approx(0.25)
    assert summary["pvalue_std"] == pytest.approx(0.11180340, rel=1e-7)
    assert summary["selected_pvalue_mean"] == pytest.approx(0.15)
    assert summary["k_histogram"] == {"1": 2, "2": 4, "3": 2}
    assert summary["expert_counts"] == EXPERT_COUNTS.tolist()

    layer0, layer1 = summary["per_layer"]
    # layer 0: k = 1, 1, 2, 3: mean 7/4 = 1.75; var = (0.5625*2 + 0.0625 + 1.5625) / 4 = 0.6875 -> 0.82915620
    assert layer0["layer"] == 0 and layer0["decisions"] == 4
    assert layer0["experts_mean"] == pytest.approx(1.75)
    assert layer0["experts_std"] == pytest.approx(0.82915620, rel=1e-8)
    assert (layer0["ceiling_hit_rate"], layer0["floor_hit_rate"]) == pytest.approx((25.0, 50.0))
    # layer 1: k = 2, 2, 2, 3: mean 2.25; var = (3*0.0625 + 0.5625) / 4 = 0.1875 -> 0.43301270; floor 0 %
    assert layer1["experts_mean"] == pytest.approx(2.25)
    assert layer1["experts_std"] == pytest.approx(0.43301270, rel=1e-8)
    assert (layer1["ceiling_hit_rate"], layer1["floor_hit_rate"]) == pytest.approx((25.0, 0.0))
    assert (layer1["experts_min"], layer1["experts_max"]) == (2, 3)


def test_routing_summary_median_is_the_lower_median():
    # Layer 0's k values 1, 1, 2, 3 have an even count: the median reported is a k that occurred (the
    # lower median, numpy's inverted-CDF percentile), not the midpoint 1.5.
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3)
    assert summary["per_layer"][0]["experts_median"] == np.percentile([1, 1, 2, 3], 50, method="inverted_cdf") == 1
    assert summary["per_layer"][1]["experts_median"] == 2


def test_routing_summary_without_pvalues():
    summary = routing_summary(K_HIST, EXPERT_COUNTS, min_k=1, max_k=3, p_moments=None)
    assert summary["pvalue_mean"] is None and summary["pvalue_std"] is None and summary["selected_pvalue_mean"] is None


# --- RoutingRecorder on a real run ---------------------------------------------------------------

NUM_EXPERTS, NUM_LAYERS = 8, 2
ALPHA, MIN_K, MAX_K = 0.2, 1, 6
PVALUE_EVERY = 4


@pytest.fixture(scope="module")
def run(tiny_olmoe_dir, tmp_path_factory):
    """Score 5 windows of unequal length (so batches are padded) through a BH router with a recorder."""
    model = load_tiny(tiny_olmoe_dir, "grouped_mm")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        calibration = model(input_ids=torch.randint(2, 128, (8, 32), generator=gen), output_router_logits=True)
    null = fit_kde_null([r.numpy() for r in calibration.router_logits], NUM_EXPERTS, grid_size=512)
    router = BHRouter(NUM_EXPERTS, null, alpha=ALPHA, min_k=MIN_K, max_k=MAX_K)

    lengths = [12, 7, 12, 3, 9]
    inputs = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in lengths]
    windows = pd.DataFrame({"window_id": range(5), "doc_id": [0, 0, 1, 2, 2], "input_ids": inputs,
                            "labels": [row[1:] + [5] for row in inputs]})
    path = tmp_path_factory.mktemp("recording") / "routing.parquet"
    recorder = RoutingRecorder(NUM_LAYERS, NUM_EXPERTS, MIN_K, MAX_K, path=path, row_group_size=16)
    sampled = RoutingRecorder(NUM_LAYERS, NUM_EXPERTS, MIN_K, MAX_K, pvalue_every=PVALUE_EVERY)
    both = RecorderGroup(recorder, sampled)
    with install_router(model, router, recorder=both):
        score_windows(model, windows, batch_size=2, pad_token_id=1, recorder=both, progress=False)
        # Router logits of every window alone (no padding), under the same routing, for the reference.
        with torch.no_grad():
            logits = [model(input_ids=torch.tensor([row]), output_router_logits=True).router_logits
                      for row in inputs]
    recorder.close()
    return {"windows": windows, "table": pq.read_table(path), "df": pd.read_parquet(path),
            "summary": recorder.summary(), "null": null, "router_logits": logits,
            "sampled_summary": sampled.summary()}


def test_recorder_writes_one_row_per_real_token_and_layer(run):
    windows, df, table = run["windows"], run["df"], run["table"]
    assert table.schema.equals(SCHEMA)
    real_tokens = sum(len(row) for row in windows["input_ids"])  # padding excluded
    assert len(df) == real_tokens * NUM_LAYERS
    assert sorted(df["layer"].unique()) == [0, 1]
    for window in windows.itertuples():
        rows = df[df["window_id"] == window.window_id]
        assert (rows["doc_id"] == window.doc_id).all()
        for layer in range(NUM_LAYERS):
            layer_rows = rows[rows["layer"] == layer].sort_values("position")
            assert layer_rows["position"].tolist() == list(range(len(window.input_ids)))
            assert layer_rows["token_id"].tolist() == window.input_ids


def test_recorded_experts_are_valid(run):
    df = run["df"]
    assert (df["experts"].map(len) == df["k"]).all()
    assert (df["weights"].map(len) == df["k"]).all()
    assert df["k"].between(MIN_K, MAX_K).all()
    for experts, weights in zip(df["experts"], df["weights"]):
        assert len(set(experts)) == len(experts) and all(0 <= e < NUM_EXPERTS for e in experts)
        assert all(w > 0 for w in weights)
    assert df["k"].nunique() >= 3, "the run should exercise variable k"


def test_recorded_summary_matches_parquet(run):
    df, summary = run["df"], run["summary"]
    counts = df["k"].value_counts()
    assert summary["k_histogram"] == {str(k): int(c) for k, c in sorted(counts.items())}
    assert summary["total_decisions"] == len(df)
    assert summary["experts_mean"] == pytest.approx(df["k"].mean())
    assert summary["experts_std"] == pytest.approx(df["k"].std(ddof=0))
    assert summary["ceiling_hit_rate"] == pytest.approx(100 * (df["k"] == MAX_K).mean())
    assert summary["floor_hit_rate"] == pytest.approx(100 * (df["k"] == MIN_K).mean())
    for layer in range(NUM_LAYERS):
        rows = df[df["layer"] == layer]
        assert summary["per_layer"][layer]["experts_mean"] == pytest.approx(rows["k"].mean())
        expert_counts = np.bincount(np.concatenate(rows["experts"].to_numpy()), minlength=NUM_EXPERTS)
        assert summary["expert_counts"][layer] == expert_counts.tolist()


def test_recorded_decisions_match_reference_bh(run):
    """Recompute every decision from the router logits with numpy/scipy and compare with the Parquet rows."""
    df, null = run["df"].set_index(["window_id", "position", "layer"]), run["null"]
    all_p, chosen_p = [], []
    token_p = {}  # (window, position) -> (p of every layer, p of the selected experts)
    for window_id, per_layer in enumerate(run["router_logits"]):
        for layer, logits in enumerate(per_layer):
            logits = logits.double().numpy()
            p = np.clip(np.interp(logits, null.grid[layer], null.sf[layer]), null.min_pvalue, 1.0)
            k = np.clip((false_discovery_control(p, axis=-1, method="bh") <= ALPHA).sum(-1), MIN_K, MAX_K)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            for position in range(len(logits)):
                order = np.lexsort((-logits[position], p[position]))[: k[position]]
                row = df.loc[(window_id, position, layer)]
                assert row["k"] == k[position], (window_id, position, layer)
                assert list(row["experts"]) == order.tolist(), (window_id, position, layer)
                # OLMoE has norm_topk_prob False: weights are the raw softmax probabilities.
                np.testing.assert_allclose(row["weights"], probs[position, order], rtol=1e-4, atol=1e-6)
                chosen_p.extend(p[position, order])
                every, chosen = token_p.setdefault((window_id, position), ([], []))
                every.extend(p[position])
                chosen.extend(p[position, order])
            all_p.append(p.ravel())
    all_p = np.concatenate(all_p)
    summary = run["summary"]
    assert summary["pvalue_mean"] == pytest.approx(all_p.mean(), rel=1e-4)
    assert summary["pvalue_std"] == pytest.approx(all_p.std(), rel=1e-3)
    assert summary["selected_pvalue_mean"] == pytest.approx(np.mean(chosen_p), rel=1e-4)
    # pvalue_every = 4: the moments of every 4th real token in the order the windows were scored
    # (padding skipped), counted across batches; everything else as in the full summary.
    sample = [token_p[key] for key in sorted(token_p)][::PVALUE_EVERY]
    sampled_all = np.concatenate([every for every, _ in sample])
    sampled = run["sampled_summary"]
    assert sampled["pvalue_mean"] == pytest.approx(sampled_all.mean(), rel=1e-5)
    assert sampled["pvalue_std"] == pytest.approx(sampled_all.std(), rel=1e-4)
    assert sampled["selected_pvalue_mean"] == pytest.approx(np.mean(np.concatenate([c for _, c in sample])), rel=1e-5)
    assert sampled["pvalue_mean"] != pytest.approx(summary["pvalue_mean"], rel=1e-6)  # really a sample
    without_p = {key: value for key, value in sampled.items() if "pvalue" not in key}
    assert without_p == {key: value for key, value in summary.items() if "pvalue" not in key}


def test_recorder_without_pvalue_statistics_and_bad_pvalue_every():
    recorder = RoutingRecorder(1, 4, 1, 4, pvalue_every=0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    recorder.begin_batch(torch.ones(1, 1, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), torch.tensor([[3]]))
    recorder.record(0, logits, Selection(torch.tensor([[0, 4, 4, 4]]), torch.tensor([[0.6, 0, 0, 0]]),
                                         torch.tensor([1]), pvalues=lambda rows: 1 / 0))  # never computed
    recorder.end_batch()
    summary = recorder.summary()
    assert summary["pvalue_mean"] is None and summary["total_decisions"] == 1
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=rf"pvalue_every: {bad!r} is not valid; need an integer >= 0"):
            RoutingRecorder(1, 4, 1, 4, pvalue_every=bad)


def test_selection_pvalues_at_computes_only_the_rows_asked_for():
    table = torch.arange(12.0).view(4, 3) / 12
    asked = []

    def compute(rows):
        asked.append(None if rows is None else rows.tolist())
        return table if rows is None else table.index_select(0, rows)

    lazy = Selection(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), torch.ones(4, dtype=torch.long), compute)
    assert torch.equal(lazy.pvalues_at(torch.tensor([3, 1])), table[[3, 1]]) and asked == [[3, 1]]
    assert torch.equal(lazy.pvalues, table) and asked == [[3, 1], None]
    assert torch.equal(lazy.pvalues_at(torch.tensor([2])), table[[2]]) and len(asked) == 2  # all computed: indexed
    none = Selection(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), torch.ones(4, dtype=torch.long))
    assert none.pvalues_at(torch.tensor([0])) is None and none.pvalues is None


def test_recorder_ignores_calls_outside_a_batch():
    recorder = RoutingRecorder(1, 4, 1, 4)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        recorder.summary()
    selection = TopKRouter(4, 2)(torch.randn(3, 4))
    recorder.record(0, torch.randn(3, 4), selection)  # no begin_batch: nothing is counted
    with pytest.raises(RuntimeError):
        recorder.summary()
    recorder.begin_batch(torch.tensor([[1, 1, 0]]), torch.tensor([0]), torch.tensor([0]), torch.tensor([[5, 6, 1]]))
    recorder.record(0, torch.randn(3, 4), selection)
    recorder.end_batch()
    summary = recorder.summary()
    assert summary["total_decisions"] == 2  # the padded third token is not counted
    assert summary["k_histogram"] == {"2": 2}
    assert sum(summary["expert_counts"][0]) == 4


# --- the background Parquet writer ---------------------------------------------------------------

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


def test_batched_writer_row_groups_and_content(tmp_path):
    import pyarrow as pa

    from routelab.io import BatchedParquetWriter

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

    from routelab.io import BatchedParquetWriter

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

    from routelab.io import BatchedParquetWriter

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


def _address(array):
    return array.__array_interface__["data"][0]


def test_buffer_arena_reuses_a_chunk_only_once_nothing_refers_to_it():
    from routelab.io import BufferArena

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

    from routelab.io import BatchedParquetWriter, BufferArena

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
    from routelab.io import BatchedParquetWriter

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

    from routelab.io import BatchedParquetWriter

    path = tmp_path / "out.parquet"
    writer = BatchedParquetWriter(path, pa.schema([("x", pa.int32())]), row_group_size=100)
    writer.append(_int_batch([1, 2]))
    writer.append(_int_batch([3], name="wrong"))
    with pytest.raises(RuntimeError, match=f"writing {path} failed"):
        writer.close()
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_batched_writer_error_on_thread_reaches_the_caller(tmp_path):
    import pyarrow as pa

    from routelab.io import BatchedParquetWriter

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

    from routelab.io import BatchedParquetWriter

    writer = BatchedParquetWriter(tmp_path / "out.parquet", pa.schema([("x", pa.int32())]), row_group_size=4)
    writer.append(_int_batch([1, 2]))
    writer.abort()
    writer.close()  # a no-op after abort
    assert list(tmp_path.iterdir()) == []


def test_pvalue_moments_do_not_depend_on_how_many_layers_are_reduced_at_once(monkeypatch):
    """end_batch reduces the p-values [layers, tokens, E] in groups of layers to bound memory; any
    grouping gives the same summary."""
    import routelab.recording as recording

    gen = torch.Generator().manual_seed(5)
    logits = [torch.randn(12, NUM_EXPERTS, generator=gen) * 2 for _ in range(3)]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    router = BHRouter(NUM_EXPERTS, fit_kde_null([layer.numpy() for layer in logits], NUM_EXPERTS), alpha=0.5,
                      min_k=1, max_k=4)

    def summary():
        recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4, pvalue_every=1)
        recorder.begin_batch(mask, torch.tensor([0, 1]), torch.tensor([0, 1]), torch.ones(2, 6, dtype=torch.long))
        for layer, layer_logits in enumerate(logits):
            recorder.record(layer, layer_logits, router(layer_logits, layer))
        recorder.end_batch()
        return recorder.summary()

    together = summary()
    monkeypatch.setattr(recording, "_STATS_ELEMENTS", 1)  # one layer at a time
    apart = summary()
    assert together["total_decisions"] == apart["total_decisions"] == 30  # 10 real tokens x 3 layers
    assert together["pvalue_mean"] is not None
    for key in ("pvalue_mean", "pvalue_std", "selected_pvalue_mean"):
        assert together[key] == pytest.approx(apart[key], rel=1e-6), key
    for one, other in zip(together["per_layer"], apart["per_layer"]):
        assert one == pytest.approx(other)
    assert together["expert_counts"] == apart["expert_counts"] and together["top1_counts"] == apart["top1_counts"]


def test_layers_with_and_without_the_routers_top_expert_count_alike():
    """A batch where one layer's selection carries the router's top expert and another's does not (the
    recorder finds the top itself) counts top-1 experts as numpy's argmax does, in both layers."""
    gen = torch.Generator().manual_seed(9)
    logits = [torch.randn(10, NUM_EXPERTS, generator=gen) * 2 for _ in range(2)]
    selections = [TopKRouter(NUM_EXPERTS, 2)(layer_logits) for layer_logits in logits]
    bare = selections[1]
    selections[1] = Selection(bare.indices, bare.weights, bare.k)  # no probabilities, no top expert
    recorder = RoutingRecorder(2, NUM_EXPERTS, 2, 2)
    recorder.begin_batch(torch.ones(1, 10, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
                         torch.ones(1, 10, dtype=torch.long))
    for layer, (layer_logits, selection) in enumerate(zip(logits, selections)):
        recorder.record(layer, layer_logits, selection)
    recorder.end_batch()
    expected = [np.bincount(layer.numpy().argmax(-1), minlength=NUM_EXPERTS).tolist() for layer in logits]
    assert recorder.summary()["top1_counts"] == expected


def test_every_nth_real_token_counts_across_batches_and_skips_padding():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])  # real tokens at flat rows 0, 1, 4, 5, 6
    rows, among, real = every_nth_real_token(mask, tokens_seen=4, every=3)
    # ordinals 4, 5, 6, 7, 8 -> multiples of 3: 6 (3rd real token, flat row 4)
    assert rows.tolist() == [4] and among.tolist() == [2] and real == 5
    assert every_nth_real_token(mask, tokens_seen=4, every=3)[0] is rows  # asked again: the same tensor
    assert every_nth_real_token(mask, tokens_seen=0, every=2)[0].tolist() == [0, 4, 6]  # ordinals 0, 2, 4


@pytest.mark.parametrize("padded", [False, True])
def test_every_nth_real_token_matches_counting_one_by_one(padded):
    rng = np.random.default_rng(int(padded))
    for _ in range(20):
        mask = np.ones((3, 7), dtype=np.int64)
        if padded:
            for row in range(3):
                mask[row, rng.integers(0, 8):] = 0
        seen, every = int(rng.integers(0, 50)), int(rng.integers(1, 6))
        real_rows = np.flatnonzero(mask.reshape(-1))
        keep = [i for i in range(real_rows.size) if (seen + i) % every == 0]
        rows, among, real = every_nth_real_token(torch.from_numpy(mask), seen, every)
        assert among.tolist() == keep and rows.tolist() == real_rows[keep].tolist() and real == real_rows.size


def test_detail_log_and_recorder_compute_the_sampled_pvalues_once(tmp_path):
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(2 * 6, 5)).astype(np.float32))
    computed = []

    def pvalues(rows):
        computed.append(None if rows is None else rows.tolist())
        chosen = logits if rows is None else logits.index_select(0, rows)
        return torch.sigmoid(-chosen)

    selection = Selection(torch.tensor([[0, 1]] * 12), torch.full((12, 2), 0.3), torch.full((12,), 2), pvalues)
    recorder = RoutingRecorder(1, 5, 1, 2, pvalue_every=3)
    sampler = DecisionSampler(tmp_path / "d.parquet", 5, every_n=3)
    group = RecorderGroup(recorder, sampler)
    mask = torch.ones(2, 6, dtype=torch.long)
    group.begin_batch(mask, torch.arange(2), torch.arange(2), torch.full((2, 6), 7))
    group.record(0, logits, selection)
    group.end_batch()
    group.close()
    assert computed == [[0, 3, 6, 9]], "each recorder computed the sampled p-values itself"
    expected = torch.sigmoid(-logits[[0, 3, 6, 9]]).double()
    assert recorder.summary()["pvalue_mean"] == pytest.approx(float(expected.mean()), rel=1e-6)


def test_sampled_pvalues_of_every_layer_are_computed_in_one_call_and_shared(tmp_path, monkeypatch):
    """With a per-layer tabulated null, the sampled p-values of all layers come from one call of the
    null, equal (exactly) to one call per layer, and the detail log reuses them instead of recomputing."""
    from routelab.nulls import TabulatedNull

    gen = torch.Generator().manual_seed(11)
    logits = [torch.randn(2 * 8, NUM_EXPERTS, generator=gen) * 2 for _ in range(3)]
    null = fit_kde_null([layer.numpy() for layer in logits], NUM_EXPERTS)
    router = BHRouter(NUM_EXPERTS, null, alpha=0.5, min_k=1, max_k=4)
    calls = {"pvalues": 0, "pvalues_layers": 0}
    for name in calls:
        original = getattr(TabulatedNull, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(TabulatedNull, name, counted)
    selections = [router(layer_logits, layer) for layer, layer_logits in enumerate(logits)]
    calls.update(pvalues=0, pvalues_layers=0)  # routing itself counted in logit space
    recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4, pvalue_every=3)
    sampler = DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=3, alpha=0.5)
    group = RecorderGroup(recorder, sampler)
    group.begin_batch(torch.ones(2, 8, dtype=torch.long), torch.arange(2), torch.arange(2),
                      torch.ones(2, 8, dtype=torch.long))
    for layer, (layer_logits, selection) in enumerate(zip(logits, selections)):
        group.record(layer, layer_logits, selection)
    group.end_batch()
    group.close()
    assert calls == {"pvalues": 0, "pvalues_layers": 1}
    sample = [0, 3, 6, 9, 12, 15]
    expected = np.stack([null.pvalues(layer_logits[sample], layer).numpy() for layer, layer_logits in enumerate(logits)])
    rows = pq.read_table(tmp_path / "d.parquet").to_pandas().sort_values(["window_id", "position", "layer"])
    got = np.stack(rows["pvalues"].to_numpy()).reshape(len(sample), 3, NUM_EXPERTS).transpose(1, 0, 2)
    np.testing.assert_array_equal(got, expected)
    assert recorder.summary()["pvalue_mean"] == pytest.approx(float(expected.astype(np.float64).mean()), rel=1e-6)


def test_pvalues_at_layers_falls_back_to_one_call_per_layer():
    """Nulls without a batched method (here gaussian) and selections without p-values still work."""
    from routelab.nulls import GaussianNull
    from routelab.routers import pvalues_at_layers

    gen = torch.Generator().manual_seed(12)
    logits = [torch.randn(6, NUM_EXPERTS, generator=gen) for _ in range(2)]
    null = GaussianNull()
    router = BHRouter(NUM_EXPERTS, null, alpha=0.5, min_k=1, max_k=4)
    rows = torch.tensor([1, 4])
    selections = [router(layer_logits, layer) for layer, layer_logits in enumerate(logits)]
    expected = torch.stack([null.pvalues(layer_logits[rows], layer) for layer, layer_logits in enumerate(logits)])
    assert torch.equal(pvalues_at_layers(selections, rows), expected)
    bare = TopKRouter(NUM_EXPERTS, 2)(logits[0])
    assert pvalues_at_layers([selections[0], bare], rows) is None


def test_counts_land_in_the_recorded_layers_rows_when_some_layers_are_missing():
    """A batch that records layers 2 and 0 of 3 (e.g. a model whose first layers are dense): each
    layer's k histogram, expert and top-1 counts go to its own row, the missing layer stays empty."""
    gen = torch.Generator().manual_seed(21)
    logits = {layer: torch.randn(10, NUM_EXPERTS, generator=gen) * 2 for layer in (2, 0)}
    router = BHRouter(NUM_EXPERTS, fit_kde_null([x.numpy() for x in logits.values()], NUM_EXPERTS), alpha=0.5,
                      min_k=1, max_k=4)
    recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4)
    recorder.begin_batch(torch.ones(1, 10, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
                         torch.ones(1, 10, dtype=torch.long))
    selections = {}
    for layer, layer_logits in logits.items():
        selections[layer] = router(layer_logits, layer % 2)
        recorder.record(layer, layer_logits, selections[layer])
    recorder.end_batch()
    state = recorder.state()
    for layer in (0, 2):
        s = selections[layer]
        k = s.k.numpy()
        assert state["k_hist"][layer].tolist() == np.bincount(k, minlength=NUM_EXPERTS + 1).tolist()
        chosen = np.concatenate([s.indices[t, : k[t]].numpy() for t in range(10)])
        assert state["expert_counts"][layer][:NUM_EXPERTS].tolist() == np.bincount(chosen, minlength=NUM_EXPERTS).tolist()
        top = logits[layer].numpy().argmax(-1)
        assert state["top1_counts"][layer].tolist() == np.bincount(top, minlength=NUM_EXPERTS).tolist()
        assert state["router_sums"][layer][0] == 10
    assert not state["k_hist"][1].any() and not state["expert_counts"][1].any() and not state["top1_counts"][1].any()
    assert state["router_sums"][1].tolist() == [0.0] * 5
