#!/usr/bin/env python
"""Time plot_run (the whole script: start-up, imports, reading, ten figures, index.json) per run.

Two modes, both pinned to one CPU core (the plot_run rule asks for 1 thread):

- demo (default): every run directory under ``results/{experiment}/runs`` of a finished pipeline,
  with the demo tokenizer; prints each run's wall and CPU seconds and the ratio to the 5 s target.
- ``--synthetic-tokens N``: one synthetic OLMoE-shaped BH run (16 layers, 64 experts, N tokens,
  so 16 N rows in routing.parquet; a decision sampled every 100th token) written to a temporary
  directory first (not timed), to check that a real model's run stays fast and memory stays bounded.

    python benchmarks/plot_run.py [--experiment demo] [--synthetic-tokens 300000]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.record.decisions import SCHEMA as DECISIONS_SCHEMA
from routelab.record.routing_log import SCHEMA as ROUTING_SCHEMA

TARGET_S = 5.0
REPO = Path(__file__).resolve().parents[1]


def time_plot_run(run_dir: Path, out_dir: Path, model: str | None) -> tuple[float, float, int]:
    """(wall s, CPU s, MiB) of one plot_run.py process pinned to one core; the MiB are the largest peak
    RSS of any plot_run so far (what getrusage reports for children)."""
    cmd = [sys.executable, str(REPO / "workflow/scripts/plot_run.py"), "--run-dir", str(run_dir),
           "--out-dir", str(out_dir)]
    if model:
        cmd += ["--model", model]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True,
                   preexec_fn=(lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
                   if hasattr(os, "sched_setaffinity") else None)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss // 1024


def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.ListArray:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def synthetic_run(run_dir: Path, tokens: int, layers: int = 16, experts: int = 64, seed: int = 0) -> None:
    """An OLMoE-shaped BH run: k ~ 1 + geometric, Zipf token ids, uniform-ish p-values."""
    rng = np.random.default_rng(seed)
    run_dir.mkdir(parents=True)
    rows = tokens * layers
    k = np.minimum(rng.geometric(0.4, rows), 8).astype(np.int16)
    chosen = rng.integers(0, experts, int(k.sum())).astype(np.int16)  # repeats within a token do not matter here
    token_id = np.repeat(np.minimum(rng.zipf(1.3, tokens), 50_000) - 1, layers).astype(np.int32)
    position = np.repeat(np.arange(tokens) % 2048, layers).astype(np.int32)
    window = np.repeat(np.arange(tokens) // 2048, layers).astype(np.int32)
    table = pa.Table.from_arrays(
        [pa.array(window), pa.array(window), pa.array(position), pa.array(token_id),
         pa.array(np.tile(np.arange(layers), tokens).astype(np.int16)), pa.array(k),
         list_array(k, chosen), list_array(k, rng.random(int(k.sum())).astype(np.float32) / 8)],
        schema=ROUTING_SCHEMA)
    pq.write_table(table, run_dir / "routing.parquet", compression="zstd")

    sampled = np.arange(0, tokens, 100)
    n = sampled.size * layers
    logits = rng.normal(size=(n, experts)).astype(np.float32)
    pvalues = (rng.random((n, experts)) ** 1.2).astype(np.float32)  # uniform with an excess near 0
    sorted_p = np.sort(pvalues, axis=1)
    thresholds = (np.arange(1, experts + 1) * 0.1 / experts).astype(np.float32)
    below = sorted_p <= thresholds
    passing = np.where(below.any(axis=1), experts - np.argmax(below[:, ::-1], axis=1), 0).astype(np.int16)
    dk = np.clip(passing, 1, 8).astype(np.int16)
    flat = lambda m: list_array(np.full(n, m.shape[1]), m.ravel())  # noqa: E731
    decisions = pa.Table.from_arrays(
        [pa.array(np.repeat(sampled // 2048, layers).astype(np.int32)),
         pa.array(np.repeat(sampled // 2048, layers).astype(np.int32)),
         pa.array(np.repeat(sampled % 2048, layers).astype(np.int32)),
         pa.array(token_id[sampled * layers].repeat(layers)),
         pa.array(np.tile(np.arange(layers), sampled.size).astype(np.int16)), pa.array(dk),
         pa.array(logits.mean(1)), pa.array(logits.std(1)), pa.array(logits.min(1)), pa.array(logits.max(1)),
         flat(logits), flat(pvalues), flat(sorted_p), flat(np.tile(thresholds, (n, 1))), pa.array(passing),
         list_array(dk, np.concatenate([np.argsort(p)[:m] for p, m in zip(pvalues, dk)]).astype(np.int16)),
         list_array(dk, rng.random(int(dk.sum())).astype(np.float32))],
        schema=DECISIONS_SCHEMA)
    pq.write_table(decisions, run_dir / "decisions.parquet", compression="zstd")

    layer = np.tile(np.arange(layers), tokens)
    counts = np.zeros((layers, experts), dtype=np.int64)
    np.add.at(counts, (np.repeat(layer, k), chosen), 1)
    values, hist = np.unique(k, return_counts=True)
    summary = {"routing": "bh_synthetic", "dataset": "synthetic", "method": "bh",
               "params": {"alpha": 0.1, "min_k": 1, "max_k": 8}, "num_layers": layers, "num_experts": experts,
               "min_k": 1, "max_k": 8, "k_histogram": {str(v): int(c) for v, c in zip(values, hist)},
               "expert_counts": counts.tolist(),
               "per_layer": [{"layer": i, "decisions": tokens} for i in range(layers)]}
    (run_dir / "summary.json").write_text(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="demo")
    parser.add_argument("--synthetic-tokens", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic_tokens:
            run_dirs, model = [Path(tmp) / "run"], None
            synthetic_run(run_dirs[0], args.synthetic_tokens)
            print(f"synthetic run: {args.synthetic_tokens:,} tokens x 16 layers = "
                  f"{16 * args.synthetic_tokens:,} routing rows")
        else:
            root = REPO / "results" / args.experiment
            run_dirs = sorted(p.parent for p in (root / "runs").glob("*/*/summary.json"))
            model = str(root / "model") if (root / "model" / "tokenizer.json").is_file() else None
            if not run_dirs:
                sys.exit(f"no finished runs under {root / 'runs'}: run the pipeline first")
        walls, cpus = [], []
        for run_dir in run_dirs:
            wall, cpu, rss = time_plot_run(run_dir, Path(tmp) / "plots" / run_dir.parent.name / run_dir.name, model)
            walls.append(wall)
            cpus.append(cpu)
            name = "synthetic" if args.synthetic_tokens else f"{run_dir.parent.name}/{run_dir.name}"
            print(f"{name}: {wall:.2f} s wall, {cpu:.2f} s CPU, peak RSS so far {rss} MiB, "
                  f"CPU / target {cpu / TARGET_S:.2f}")
        print(f"median over {len(run_dirs)} run(s): {np.median(walls):.2f} s wall, {np.median(cpus):.2f} s CPU "
              f"(target {TARGET_S:.0f} s; CPU / target {np.median(cpus) / TARGET_S:.2f})")


if __name__ == "__main__":
    main()
