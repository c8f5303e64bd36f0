"""A tiny routable setup for route.py tests: an untrained demo-architecture MoE with its tokenizer, and a
prepared perplexity dataset (demo grammar and arithmetic documents cut into rolling windows), made in seconds."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.support import REPO

SETTINGS = dict(layers=2, experts=8, top_k=2, hidden_size=32, expert_size=16, heads=2, max_positions=32,
                router_aux_loss_coef=0.01)
BH = {"name": "bh", "method": "bh", "alpha": 0.6, "min_k": 1, "max_k": 4, "null_model": "gaussian"}


def load_route_script():
    """workflow/scripts/route.py as a module (its ``main`` takes an argparse Namespace)."""
    spec = importlib.util.spec_from_file_location("route_script", REPO / "workflow/scripts/route.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_gather_script():
    spec = importlib.util.spec_from_file_location("gather_script", REPO / "workflow/scripts/gather_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_model_and_data(root: Path, documents: int = 14) -> tuple[Path, Path]:
    """``(model_dir, data_dir)`` under ``root``; documents of varied length, several windows each."""
    from routelab.data.loading import load_texts
    from routelab.data.prepare import document_table, window_table
    from routelab.demo import corpus as demo_corpus
    from routelab.demo.model import build_model, train_tokenizer
    from routelab.io.files import write_json, write_parquet

    # Long grammar documents (several windows each) between short arithmetic ones (one short window: padding).
    long = load_texts({"source": "demo", "domain": "grammar"}, documents - documents // 2, seed=0, split="eval")
    short = [t[:30] for t in load_texts({"source": "demo", "domain": "arithmetic"}, documents // 2, seed=0)]
    texts = [t for pair in zip(long, short + [None]) for t in pair if t is not None]
    tokenizer = train_tokenizer(demo_corpus.training_corpus(200, seed=1), vocab_size=300)
    model = build_model(SETTINGS, tokenizer, seed=0).eval()
    model_dir, data_dir = root / "model", root / "data" / "mixed"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    docs = document_table(texts, "perplexity")
    windows = window_table(docs, tokenizer, "perplexity", SETTINGS["max_positions"])
    write_parquet(data_dir / "documents.parquet", docs)
    write_parquet(data_dir / "windows.parquet", windows)
    write_json(data_dir / "info.json", {"task": "perplexity", "windows": len(windows), "documents": len(docs)})
    return model_dir, data_dir


def route_args(model_dir: Path, data_dir: Path, out: Path, routing: dict = BH, **overrides) -> argparse.Namespace:
    """route.py's arguments, as its command line would give them (one run: one --data, one --out)."""
    args = dict(model=str(model_dir), data=[str(data_dir)], routing=routing, null=routing.get("null_model"),
                calibration_logits=None,
                out=[str(out)], batch_size=4, checkpoint_every=0, shard=None, attempt=1, dtype="float32",
                device="cpu", experts_implementation=None, device_map=None, max_memory=None, offload_folder=None,
                gpus=1, sample_every=5, explorer_documents=2, seed=0, threads=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def read_run(run_dir: Path) -> dict:
    """Every output of a run: Parquet files as Arrow tables, JSON files as dicts."""
    files = {}
    for name in ("routing.parquet", "decisions.parquet", "explorer.parquet", "scores.parquet"):
        files[name] = pq.read_table(run_dir / name)
    for name in ("metrics.json", "summary.json", "system.json", "provenance.json"):
        files[name] = json.loads((run_dir / name).read_text())
    return files


# Columns of routing.parquet / decisions.parquet that are decisions or ids (must match exactly) and those
# that are float32 model outputs (differ by float32 rounding when the batches hold other windows).
EXACT = {"routing.parquet": ["window_id", "doc_id", "position", "token_id", "layer", "k", "experts"],
         "decisions.parquet": ["window_id", "doc_id", "position", "token_id", "layer", "k", "bh_thresholds",
                               "passing_rank", "selected"]}
EXACT["explorer.parquet"] = EXACT["decisions.parquet"]  # the same detail, for the explorer's documents


FLOAT = {"routing.parquet": ["weights"],
         "decisions.parquet": ["logit_mean", "logit_std", "logit_min", "logit_max", "logits", "pvalues",
                               "sorted_pvalues", "selected_weights"]}
FLOAT["explorer.parquet"] = FLOAT["decisions.parquet"]


# Summary entries that are counts (or exact functions of counts); the rest are means of float sums.
COUNT_KEYS = ["total_decisions", "experts_mean", "experts_std", "experts_median", "experts_min", "experts_max",
              "ceiling_hit_rate", "floor_hit_rate", "k_histogram", "expert_counts", "top1_counts", "min_k", "max_k",
              "routing", "dataset", "method", "params", "num_layers", "num_experts", "model_top_k", "router_score",
              "active_expert_flops_per_token", "active_expert_flops_vs_topk"]


def assert_same_run(a: dict, b: dict, float_tol: float) -> None:
    """Decisions, ids and counts equal exactly; float32 model outputs and float sums within ``float_tol``."""
    for name in EXACT:
        left, right = a[name].to_pandas(), b[name].to_pandas()
        assert len(left) == len(right), name
        for column in EXACT[name]:
            assert left[column].map(lambda v: np.asarray(v).tolist()).equals(
                right[column].map(lambda v: np.asarray(v).tolist())), (name, column)
        for column in FLOAT[name]:
            x = np.concatenate([np.atleast_1d(np.asarray(v, dtype=float)) for v in left[column] if v is not None])
            y = np.concatenate([np.atleast_1d(np.asarray(v, dtype=float)) for v in right[column] if v is not None])
            np.testing.assert_allclose(x, y, rtol=0, atol=float_tol, err_msg=f"{name} {column}")
    scores_a, scores_b = a["scores.parquet"].to_pandas(), b["scores.parquet"].to_pandas()
    assert scores_a[["doc_id", "tokens", "correct", "words", "bytes"]].equals(
        scores_b[["doc_id", "tokens", "correct", "words", "bytes"]])
    np.testing.assert_allclose(scores_a["loglik"], scores_b["loglik"], rtol=1e-6)
    metrics_a, metrics_b = a["metrics.json"], b["metrics.json"]
    assert metrics_a.keys() == metrics_b.keys()
    for key, value in metrics_a.items():
        assert metrics_b[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    summary_a, summary_b = a["summary.json"], b["summary.json"]
    assert summary_a.keys() == summary_b.keys()
    for key in COUNT_KEYS:
        assert summary_a[key] == summary_b[key], key
    for key in summary_a.keys() - set(COUNT_KEYS) - {"per_layer"}:
        assert summary_b[key] == pytest.approx(summary_a[key], rel=1e-6), key
    for layer_a, layer_b in zip(summary_a["per_layer"], summary_b["per_layer"]):
        assert layer_b == pytest.approx(layer_a, rel=1e-6)
