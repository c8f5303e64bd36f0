"""Sharded runs: whole documents per shard, balanced by tokens; merged shards equal one unsharded run."""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.run.records import merge_system
from routelab.run.shards import check_parts, parse_shard, select_shard, shard_bounds
from tests.support.route_setup import (
    assert_same_run,
    load_gather_script,
    load_route_script,
    make_model_and_data,
    read_run,
    route_args,
)


def test_shard_bounds_match_hand_computed_splits():
    assert shard_bounds([10, 10, 10, 10], 2).tolist() == [0, 2, 4]
    assert shard_bounds([10, 10, 10, 10], 4).tolist() == [0, 1, 2, 3, 4]
    # One long document takes a shard of its own; the short ones are not split across shards.
    assert shard_bounds([100, 1, 1, 1], 2).tolist() == [0, 1, 4]
    # Half the tokens fall at the start of document 3: every shard still gets at least one document.
    assert shard_bounds([1, 1, 1, 100], 3).tolist() == [0, 2, 3, 4]
    assert shard_bounds([5], 1).tolist() == [0, 1]


def test_more_shards_than_documents_is_refused_naming_the_setting():
    with pytest.raises(ValueError, match=r"shards: 4 is not valid for 3 documents"):
        shard_bounds([1, 2, 3], 4)


def test_config_refuses_more_shards_than_documents():
    from routelab.config import ConfigError, check_datasets

    check_datasets({"datasets": {"code": {"source": "demo", "domain": "code", "documents": 4, "shards": 4}}})
    with pytest.raises(ConfigError, match=r"datasets.code.shards: 5 exceeds documents = 4"):
        check_datasets({"datasets": {"code": {"source": "demo", "domain": "code", "documents": 4, "shards": 5}}})


@pytest.mark.parametrize("name", ["0-of-2", "3-of-2", "2of4", "a-of-b", ""])
def test_a_bad_shard_name_is_refused(name):
    with pytest.raises(ValueError, match="use I-of-N"):
        parse_shard(name)


@settings(max_examples=60, deadline=None)
@given(windows_per_doc=st.lists(st.integers(1, 4), min_size=1, max_size=12), data=st.data())
def test_shards_hold_whole_documents_and_tile_the_windows(windows_per_doc, data):
    shards = data.draw(st.integers(1, len(windows_per_doc)))
    doc_ids = np.repeat(np.arange(len(windows_per_doc)) * 3, windows_per_doc)  # ids need not be consecutive
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=len(doc_ids), max_size=len(doc_ids)))
    windows = pd.DataFrame({"window_id": np.arange(len(doc_ids)), "doc_id": doc_ids,
                            "input_ids": [[7] * n for n in lengths]})
    parts = [select_shard(windows, f"{i}-of-{shards}") for i in range(1, shards + 1)]
    assert pd.concat([p for p, _ in parts]).equals(windows)  # in order, nothing lost or repeated
    seen = set()
    for part, info in parts:
        assert len(part) > 0
        assert not seen & set(part["doc_id"])  # a document lies in one shard only
        seen |= set(part["doc_id"])
        assert info["tokens_before"] == sum(lengths[: info["windows"][0]])
        assert info["documents"] == [part["doc_id"].iloc[0], part["doc_id"].iloc[-1]]


def test_windows_out_of_document_order_are_refused():
    windows = pd.DataFrame({"doc_id": [0, 1, 0], "input_ids": [[1], [1], [1]]})
    with pytest.raises(ValueError, match="doc_id is not in ascending order"):
        select_shard(windows, "1-of-2")


def test_merged_system_sums_time_and_takes_the_largest_peak():
    shard = {"routing": "r", "dataset": "d", "device": "cpu", "experts_implementation": "eager", "peak_cuda_mb": None}
    merged = merge_system([{**shard, "wall_time_s": 2.0, "tokens_per_s": 100.0, "peak_rss_mb": 50.0},
                           {**shard, "wall_time_s": 6.0, "tokens_per_s": 200.0, "peak_rss_mb": 70.0}])
    assert merged["wall_time_s"] == 8.0 and merged["tokens_per_s"] == pytest.approx(1400 / 8)
    assert merged["peak_rss_mb"] == 70.0 and merged["peak_cuda_mb"] is None and merged["device"] == "cpu"
    assert merged["shards"] == 2


def _part(name, windows, config_hash="h"):
    return {"shard": name, "windows": windows, "provenance": {"config_hash": config_hash}}


def test_gather_refuses_incomplete_or_mixed_shards():
    check_parts([_part("1-of-2", [0, 3]), _part("2-of-2", [3, 5])], 5)
    with pytest.raises(ValueError, match="got part '2-of-2'"):
        check_parts([_part("2-of-2", [3, 5])], 5)
    with pytest.raises(ValueError, match="config_hash differs"):
        check_parts([_part("1-of-2", [0, 3]), _part("2-of-2", [3, 5], "other")], 5)
    with pytest.raises(ValueError, match="cover 5 windows but the dataset has 6"):
        check_parts([_part("1-of-2", [0, 3]), _part("2-of-2", [3, 5])], 6)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    model_dir, data_dir = make_model_and_data(root)
    return root, model_dir, data_dir




def test_sharded_run_matches_the_unsharded_run(setup):
    """Three shards (route.py --shard, checkpointed every batch) gathered equal one unsharded route.

    Exact: every routing decision (k, experts, BH passing rank), ids, token/word/byte counts and every
    count-based summary entry. Within float32 rounding (1e-5 absolute): weights, logits and p-values,
    because a window's forward pass runs in a batch of other windows at the shard edges and float32
    matmuls round differently for other batch shapes. Metrics and the float-sum summary entries
    (entropies, p-value moments, load balancing, z-loss, margins) within 1e-6 relative: the same rounding,
    plus the summation order of merged sums.
    """
    root, model_dir, data_dir = setup
    route, gather = load_route_script(), load_gather_script()
    route.main(route_args(model_dir, data_dir, root / "whole"))
    parts = [root / "parts" / f"{i}-of-3" for i in (1, 2, 3)]
    for i, part in enumerate(parts, start=1):
        route.main(route_args(model_dir, data_dir, part, shard=f"{i}-of-3", checkpoint_every=1))
        assert not part.with_name(part.name + ".partial").exists()
    gather.main(argparse.Namespace(parts=[str(p) for p in parts], data=str(data_dir), out=str(root / "gathered")))
    whole, gathered = read_run(root / "whole"), read_run(root / "gathered")
    assert_same_run(whole, gathered, float_tol=1e-5)
    # Some decisions vary (else equal k would prove little) and every shard contributed rows.
    assert whole["summary.json"]["experts_min"] < whole["summary.json"]["experts_max"]
    assert len(whole["decisions.parquet"]) > 0
    assert set(whole["explorer.parquet"].column("doc_id").to_pylist()) == {0, 1}  # explorer_documents=2
    provenance = gathered["provenance.json"]
    assert [s["shard"] for s in provenance["shards"]] == ["1-of-3", "2-of-3", "3-of-3"]
    assert provenance["config_hash"] == whole["provenance.json"]["config_hash"]
    assert gathered["system.json"]["shards"] == 3
    # The gathered run also has the tracking files an unsharded route writes.
    tracked = {p.relative_to(root / "whole") for p in (root / "whole" / "tracking").rglob("*")}
    gathered = {p.relative_to(root / "gathered") for p in (root / "gathered" / "tracking").rglob("*")}
    assert tracked and tracked == gathered


def test_batch_size_changes_results_only_at_float_rounding_level(setup):
    """Batch size 1 (no padding) and 8 (padded batches) give the same decisions and metrics within 1e-6."""
    root, model_dir, data_dir = setup
    route = load_route_script()
    route.main(route_args(model_dir, data_dir, root / "batch1", batch_size=1))
    route.main(route_args(model_dir, data_dir, root / "batch8", batch_size=8))
    windows = pd.read_parquet(data_dir / "windows.parquet")
    assert windows["input_ids"].map(len).nunique() > 1  # batches of 8 hold padding
    assert_same_run(read_run(root / "batch1"), read_run(root / "batch8"), float_tol=1e-5)


def test_concat_parquet_joins_parts_in_order_and_takes_one_part_as_it_is(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from routelab.io.parquet import concat_parquet

    parts = []
    for i, rows in enumerate([3, 0, 5]):
        path = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.table({"x": pa.array(range(10 * i, 10 * i + rows), pa.int32())}), path)
        parts.append(path)
    concat_parquet(parts, tmp_path / "all.parquet")
    assert pq.read_table(tmp_path / "all.parquet").column("x").to_pylist() == [0, 1, 2, 20, 21, 22, 23, 24]
    # one part: the very bytes (no decode and re-encode), the part left in place
    concat_parquet(parts[2:], tmp_path / "one.parquet")
    assert (tmp_path / "one.parquet").read_bytes() == parts[2].read_bytes() and parts[2].exists()
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"y": pa.array([1.0])}), other)
    with pytest.raises(ValueError, match="other.parquet: schema differs"):
        concat_parquet([parts[0], other], tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()
