"""Scale check: the aggregate stage's collectors over many OLMoE-sized synthetic runs.

    python benchmarks/aggregate.py                                  # 60 runs x 300k tokens, 16 layers x 64 experts
    python benchmarks/aggregate.py --runs 4 --tokens 50000          # a quick look (extrapolated to the full size)
    python benchmarks/aggregate.py --keep /tmp/agg                  # keep (and reuse) the generated runs

Target (issue 17, 2 CPU cores): collect_runs + collect_layers + collect_scores + collect_expert_counts +
collect_coactivation + collect_routing_analyses over 60 runs (20 configs x 3 datasets, 16 layers x 64
experts, top-8 baseline, 300k tokens each) in <= 120 s and <= 4 GB peak RSS. The runs are written in the
route stage's formats (routing.parquet with :data:`routelab.record.routing_log.SCHEMA`, summary.json,
metrics.json, scores.parquet); generating them is not timed. Each config takes a prefix of one shared
per-token expert ranking of its dataset (as routing rules over the same router logits do): top-k configs
a fixed k, adaptive ones a k that varies by token. Prints each collector's seconds, the total against
the target (scaled by full-size tokens x runs / measured when run smaller) and the peak RSS.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.io.files import write_json, write_parquet
from routelab.record.routing_log import SCHEMA
from routelab.report.aggregate import (
    collect_coactivation,
    collect_expert_counts,
    collect_layers,
    collect_runs,
    collect_scores,
)
from routelab.report.routing_analyses import collect_routing_analyses

TARGET_S, TARGET_GB = 120.0, 4.0
FULL_RUNS, FULL_TOKENS = 60, 300_000
DATASETS = ("wiki", "code", "math")
WINDOW = 2048  # tokens per window
MAX_K = 16  # the ranking kept per token: adaptive configs choose up to this many experts
VOCAB = 50_000
DICTIONARY_COLUMNS = ["window_id", "doc_id", "position", "token_id", "layer", "k"]


def configs(count: int) -> list[tuple[str, str, dict]]:
    """``count`` routing configs, the baseline topk8 first: top-k ones, then adaptive ones (k per token)."""
    fixed = [("topk4", "topk", {"k": 4}), ("topk2", "topk", {"k": 2})]
    adaptive = [(f"adaptive{i}", "bh", {"alpha": round(0.05 * (i + 1), 2), "min_k": 1, "max_k": MAX_K})
                for i in range(max(1, count))]
    return ([("topk8", "topk", {"k": 8}), adaptive[0], *fixed, *adaptive[1:]])[:count]


def ranking(tokens: int, layers: int, experts: int, token_ids: np.ndarray, seed: int) -> np.ndarray:
    """``[layers, tokens, MAX_K]`` int16 experts per token, most preferred first: Gumbel top-k of logits
    with a per-token-id bias, so that experts specialise on token ids."""
    rng = np.random.default_rng(seed)
    out = np.empty((layers, tokens, min(MAX_K, experts)), dtype=np.int16)
    for layer in range(layers):
        bias = rng.standard_normal((1024, experts)).astype(np.float32) * 2
        logits = bias[token_ids % 1024] + rng.gumbel(size=(tokens, experts)).astype(np.float32)
        top = np.argpartition(-logits, out.shape[2] - 1, axis=1)[:, : out.shape[2]]
        order = np.argsort(-np.take_along_axis(logits, top, axis=1), axis=1)
        out[layer] = np.take_along_axis(top, order, axis=1)
    return out


def k_per_token(method: str, params: dict, tokens: int, layers: int, seed: int) -> np.ndarray:
    """``[layers, tokens]`` experts per token."""
    if method == "topk":
        return np.full((layers, tokens), params["k"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    mean = 1 + 14 * params["alpha"]
    return np.clip(rng.poisson(mean, size=(layers, tokens)), 1, MAX_K).astype(np.int64)


def routing_table(rank: np.ndarray, k: np.ndarray, token_ids: np.ndarray) -> pa.Table:
    """routing.parquet rows, token by token with every layer's row together, as the route stage writes."""
    layers, tokens, _ = rank.shape
    k_rows = k.T.ravel()  # [tokens * layers], token-major
    slots = np.arange(rank.shape[2])
    values = rank.transpose(1, 0, 2)[slots[None, None, :] < k.T[:, :, None]]
    offsets = np.concatenate([[0], np.cumsum(k_rows)]).astype(np.int32)
    weights = np.full(values.size, 0.1, dtype=np.float32)
    token = np.repeat(np.arange(tokens), layers)
    phase = pa.DictionaryArray.from_arrays(pa.array(np.zeros(token.size, dtype=np.int8)),
                                           pa.array(["prefill", "decode"]))
    columns = {
        "window_id": pa.array((token // WINDOW).astype(np.int32)),
        "doc_id": pa.array((token // WINDOW).astype(np.int32)),
        "position": pa.array((token % WINDOW).astype(np.int32)),
        "token_id": pa.array(token_ids[token].astype(np.int32)),
        "phase": phase, "layer": pa.array(np.tile(np.arange(layers, dtype=np.int16), tokens)),
        "k": pa.array(k_rows.astype(np.int16)),
        "experts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.astype(np.int16))),
        "weights": pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights)),
    }
    return pa.Table.from_arrays([columns[field.name].cast(field.type) for field in SCHEMA], schema=SCHEMA)


def summary(routing: str, dataset: str, method: str, params: dict, k: np.ndarray, rank: np.ndarray,
            experts: int) -> dict:
    layers, tokens = k.shape
    per_layer, counts = [], []
    for layer in range(layers):
        chosen = rank[layer][np.arange(rank.shape[2])[None, :] < k[layer][:, None]]
        counts.append(np.bincount(chosen, minlength=experts).tolist())
        per_layer.append({"layer": layer, "decisions": tokens, "experts_mean": float(k[layer].mean()),
                          "experts_std": float(k[layer].std()), "experts_median": float(np.median(k[layer])),
                          "experts_min": int(k[layer].min()), "experts_max": int(k[layer].max()),
                          "ceiling_hit_rate": 100.0 * float((k[layer] == k.max()).mean()),
                          "floor_hit_rate": 100.0 * float((k[layer] == k.min()).mean())})
    histogram = np.bincount(k.ravel())
    return {"routing": routing, "dataset": dataset, "method": method, "params": params,
            "num_layers": layers, "num_experts": experts, "model_top_k": 8, "total_decisions": int(k.size),
            "experts_mean": float(k.mean()), "experts_std": float(k.std()), "experts_median": float(np.median(k)),
            "experts_min": int(k.min()), "experts_max": int(k.max()), "min_k": int(k.min()), "max_k": int(k.max()),
            "per_layer": per_layer, "k_histogram": {str(i): int(c) for i, c in enumerate(histogram) if c},
            "expert_counts": counts, "active_expert_flops_per_token": 1000.0 * float(k.mean()),
            "active_expert_flops_vs_topk": float(k.mean()) / 8}


def write_runs(root: Path, runs: int, tokens: int, layers: int, experts: int, datasets: int) -> list[Path]:
    """``runs`` run directories under ``root`` (configs x datasets), reused when already there."""
    per_dataset = -(-runs // datasets)
    run_dirs = []
    for index, dataset in enumerate(DATASETS[:datasets]):
        chosen = configs(per_dataset)[: max(0, min(per_dataset, runs - index * per_dataset))]
        if not chosen:
            continue
        token_ids = np.random.default_rng(index).zipf(1.3, size=tokens) % VOCAB
        rank = None
        for number, (routing, method, params) in enumerate(chosen):
            run_dir = root / "runs" / routing / dataset
            run_dirs.append(run_dir)
            if (run_dir / "routing.parquet").is_file():
                continue
            if rank is None:
                rank = ranking(tokens, layers, experts, token_ids, seed=index)
            k = k_per_token(method, params, tokens, layers, seed=100 * index + number)
            run_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(routing_table(rank, k, token_ids), run_dir / "routing.parquet", row_group_size=1 << 20,
                           use_dictionary=DICTIONARY_COLUMNS)
            write_json(run_dir / "summary.json", summary(routing, dataset, method, params, k, rank, experts))
            documents = tokens // WINDOW + 1
            write_json(run_dir / "metrics.json", {"routing": routing, "dataset": dataset, "task": "perplexity",
                                                  "documents": documents, "tokens": tokens, "perplexity": 10.0,
                                                  "nll_per_token": 2.3})
            doc_tokens = np.full(documents, WINDOW)
            write_parquet(run_dir / "scores.parquet", pd.DataFrame({
                "doc_id": np.arange(documents), "loglik": -2.3 * doc_tokens, "tokens": doc_tokens,
                "correct": np.zeros(documents, dtype=bool), "words": doc_tokens, "bytes": 4 * doc_tokens}))
            print(f"  wrote {run_dir.relative_to(root)}", file=sys.stderr)
    return run_dirs


def timed(name: str, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"{name:28s} {seconds:8.2f} s")
    return result, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=FULL_RUNS)
    parser.add_argument("--tokens", type=int, default=FULL_TOKENS, help="tokens per run")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--datasets", type=int, default=len(DATASETS), choices=range(1, len(DATASETS) + 1))
    parser.add_argument("--keep", type=Path, help="write the runs here (and reuse those already there)")
    parser.add_argument("--workers", type=int, default=2,
                        help="processes of collect_routing_analyses (the aggregate rule gives it its 2 threads)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        print(f"generating {args.runs} runs x {args.tokens} tokens x {args.layers} layers x {args.experts} experts "
              f"in {root}", file=sys.stderr)
        # in a child process, so that the peak RSS below is the collectors' alone
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            run_dirs = pool.apply(write_runs, (root, args.runs, args.tokens, args.layers, args.experts,
                                                   args.datasets))
        total = 0.0
        for name, function in (("collect_runs", collect_runs), ("collect_layers", collect_layers),
                               ("collect_scores", collect_scores), ("collect_expert_counts", collect_expert_counts)):
            total += timed(name, function, run_dirs)[1]
        coactivation = timed("collect_coactivation", collect_coactivation, run_dirs)[1]
        tables, analyses = timed("collect_routing_analyses", collect_routing_analyses, run_dirs, "topk8",
                                 coactivation_layer=None, workers=args.workers)
    # this process and its largest child (a worker, or the generator); the workers run at once, so the
    # machine's peak is at most this process's plus workers x the largest child's
    own_gb, child_gb = (resource.getrusage(who).ru_maxrss / 2 ** 20
                        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    peak_gb = own_gb + (args.workers * child_gb if args.workers > 1 else 0.0)
    scale = (FULL_RUNS * FULL_TOKENS * 16) / (len(run_dirs) * args.tokens * args.layers)
    for label, seconds in (("total, co-activation from the analyses' read", total + analyses),
                           ("total, with collect_coactivation", total + coactivation + analyses)):
        print(f"{label}: {seconds:.2f} s; x{scale:.1f} to 60 runs x 300k tokens x 16 layers: ~{seconds * scale:.0f} s "
              f"= {seconds * scale / TARGET_S:.2f} of the {TARGET_S:.0f} s target")
    print(f"peak RSS {peak_gb:.2f} GB at most (this process {own_gb:.2f}, largest child {child_gb:.2f}; target "
          f"{TARGET_GB:.0f} GB); tables: "
          + ", ".join(f"{name} {len(table)}" for name, table in tables.items()))


if __name__ == "__main__":
    main()
