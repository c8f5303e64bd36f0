"""A tiny routable setup for route.py tests: an untrained demo-architecture MoE with its tokenizer, and a
prepared perplexity dataset (demo grammar and arithmetic documents cut into rolling windows), made in seconds."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
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
    from routelab import demo_corpus
    from routelab.data import document_table, load_texts, window_table
    from routelab.demo_model import build_model, train_tokenizer
    from routelab.io import write_json, write_parquet

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
    """route.py's arguments, as its command line would give them."""
    args = dict(model=str(model_dir), data=str(data_dir), routing=routing, null=routing.get("null_model"),
                out=str(out), batch_size=4, checkpoint_every=0, shard=None, attempt=1, dtype="float32",
                device="cpu", experts_implementation=None, sample_every=5, seed=0, threads=None)
    args.update(overrides)
    return argparse.Namespace(**args)


def read_run(run_dir: Path) -> dict:
    """Every output of a run: Parquet files as Arrow tables, JSON files as dicts."""
    files = {}
    for name in ("routing.parquet", "decisions.parquet", "scores.parquet"):
        files[name] = pq.read_table(run_dir / name)
    for name in ("metrics.json", "summary.json", "system.json", "provenance.json"):
        files[name] = json.loads((run_dir / name).read_text())
    return files
