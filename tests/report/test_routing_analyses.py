"""collect_routing_analyses on tiny routing.parquet files in the route stage's schema, against hand counts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from routelab.io.files import write_json, write_parquet
from routelab.record.routing_log import SCHEMA
from routelab.report import routing_analyses
from routelab.report.aggregate import collect_coactivation
from routelab.report.routing_analyses import collect_routing_analyses

# One window: prefill positions 0-3 (token ids 5, 6, 5, 7), then one generated token at position 4 whose id
# differs between the runs (8 for the baseline, 9 for the other). Both layers route alike.
PHASES = ["prefill"] * 4 + ["decode"]
BASELINE = {"token_ids": [5, 6, 5, 7, 8], "experts": [[0, 1], [1, 2], [0, 1], [2, 0], [1, 0]]}
ADAPTIVE = {"token_ids": [5, 6, 5, 7, 9], "experts": [[0], [1], [0, 1], [2], [1]]}


def routing_log(token_ids: list[int], experts: list[list[int]], shuffle: bool) -> pa.Table:
    rows = [(position, layer) for position in range(len(token_ids)) for layer in (0, 1)]
    if shuffle:  # not token by token, as shards may leave it: the reader must sort
        rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    chosen = [experts[position] for position, _ in rows]
    columns = {
        "window_id": [3] * len(rows), "doc_id": [1] * len(rows), "position": [p for p, _ in rows],
        "token_id": [token_ids[p] for p, _ in rows],
        "phase": pa.array([PHASES[p] for p, _ in rows]).dictionary_encode().cast(SCHEMA.field("phase").type),
        "layer": [layer for _, layer in rows], "k": [len(c) for c in chosen], "experts": chosen,
        "weights": [[0.5] * len(c) for c in chosen]}
    return pa.table({field.name: pa.array(columns[field.name], type=field.type) if field.name != "phase"
                     else columns["phase"] for field in SCHEMA}, schema=SCHEMA)


def write_run(root: Path, routing: str, dataset: str, log: dict, shuffle: bool = False) -> Path:
    run_dir = root / routing / dataset
    write_json(run_dir / "summary.json", {"routing": routing, "dataset": dataset, "method": "x",
                                          "num_layers": 2, "num_experts": 3})
    write_parquet(run_dir / "routing.parquet", routing_log(log["token_ids"], log["experts"], shuffle))
    return run_dir


def decode(ids):
    return [f"<{i}>" for i in ids]


@pytest.fixture
def tables(tmp_path):
    runs = [write_run(tmp_path, "bh", "text", ADAPTIVE, shuffle=True), write_run(tmp_path, "topk2", "text", BASELINE),
            write_run(tmp_path, "bh", "other", ADAPTIVE)]  # "other" has no baseline run
    return collect_routing_analyses(runs, "topk2", decode=decode, coactivation_layer=1)


def rows(table, routing, dataset="text", layer=0):
    return table[(table["routing"] == routing) & (table["dataset"] == dataset) & (table["layer"] == layer)]


def test_baseline_agreement_counts_only_tokens_with_the_same_id(tables):
    agreement = tables["baseline_agreement"]
    assert set(agreement["dataset"]) == {"text"}  # no baseline for "other"
    row = rows(agreement, "bh").iloc[0]
    # the generated token (position 4) differs: 4 of 5 tokens matched; Jaccard {0}|{0,1}, {1}|{1,2}, {0,1}|{0,1},
    # {2}|{2,0} = 1/2, 1/2, 1, 1/2; every baseline top-1 (0, 1, 0, 2) kept
    assert (row["tokens"], row["matched"]) == (5, 4)
    assert row["jaccard"] == pytest.approx(0.625)
    assert row["top1_kept"] == 1.0
    assert row["baseline"] == "topk2"
    assert rows(agreement, "topk2").iloc[0]["jaccard"] == 1.0


def test_locality_pairs_cross_from_prefill_to_decode(tables):
    row = rows(tables["locality"], "bh").iloc[0]
    # pairs 0-1 {0}{1}, 1-2 {1}{0,1} (J 1/2), 2-3 {0,1}{2}, 3-4 (prefill -> decode) {2}{1}
    assert row["pairs"] == 4
    assert row["share_any"] == pytest.approx(1 / 4)
    assert row["jaccard"] == pytest.approx(1 / 8)


def test_vocabulary_by_hand(tables):
    vocabulary = rows(tables["vocabulary"], "bh").set_index("expert")
    # ids 5, 6, 5, 7, 9: expert 0 gets both 5s (1); expert 1 gets 6, 5, 9: (1/1 + 1/2 + 1/1) / 3; expert 2 the 7
    np.testing.assert_allclose(vocabulary["specialisation"], [1.0, 5 / 6, 1.0])
    assert vocabulary["tokens"].tolist() == [2, 3, 1]
    top = rows(tables["vocabulary_top_tokens"], "bh")
    assert top[top["expert"] == 0][["token_id", "count", "text"]].values.tolist() == [[5, 2, "<5>"]]
    assert set(top["expert"]) == {0, 1, 2}


def test_cross_layer_of_identical_layers_is_fully_predictable(tables):
    row = tables["cross_layer"][(tables["cross_layer"]["routing"] == "bh")
                                & (tables["cross_layer"]["dataset"] == "text")].iloc[0]
    assert (row["layer"], row["next_layer"], row["tokens"]) == (0, 1, 5)
    assert row["top1_accuracy"] == 1.0
    assert row["conditional_entropy_bits"] == pytest.approx(0.0)
    # top-1: 0, 1, 0, 2, 1 -> H(2/5, 2/5, 1/5)
    assert row["entropy_bits"] == pytest.approx(-(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2)))


def test_k_by_position_and_frequency_by_hand(tables):
    position = rows(tables["k_by_position"], "bh")
    # k = 1, 1, 2, 1, 1 at positions 0..4: bins [0,1) [1,2) [2,4) [4,8)
    assert position["position_low"].tolist() == [0, 1, 2, 4]
    np.testing.assert_allclose(position["k_mean"], [1, 1, 1.5, 1])
    frequency = rows(tables["k_by_frequency"], "bh")
    # id 5 twice (k 1 and 2), ids 6, 7, 9 once (k 1 each): bins [1, 2) and [2, 4)
    assert frequency[["frequency_low", "tokens", "distinct_tokens"]].values.tolist() == [[1, 3, 3], [2, 2, 1]]
    np.testing.assert_allclose(frequency["k_mean"], [1.0, 1.5])


def test_shuffled_and_ordered_logs_give_the_same_tables(tmp_path, tables):
    ordered = write_run(tmp_path / "ordered", "bh", "text", ADAPTIVE)
    again = collect_routing_analyses([ordered], "topk2", coactivation_layer=False)
    for name in ("vocabulary", "locality", "cross_layer", "k_by_position"):
        expected = tables[name][tables[name]["dataset"] == "text"]
        expected = expected[expected["routing"] == "bh"].reset_index(drop=True)
        np.testing.assert_allclose(again[name].select_dtypes("number").to_numpy(),
                                   expected.select_dtypes("number").to_numpy(), equal_nan=True)
    assert "baseline_agreement" not in again and "coactivation" not in again


def test_coactivation_matches_collect_coactivation(tmp_path, tables):
    runs = sorted({Path(p).parent for p in tmp_path.glob("*/*/routing.parquet")})
    reference = collect_coactivation(runs, layer=1)
    ours = tables["coactivation"]
    assert ours[reference.columns].sort_values(list(reference.columns)).values.tolist() == \
        reference.sort_values(list(reference.columns)).values.tolist()


def test_worker_processes_give_the_same_tables(tmp_path, tables):
    runs = [tmp_path / "bh" / "text", tmp_path / "topk2" / "text", tmp_path / "bh" / "other"]
    parallel = collect_routing_analyses(runs, "topk2", decode=decode, coactivation_layer=1, workers=2)
    assert parallel.keys() == tables.keys()
    for name, table in tables.items():
        pd.testing.assert_frame_equal(parallel[name], table, check_exact=True)


def test_a_datasets_runs_split_over_workers_give_the_same_tables_each_run_once(tmp_path):
    """Three runs besides the baseline on two workers: two tasks, each reading the baseline, its own
    tables written once."""
    runs = [write_run(tmp_path, "topk2", "text", BASELINE)]
    for index, routing in enumerate(("bh", "minp", "topp")):
        log = {**ADAPTIVE, "experts": [chosen[index % len(chosen):] or chosen for chosen in ADAPTIVE["experts"]]}
        runs.append(write_run(tmp_path, routing, "text", log))
    one = collect_routing_analyses(runs, "topk2", workers=1)
    two = collect_routing_analyses(runs, "topk2", workers=2)
    for name, table in one.items():
        pd.testing.assert_frame_equal(two[name], table, check_exact=True)
    locality = two["locality"]
    assert sorted(locality.groupby("routing").size().items()) == [(r, 2) for r in ("bh", "minp", "topk2", "topp")]
    assert sorted(two["baseline_agreement"]["routing"].unique()) == ["bh", "minp", "topk2", "topp"]


def test_analysis_tasks_put_the_baseline_in_one_task_and_every_run_in_one():
    from routelab.report.routing_analyses import analysis_tasks

    runs = [(Path(name), {"routing": name, "dataset": "d"}) for name in ("a", "base", "b", "c")]
    tasks = analysis_tasks(runs, "base", parts=2)
    assert [reference[1]["routing"] for reference, _ in tasks] == ["base", "base"]
    assert [[summary["routing"] for _, summary in chunk] for _, chunk in tasks] == [["base", "a", "c"], ["b"]]
    alone = analysis_tasks(runs[:1], "base", parts=4)  # no baseline run: one task, no reference
    assert alone == [(None, runs[:1])]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("log", [ADAPTIVE, BASELINE], ids=["variable_k", "fixed_k"])
def test_read_routing_log_pads_each_layer_in_token_order(tmp_path, monkeypatch, log, shuffle):
    # a chunk of 2 rows, so that a layer's 5 tokens are padded in three steps
    monkeypatch.setattr(routing_analyses, "PAD_CHUNK", 2)
    run_dir = write_run(tmp_path, "r", "d", log, shuffle=shuffle)
    run = routing_analyses.read_routing_log(run_dir / "routing.parquet", "r", "d", num_experts=3)
    width = max(map(len, log["experts"]))
    expected = np.array([experts + [-1] * (width - len(experts)) for experts in log["experts"]])
    assert sorted(run.layers) == [0, 1]
    for data in run.layers.values():
        assert data.experts.dtype == np.int16 and data.experts.flags.c_contiguous
        np.testing.assert_array_equal(data.experts, expected)
        np.testing.assert_array_equal(data.k, [len(experts) for experts in log["experts"]])
        np.testing.assert_array_equal(data.tokens.token_ids, log["token_ids"])
        np.testing.assert_array_equal(data.tokens.position, range(5))
    assert run.layers[0].tokens is run.layers[1].tokens


def test_read_routing_log_rejects_an_expert_outside_the_model(tmp_path):
    run_dir = write_run(tmp_path, "r", "d", BASELINE)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        routing_analyses.read_routing_log(run_dir / "routing.parquet", "r", "d", num_experts=2)
