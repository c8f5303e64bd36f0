"""Sampled routing detail: DecisionSampler on a tiny random OLMoE, and the JSON export script."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from scipy.stats import false_discovery_control

from routelab.model.patching import install_router
from routelab.record import DecisionSampler, Recording, RoutingRecorder
from routelab.record.decisions import SCHEMA
from routelab.routing import BHRouter, Selection, TopKRouter
from routelab.routing.counting import bh_count
from routelab.routing.nulls import fit_kde_null
from tests.support import REPO

SCRIPT = REPO / "workflow" / "scripts" / "export_decisions.py"
NUM_EXPERTS, NUM_LAYERS, VOCAB = 8, 2, 64
ALPHA, MIN_K, MAX_K = 0.2, 1, 6
# Two right-padded batches of windows with unequal lengths: (window ids, doc ids, lengths).
BATCHES = [([0, 1, 2], [0, 0, 1], [10, 4, 6]), ([3, 4], [2, 2], [9, 5])]


class FanOut:
    """Passes every recorder call on to several recorders (install_router takes one)."""

    def __init__(self, *recorders):
        self.recorders = recorders

    def __getattr__(self, name):
        return lambda *args: [getattr(r, name)(*args) for r in self.recorders]


def make_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    batches = []
    for window_ids, doc_ids, lengths in BATCHES:
        seq = max(lengths)
        mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(2, VOCAB, (len(lengths), seq), generator=gen) * mask + (1 - mask)  # pad id 1
        batches.append({"input_ids": ids, "attention_mask": mask, "window_ids": torch.tensor(window_ids),
                        "doc_ids": torch.tensor(doc_ids)})
    return batches


def real_tokens(batches) -> list[tuple[int, int, int]]:
    """(window_id, position, token_id) of every non-padding token, in row-major order over batches."""
    return [(int(b["window_ids"][r]), int(c), int(b["input_ids"][r, c]))
            for b in batches for r, c in b["attention_mask"].nonzero().tolist()]


@pytest.fixture(scope="module")
def model_and_null():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    # initializer_range spreads the router logits so BH selects a varying number of experts.
    config = OlmoeConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=8, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, num_experts=NUM_EXPERTS,
                         num_experts_per_tok=2, initializer_range=0.2)
    model = OlmoeForCausalLM(config).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, VOCAB, (8, 32)), output_router_logits=True)
    null = fit_kde_null([logits.numpy() for logits in out.router_logits], NUM_EXPERTS)
    return model, null


def route(model, router, recorder, batches) -> list[tuple[torch.Tensor, ...]]:
    """Run every batch under ``router``; returns each batch's router logits per layer ``[B*S, E]``."""
    logits = []
    recording = Recording(recorder)
    with install_router(model, router, recording), torch.no_grad():
        for b in batches:
            recording.begin_batch(b["attention_mask"], b["window_ids"], b["doc_ids"], b["input_ids"])
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_router_logits=True)
            recording.end_batch()
            logits.append(out.router_logits)
    recording.close()
    return logits


@pytest.fixture(scope="module")
def sampled(model_and_null, tmp_path_factory):
    """Every 3rd real token under BH, with a full RoutingRecorder alongside for reference."""
    model, null = model_and_null
    tmp = tmp_path_factory.mktemp("decisions")
    router = BHRouter(NUM_EXPERTS, null, alpha=ALPHA, min_k=MIN_K, max_k=MAX_K)
    sampler = DecisionSampler(tmp / "decisions.parquet", NUM_EXPERTS, every_n=3, alpha=ALPHA)
    recorder = RoutingRecorder(NUM_LAYERS, NUM_EXPERTS, MIN_K, MAX_K, path=tmp / "routing.parquet")
    batches = make_batches()
    logits = route(model, router, FanOut(sampler, recorder), batches)
    return {"table": pq.read_table(tmp / "decisions.parquet"), "df": pd.read_parquet(tmp / "decisions.parquet"),
            "routing": pd.read_parquet(tmp / "routing.parquet"), "batches": batches, "logits": logits,
            "null": null}


def test_sampler_keeps_every_nth_real_token_across_batches(sampled):
    df, tokens = sampled["df"], real_tokens(sampled["batches"])
    assert sampled["table"].schema.equals(SCHEMA)
    assert len(df) == math.ceil(len(tokens) / 3) * NUM_LAYERS
    for layer in range(NUM_LAYERS):
        rows = df[df["layer"] == layer]
        # The counter runs on across batches: the kept tokens are the 1st, 4th, 7th, ... real tokens.
        assert list(zip(rows["window_id"], rows["position"], rows["token_id"])) == tokens[::3]


def test_sampled_logits_are_the_router_logits(sampled):
    df, batches = sampled["df"], sampled["batches"]
    batch_of = {int(w): (i, r) for i, b in enumerate(batches) for r, w in enumerate(b["window_ids"])}
    for row in df.itertuples():
        i, r = batch_of[row.window_id]
        seq = batches[i]["input_ids"].shape[1]
        expected = sampled["logits"][i][row.layer][r * seq + row.position].numpy()
        np.testing.assert_allclose(row.logits, expected, rtol=1e-6)
        logits = np.asarray(row.logits, dtype=np.float64)
        np.testing.assert_allclose([row.logit_mean, row.logit_std, row.logit_min, row.logit_max],
                                   [logits.mean(), logits.std(), logits.min(), logits.max()], rtol=1e-5, atol=1e-6)


def test_passing_rank_is_the_bh_step_up_count(sampled):
    df, null = sampled["df"], sampled["null"]
    thresholds = np.arange(1, NUM_EXPERTS + 1) * ALPHA / NUM_EXPERTS
    for row in df.itertuples():
        pvalues = np.asarray(row.pvalues)
        reference = null.pvalues(torch.from_numpy(np.array([row.logits])), row.layer)[0].numpy()
        np.testing.assert_allclose(pvalues, reference)
        assert np.array_equal(row.sorted_pvalues, np.sort(pvalues))
        assert np.all(np.diff(row.sorted_pvalues) >= 0)
        np.testing.assert_allclose(row.bh_thresholds, thresholds, rtol=1e-6)
        scipy_count = int((false_discovery_control(pvalues.astype(np.float64)) <= ALPHA).sum())
        routelab_count = int(bh_count(torch.from_numpy(np.array([row.sorted_pvalues])), ALPHA)[0])
        assert row.passing_rank == routelab_count == scipy_count
        assert row.k == min(max(row.passing_rank, MIN_K), MAX_K)
    assert df["passing_rank"].nunique() >= 2, "the run should exercise more than one BH outcome"


def test_selected_matches_the_routing_record(sampled):
    df, routing = sampled["df"], sampled["routing"]
    joined = df.merge(routing, on=["window_id", "doc_id", "position", "token_id", "layer"], suffixes=("", "_rec"))
    assert len(joined) == len(df)
    assert (joined["k"] == joined["k_rec"]).all()
    assert (joined["selected"].map(len) == joined["k"]).all()
    for row in joined.itertuples():
        assert list(row.selected) == list(row.experts)
        np.testing.assert_array_equal(row.selected_weights, row.weights)
    assert df["k"].nunique() >= 2, "the run should exercise variable k"


def test_every_n_1_keeps_all_real_tokens(model_and_null, tmp_path):
    model, null = model_and_null
    batches = make_batches()
    sampler = DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=1, alpha=ALPHA)
    route(model, BHRouter(NUM_EXPERTS, null, alpha=ALPHA, min_k=MIN_K, max_k=MAX_K), sampler, batches)
    df = pd.read_parquet(tmp_path / "d.parquet")
    tokens = real_tokens(batches)
    assert len(df) == len(tokens) * NUM_LAYERS
    assert list(zip(df["window_id"], df["position"], df["token_id"]))[::NUM_LAYERS] == tokens


def test_documents_sampler_keeps_every_real_token_of_those_documents(model_and_null, tmp_path):
    """The explorer's log: every real token of the chosen documents, none of the others, with the same
    detail as every-n-th sampling (here checked row for row against a sampler that keeps every token)."""
    model, null = model_and_null
    batches = make_batches()
    router = BHRouter(NUM_EXPERTS, null, alpha=ALPHA, min_k=MIN_K, max_k=MAX_K)
    chosen = DecisionSampler(tmp_path / "explorer.parquet", NUM_EXPERTS, 0, alpha=ALPHA, documents=[1, 0])
    every = DecisionSampler(tmp_path / "all.parquet", NUM_EXPERTS, every_n=1, alpha=ALPHA)
    route(model, router, FanOut(chosen, every), batches)
    df = pd.read_parquet(tmp_path / "explorer.parquet")
    expected_tokens = [(w, p, t) for b in batches for r, c in b["attention_mask"].nonzero().tolist()
                       if int(b["doc_ids"][r]) in (0, 1)
                       for w, p, t in [(int(b["window_ids"][r]), int(c), int(b["input_ids"][r, c]))]]
    assert 0 < len(expected_tokens) < len(real_tokens(batches)), "the batches must hold other documents too"
    assert set(df["doc_id"]) == {0, 1}
    assert list(zip(df["window_id"], df["position"], df["token_id"]))[::NUM_LAYERS] == expected_tokens
    reference = pd.read_parquet(tmp_path / "all.parquet")
    reference = reference[reference["doc_id"].isin([0, 1])].reset_index(drop=True)
    pd.testing.assert_frame_equal(df, reference)


def test_every_n_0_writes_an_empty_file_with_the_schema(model_and_null, tmp_path):
    model, _ = model_and_null
    sampler = DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=0, alpha=ALPHA)
    route(model, TopKRouter(NUM_EXPERTS, 2), sampler, make_batches())
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_router_without_pvalues_leaves_bh_columns_null(model_and_null, tmp_path):
    model, _ = model_and_null
    sampler = DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=2)
    route(model, TopKRouter(NUM_EXPERTS, 2), sampler, make_batches())
    df = pd.read_parquet(tmp_path / "d.parquet")
    assert len(df) == math.ceil(len(real_tokens(make_batches())) / 2) * NUM_LAYERS
    for column in ("pvalues", "sorted_pvalues", "bh_thresholds", "passing_rank"):
        assert df[column].isna().all(), column
    assert (df["k"] == 2).all() and (df["selected"].map(len) == 2).all()


@pytest.mark.parametrize("every_n", [-1, 1.5, True])
def test_sampler_rejects_invalid_every_n(tmp_path, every_n):
    with pytest.raises(ValueError, match="every_n"):
        DecisionSampler(tmp_path / "d.parquet", NUM_EXPERTS, every_n=every_n)


# --- export_decisions.py -------------------------------------------------------------------------

def hand_made_run(run_dir: Path) -> None:
    """A run dir whose decisions.parquet holds two hand-made decisions (4 experts, alpha 0.1, 1 layer)."""
    run_dir.mkdir(parents=True)
    # Token 0: logits 1, 2, 3, 4 (mean 2.5, std sqrt(1.25)); p sorted 0.01, 0.02, 0.5, 0.9 vs thresholds
    # 0.025, 0.05, 0.075, 0.1: ranks 1 and 2 pass -> passing_rank 2, experts 0 and 2 selected.
    # Token 1: all p above their thresholds -> passing_rank 0, min_k = 1 expert (3) selected.
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 2.0]])
    pvalues = torch.tensor([[0.01, 0.5, 0.02, 0.9], [0.3, 0.3, 0.3, 0.2]])
    selection = Selection(indices=torch.tensor([[0, 2], [3, 4]]), weights=torch.tensor([[0.6, 0.3], [0.9, 0.0]]),
                          k=torch.tensor([2, 1]), pvalues=pvalues)
    sampler = DecisionSampler(run_dir / "decisions.parquet", 4, every_n=1, alpha=0.1)
    recording = Recording(sampler)
    recording.begin_batch(torch.ones(1, 2, dtype=torch.long), torch.tensor([5]), torch.tensor([9]),
                          torch.tensor([[11, 12]]))
    recording.record(0, logits, selection)
    recording.end_batch()
    recording.close()
    summary = {"routing": "bh", "dataset": "code", "total_decisions": 40, "experts_mean": 1.5, "experts_std": 0.5,
               "experts_min": 1, "experts_max": 2, "ceiling_hit_rate": 50.0, "floor_hit_rate": 50.0,
               "pvalue_mean": 0.33, "pvalue_std": 0.28}
    spec = {"name": "bh", "method": "bh", "alpha": 0.1, "min_k": 1, "max_k": 2}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "provenance.json").write_text(json.dumps({"routing": spec, "model": "tiny", "seed": 0}))


def run_export(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


def test_export_writes_detailed_and_summary_logs(tmp_path):
    run_dir = tmp_path / "runs" / "bh" / "code"
    hand_made_run(run_dir)
    result = run_export("--run-dir", run_dir, "--out-dir", tmp_path / "export")
    assert result.returncode == 0, result.stderr
    detailed = json.loads((tmp_path / "export" / "decisions_detailed.json").read_text())
    summary = json.loads((tmp_path / "export" / "decisions_summary.json").read_text())

    spec = {"name": "bh", "method": "bh", "alpha": 0.1, "min_k": 1, "max_k": 2}
    for log in (detailed, summary):
        assert log["experiment_name"] == "bh/code" and log["config"] == spec
        assert datetime.fromisoformat(log["timestamp"]).utcoffset().total_seconds() == 0
        assert log["total_decisions"] == 40
    first, second = detailed["entries"]
    assert (first["layer"], first["token_position"], first["window_id"], first["token_id"]) == (0, 0, 5, 11)
    assert second["token_position"] == 1 and second["token_id"] == 12
    assert first["logits_stats"] == pytest.approx({"mean": 2.5, "std": 1.25 ** 0.5, "min": 1.0, "max": 4.0})
    # p = 0.01, 0.5, 0.02, 0.9: mean 0.3575; squared deviations sum to 0.549275 -> population std
    # sqrt(0.549275 / 4) = 0.37056544
    assert first["pvalues_stats"] == pytest.approx({"mean": 0.3575, "std": 0.37056544, "min": 0.01, "max": 0.9})
    bh = first["bh_results"]
    assert bh["sorted_pvalues"] == pytest.approx([0.01, 0.02, 0.5, 0.9])
    assert bh["thresholds"] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert (bh["passing_rank"], bh["selected_experts"], bh["num_selected"]) == (2, [0, 2], 2)
    assert (second["bh_results"]["passing_rank"], second["bh_results"]["selected_experts"]) == (0, [3])

    assert summary["sampled_decisions"] == 2
    assert {key: summary[key] for key in ("avg_experts", "std_experts", "min_experts", "max_experts",
                                          "ceiling_hit_rate", "floor_hit_rate", "pvalue_mean", "pvalue_std")} == {
        "avg_experts": 1.5, "std_experts": 0.5, "min_experts": 1, "max_experts": 2, "ceiling_hit_rate": 50.0,
        "floor_hit_rate": 50.0, "pvalue_mean": 0.33, "pvalue_std": 0.28}


def test_export_uses_the_given_experiment_name(tmp_path):
    hand_made_run(tmp_path / "run")
    result = run_export("--run-dir", tmp_path / "run", "--experiment-name", "bh-sweep", "--out-dir", tmp_path / "x")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "x" / "decisions_summary.json").read_text())["experiment_name"] == "bh-sweep"


def test_export_reports_a_missing_run_dir(tmp_path):
    result = run_export("--run-dir", tmp_path / "nowhere", "--out-dir", tmp_path / "x")
    assert result.returncode == 2 and "decisions.parquet" in result.stderr
    assert not (tmp_path / "x").exists()


def test_export_explains_itself():
    result = run_export("--help")
    assert result.returncode == 0 and "--run-dir" in result.stdout and "--experiment-name" in result.stdout
