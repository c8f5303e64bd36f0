"""routing.parquet and the running counts: one row per real token and layer, equal to a reference BH on a real run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import false_discovery_control

from routelab.model.patching import install_router
from routelab.record import Recording, RoutingRecorder
from routelab.record.routing_log import SCHEMA
from routelab.routing import BHRouter, Selection, TopKRouter
from routelab.routing.nulls import fit_kde_null
from routelab.run.evaluate import score_windows
from tests.support.models import load_tiny

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
    both = Recording(recorder, sampled)
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
    Recording(recorder).begin_batch(torch.ones(1, 1, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
                                    torch.tensor([[3]]))
    recorder.record(0, logits, Selection(torch.tensor([[0, 4, 4, 4]]), torch.tensor([[0.6, 0, 0, 0]]),
                                         torch.tensor([1]), pvalues=lambda rows: 1 / 0))  # never computed
    recorder.end_batch()
    summary = recorder.summary()
    assert summary["pvalue_mean"] is None and summary["total_decisions"] == 1
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=rf"pvalue_every: {bad!r} is not valid; need an integer >= 0"):
            RoutingRecorder(1, 4, 1, 4, pvalue_every=bad)


def test_recorder_ignores_calls_outside_a_batch():
    recorder = RoutingRecorder(1, 4, 1, 4)
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        recorder.summary()
    selection = TopKRouter(4, 2)(torch.randn(3, 4))
    recorder.record(0, torch.randn(3, 4), selection)  # no begin_batch: nothing is counted
    with pytest.raises(RuntimeError):
        recorder.summary()
    Recording(recorder).begin_batch(torch.tensor([[1, 1, 0]]), torch.tensor([0]), torch.tensor([0]),
                                    torch.tensor([[5, 6, 1]]))
    recorder.record(0, torch.randn(3, 4), selection)
    recorder.end_batch()
    summary = recorder.summary()
    assert summary["total_decisions"] == 2  # the padded third token is not counted
    assert summary["k_histogram"] == {"2": 2}
    assert sum(summary["expert_counts"][0]) == 4


def test_pvalue_moments_do_not_depend_on_how_many_layers_are_reduced_at_once(monkeypatch):
    """end_batch reduces the p-values [layers, tokens, E] in groups of layers to bound memory; any
    grouping gives the same summary."""
    from routelab.record import routing_log

    gen = torch.Generator().manual_seed(5)
    logits = [torch.randn(12, NUM_EXPERTS, generator=gen) * 2 for _ in range(3)]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    router = BHRouter(NUM_EXPERTS, fit_kde_null([layer.numpy() for layer in logits], NUM_EXPERTS), alpha=0.5,
                      min_k=1, max_k=4)

    def summary():
        recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4, pvalue_every=1)
        Recording(recorder).begin_batch(mask, torch.tensor([0, 1]), torch.tensor([0, 1]),
                                        torch.ones(2, 6, dtype=torch.long))
        for layer, layer_logits in enumerate(logits):
            recorder.record(layer, layer_logits, router(layer_logits, layer))
        recorder.end_batch()
        return recorder.summary()

    together = summary()
    monkeypatch.setattr(routing_log, "_STATS_ELEMENTS", 1)  # one layer at a time
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
    Recording(recorder).begin_batch(torch.ones(1, 10, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
                                    torch.ones(1, 10, dtype=torch.long))
    for layer, (layer_logits, selection) in enumerate(zip(logits, selections)):
        recorder.record(layer, layer_logits, selection)
    recorder.end_batch()
    expected = [np.bincount(layer.numpy().argmax(-1), minlength=NUM_EXPERTS).tolist() for layer in logits]
    assert recorder.summary()["top1_counts"] == expected


def test_counts_land_in_the_recorded_layers_rows_when_some_layers_are_missing():
    """A batch that records layers 2 and 0 of 3 (e.g. a model whose first layers are dense): each
    layer's k histogram, expert and top-1 counts go to its own row, the missing layer stays empty."""
    gen = torch.Generator().manual_seed(21)
    logits = {layer: torch.randn(10, NUM_EXPERTS, generator=gen) * 2 for layer in (2, 0)}
    router = BHRouter(NUM_EXPERTS, fit_kde_null([x.numpy() for x in logits.values()], NUM_EXPERTS), alpha=0.5,
                      min_k=1, max_k=4)
    recorder = RoutingRecorder(3, NUM_EXPERTS, 1, 4)
    Recording(recorder).begin_batch(torch.ones(1, 10, dtype=torch.long), torch.tensor([0]), torch.tensor([0]),
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
        expected = np.bincount(chosen, minlength=NUM_EXPERTS).tolist()
        assert state["expert_counts"][layer][:NUM_EXPERTS].tolist() == expected
        top = logits[layer].numpy().argmax(-1)
        assert state["top1_counts"][layer].tolist() == np.bincount(top, minlength=NUM_EXPERTS).tolist()
        assert state["router_sums"][layer][0] == 10
    assert not state["k_hist"][1].any() and not state["expert_counts"][1].any() and not state["top1_counts"][1].any()
    assert state["router_sums"][1].tolist() == [0.0] * 5
