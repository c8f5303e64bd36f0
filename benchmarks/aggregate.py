"""Scale check: the aggregate stage's collectors over many OLMoE-sized synthetic runs.

    python benchmarks/aggregate.py                                  # 60 runs x 300k tokens, 16 layers x 64 experts
    python benchmarks/aggregate.py --runs 4 --tokens 50000          # a quick look (extrapolated to the full size)
    python benchmarks/aggregate.py --keep /tmp/agg                  # keep (and reuse) the generated runs

Target (issue 17, 2 CPU cores): the aggregate stage (workflow/scripts/aggregate.py, run as the aggregate
rule runs it) over 60 runs (20 configs x 3 datasets, 16 layers x 64 experts, top-8 baseline, 300k tokens
each) in <= 120 s and <= 4 GB peak RSS of its processes (the script and its workers, summed, sampled every
20 ms). The runs are written in the route stage's formats (routing.parquet, decisions.parquet,
explorer.parquet, summary.json, metrics.json, scores.parquet); generating them is not timed. Each config
takes a prefix of one shared per-token expert ranking of its dataset (as routing rules over the same router
logits do): top-k configs a fixed k, adaptive ones a k that varies by token. Prints the script's log (its
stages' seconds), the wall time against the target (scaled by full-size tokens x runs / measured when run
smaller) and the peak.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.io.files import write_json, write_parquet
from routelab.record.decisions import SCHEMA as DECISIONS_SCHEMA
from routelab.record.routing_log import SCHEMA

TARGET_S, TARGET_GB = 120.0, 4.0
FULL_RUNS, FULL_TOKENS = 60, 300_000
DATASETS = ("wiki", "code", "math")
WINDOW = 2048  # tokens per window
MAX_K = 16  # the ranking kept per token: adaptive configs choose up to this many experts
VOCAB = 50_000
DICTIONARY_COLUMNS = ["window_id", "doc_id", "position", "token_id", "layer", "k"]
SAMPLE_EVERY, EXPLORER_DOCUMENTS = 100, 3  # the route stage's defaults (evaluation.decision_sample_every, ...)
RUN_FILES = ("routing.parquet", "decisions.parquet", "explorer.parquet", "summary.json", "metrics.json",
             "scores.parquet")
SCRIPT = Path(__file__).resolve().parents[1] / "workflow" / "scripts" / "aggregate.py"


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


def token_columns(token: np.ndarray, layer: np.ndarray, token_ids: np.ndarray) -> dict[str, pa.Array]:
    """The columns routing.parquet and decisions.parquet share, of rows (``token``, ``layer``): one
    document per window, every token a prefill."""
    phase = pa.DictionaryArray.from_arrays(pa.array(np.zeros(token.size, dtype=np.int8)),
                                           pa.array(["prefill", "decode"]))
    window = pa.array((token // WINDOW).astype(np.int32))
    return {"window_id": window, "doc_id": window, "position": pa.array((token % WINDOW).astype(np.int32)),
            "token_id": pa.array(token_ids[token].astype(np.int32)), "phase": phase,
            "layer": pa.array(layer.astype(np.int16))}


def routing_table(rank: np.ndarray, k: np.ndarray, token_ids: np.ndarray) -> pa.Table:
    """routing.parquet rows, token by token with every layer's row together, as the route stage writes."""
    layers, tokens, _ = rank.shape
    k_rows = k.T.ravel()  # [tokens * layers], token-major
    slots = np.arange(rank.shape[2])
    values = rank.transpose(1, 0, 2)[slots[None, None, :] < k.T[:, :, None]]
    offsets = np.concatenate([[0], np.cumsum(k_rows)]).astype(np.int32)
    weights = np.full(values.size, 0.1, dtype=np.float32)
    token = np.repeat(np.arange(tokens), layers)
    columns = {
        **token_columns(token, np.tile(np.arange(layers), tokens), token_ids),
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


def detail_table(rows: np.ndarray, rank: np.ndarray, k: np.ndarray, token_ids: np.ndarray, experts: int,
                 alpha: float | None, seed: int) -> pa.Table:
    """decisions.parquet rows (:data:`routelab.record.decisions.SCHEMA`) of the tokens ``rows``, every
    layer's row together: standard-normal logits, and for BH configs uniform p-values and the BH steps."""
    layers = rank.shape[0]
    rng = np.random.default_rng(seed)
    count = rows.size * layers
    token, layer = np.repeat(rows, layers), np.tile(np.arange(layers), rows.size)
    chosen_k = k[layer, token]
    logits = rng.standard_normal((count, experts)).astype(np.float32)
    slots = np.arange(rank.shape[2])
    selected = rank[layer, token][slots[None, :] < chosen_k[:, None]]
    offsets = pa.array(np.concatenate([[0], np.cumsum(chosen_k)]).astype(np.int32))

    def lists(values: np.ndarray, step: np.ndarray | int) -> pa.ListArray:
        bounds = np.arange(count + 1, dtype=np.int32) * step if np.isscalar(step) else step
        return pa.ListArray.from_arrays(pa.array(bounds), pa.array(values.ravel()))

    columns = {
        **token_columns(token, layer, token_ids), "k": pa.array(chosen_k.astype(np.int16)),
        "logit_mean": pa.array(logits.mean(axis=1)), "logit_std": pa.array(logits.std(axis=1)),
        "logit_min": pa.array(logits.min(axis=1)), "logit_max": pa.array(logits.max(axis=1)),
        "logits": lists(logits, experts),
        "selected": pa.ListArray.from_arrays(offsets, pa.array(selected.astype(np.int16))),
        "selected_weights": pa.ListArray.from_arrays(offsets, pa.array(np.full(selected.size, 0.1, np.float32))),
    }
    if alpha is None:
        for name in ("pvalues", "sorted_pvalues", "bh_thresholds"):
            columns[name] = pa.nulls(count, pa.list_(pa.float32()))
        columns["passing_rank"] = pa.nulls(count, pa.int16())
    else:
        pvalues = rng.random((count, experts), dtype=np.float32)
        thresholds = np.tile((np.arange(1, experts + 1) * alpha / experts).astype(np.float32), count)
        columns.update(pvalues=lists(pvalues, experts), sorted_pvalues=lists(np.sort(pvalues, axis=1), experts),
                       bh_thresholds=lists(thresholds, experts), passing_rank=pa.array(chosen_k.astype(np.int16)))
    return pa.Table.from_arrays([columns[field.name].cast(field.type) for field in DECISIONS_SCHEMA],
                                schema=DECISIONS_SCHEMA)


def write_runs(root: Path, runs: int, tokens: int, layers: int, experts: int, datasets: int) -> list[Path]:
    """``runs`` run directories under ``root`` (configs x datasets), their files reused when already there:
    routing.parquet, decisions.parquet (every 100th token, the route stage's default) and explorer.parquet
    (every token of the first 3 documents), summary.json, metrics.json, scores.parquet."""
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
            if all((run_dir / name).is_file() for name in RUN_FILES):
                continue
            if rank is None:
                rank = ranking(tokens, layers, experts, token_ids, seed=index)
            k = k_per_token(method, params, tokens, layers, seed=100 * index + number)
            run_dir.mkdir(parents=True, exist_ok=True)
            pq.write_table(routing_table(rank, k, token_ids), run_dir / "routing.parquet", row_group_size=1 << 20,
                           use_dictionary=DICTIONARY_COLUMNS)
            alpha = params.get("alpha") if method == "bh" else None
            for name, rows in (("decisions.parquet", np.arange(0, tokens, SAMPLE_EVERY)),
                               ("explorer.parquet", np.arange(min(tokens, EXPLORER_DOCUMENTS * WINDOW)))):
                pq.write_table(detail_table(rows, rank, k, token_ids, experts, alpha, seed=number),
                               run_dir / name, row_group_size=1 << 16)
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


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of ``process`` and all its descendants (a child that ends between the two calls
    counts as 0)."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_aggregate(run_dirs: list[Path], out_dir: Path, workers: int) -> tuple[float, int, str]:
    """``(seconds, peak bytes, log)`` of workflow/scripts/aggregate.py over ``run_dirs``, as the aggregate
    rule runs it; the peak is of the script's process tree, sampled every 20 ms."""
    command = [sys.executable, str(SCRIPT), "--runs", *map(str, run_dirs), "--baseline", "topk8",
               "--workers", str(workers), "--out-dir", str(out_dir)]
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        process, peak = psutil.Process(child.pid), 0
        while child.poll() is None:
            try:
                peak = max(peak, tree_rss(process))
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read()
    if child.wait() != 0:
        raise SystemExit(f"aggregate.py failed (exit {child.returncode}):\n{text}")
    return seconds, peak, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=FULL_RUNS)
    parser.add_argument("--tokens", type=int, default=FULL_TOKENS, help="tokens per run")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--datasets", type=int, default=len(DATASETS), choices=range(1, len(DATASETS) + 1))
    parser.add_argument("--keep", type=Path, help="write the runs here (and reuse those already there)")
    parser.add_argument("--workers", type=int, default=2,
                        help="the script's --workers (the rule passes its threads: 2 given 4 or more cores)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        print(f"generating {args.runs} runs x {args.tokens} tokens x {args.layers} layers x {args.experts} experts "
              f"in {root}", file=sys.stderr)
        run_dirs = write_runs(root, args.runs, args.tokens, args.layers, args.experts, args.datasets)
        seconds, peak, text = run_aggregate(run_dirs, Path(scratch) / "aggregate", args.workers)
    print("".join(line + "\n" for line in text.splitlines() if " INFO " in line), end="")
    scale = (FULL_RUNS * FULL_TOKENS * 16) / (len(run_dirs) * args.tokens * args.layers)
    print(f"aggregate.py --workers {args.workers}: {seconds:.1f} s"
          + (f"; x{scale:.1f} to 60 runs x 300k tokens x 16 layers: ~{seconds * scale:.0f} s" if scale != 1 else "")
          + f" = {seconds * scale / TARGET_S:.2f} of the {TARGET_S:.0f} s target; peak RSS of its processes "
          f"{peak / 2 ** 30:.2f} GB (target {TARGET_GB:.0f} GB)")


if __name__ == "__main__":
    main()
