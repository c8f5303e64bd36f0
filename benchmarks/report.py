#!/usr/bin/env python
"""Time the report stage end to end on OLMoE-sized aggregate tables.

Synthesises the aggregate stage's outputs for 20 routing configs x 3 datasets (16 MoE layers x 64
experts, 300 documents per dataset, per-document scores, expert counts and the co-activation of one
layer), and every analysis table (the routing analyses and the explorer's documents from short synthetic
routing logs of benchmarks/aggregate.py, whose tables have the full-size shape: one row per layer,
expert or bin; router diagnostics from random logits), then runs ``workflow/scripts/report.py`` on them
as Snakemake would, with the default bootstrap repetitions of the config schema, and prints the wall
time against the 60 s target.

    python benchmarks/report.py [--documents 300] [--repetitions N] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from routelab.config import section_defaults
from routelab.io.files import write_parquet
from routelab.report.aggregate import parameter_columns
from routelab.run.quality import quality_metrics

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 60.0
LAYERS, EXPERTS, TOP_K = 16, 64, 8
DATASETS = {"wikitext": "perplexity", "lambada": "cloze", "code": "perplexity"}
FLOPS_PER_EXPERT = 2 * 3 * 2048 * 1024 * LAYERS  # gated expert MLP, OLMoE-1B-7B shapes


def routing_configs() -> list[dict]:
    """20 configs: the model's top-8 (baseline), three other k, BH alpha x max_k, top-p, HC."""
    configs = [{"routing": "topk8", "method": "topk", "k": 8, "experts": 8.0}]
    configs += [{"routing": f"topk{k}", "method": "topk", "k": k, "experts": float(k)} for k in (2, 4, 6)]
    configs += [{"routing": f"bh_a{a}_k{m}", "method": "bh", "alpha": a, "min_k": 1, "max_k": m,
                 "experts": min(m, 1 + 14 * a)} for a in (0.05, 0.1, 0.2, 0.3, 0.5) for m in (8, 16)]
    configs += [{"routing": f"topp{p}", "method": "topp", "p": p, "min_k": 1, "max_k": 16, "experts": 2 + 12 * p}
                for p in (0.3, 0.5, 0.7)]
    configs += [{"routing": f"hc{a}", "method": "hc", "alpha0": a, "min_k": 1, "max_k": 16, "experts": 3 + 8 * a}
                for a in (0.3, 0.5, 0.7)]
    assert len(configs) == 20
    return configs


def synthesise(out_dir: Path, documents: int, seed: int = 0) -> None:
    """runs.parquet, scores.parquet, expert_counts.parquet and coactivation.parquet in ``out_dir``."""
    rng = np.random.default_rng(seed)
    runs, scores, counts, coactivation = [], [], [], []
    popularity = {d: rng.dirichlet(np.full(EXPERTS, 0.7), size=LAYERS) for d in DATASETS}
    # rolling-window documents score hundreds of tokens; a cloze document only its target word
    doc_tokens = {d: rng.integers(1, 4, documents) if task == "cloze" else rng.integers(30, 900, documents)
                  for d, task in DATASETS.items()}
    doc_difficulty = {d: rng.normal(2.2, 0.4, documents) for d in DATASETS}
    for config in routing_configs():
        experts = config["experts"]
        penalty = 0.25 * max(0.0, 8 - experts) / 8  # fewer experts cost a little log-likelihood
        for dataset, task in DATASETS.items():
            tokens = doc_tokens[dataset]
            nll = doc_difficulty[dataset] + penalty + rng.normal(0, 0.02, documents)
            doc = pd.DataFrame({"doc_id": np.arange(documents), "loglik": -nll * tokens, "tokens": tokens,
                                "correct": rng.random(documents) < 0.6 - penalty, "words": tokens // 1.3,
                                "bytes": tokens * 4})
            scores.append(doc.assign(routing=config["routing"], dataset=dataset))
            decisions = int(tokens.sum())
            layer_counts = np.array([rng.multinomial(int(experts * decisions), p) for p in popularity[dataset]])
            counts.append(pd.DataFrame({
                "routing": config["routing"], "dataset": dataset,
                "layer": np.repeat(np.arange(LAYERS), EXPERTS), "expert": np.tile(np.arange(EXPERTS), LAYERS),
                "count": layer_counts.ravel(), "decisions": decisions}))
            pairs = rng.poisson(decisions * experts * (experts - 1) / EXPERTS ** 2, (EXPERTS, EXPERTS))
            pairs = np.triu(pairs, 1) + np.triu(pairs, 1).T + np.diag(layer_counts[LAYERS // 2])
            expert, other = np.nonzero(pairs)
            coactivation.append(pd.DataFrame({"routing": config["routing"], "dataset": dataset,
                                              "layer": LAYERS // 2, "expert": expert, "other": other,
                                              "count": pairs[expert, other]}))
            spread = experts * 0.5 if config["method"] != "topk" else 0.0
            runs.append({
                "routing": config["routing"], "dataset": dataset, "method": config["method"],
                **{name: config.get(name) for name in parameter_columns()}, "task": task,
                **quality_metrics(doc, task), "num_layers": LAYERS, "num_experts": EXPERTS,
                "model_top_k": TOP_K, "total_decisions": decisions * LAYERS, "experts_mean": experts,
                "experts_std": spread, "ceiling_hit_rate": float(rng.uniform(0, 30)),
                "floor_hit_rate": float(rng.uniform(0, 60)),
                "active_expert_flops_per_token": FLOPS_PER_EXPERT * experts,
                "active_expert_flops_vs_topk": experts / TOP_K, "wall_time_s": decisions / (4000 / experts),
                "tokens_per_s": 4000 / experts * 8, "peak_rss_mb": 3000.0, "peak_cuda_mb": 15000 + 40 * experts})
    write_parquet(out_dir / "runs.parquet", pd.DataFrame(runs))
    write_parquet(out_dir / "scores.parquet", pd.concat(scores, ignore_index=True))
    write_parquet(out_dir / "expert_counts.parquet", pd.concat(counts, ignore_index=True))
    write_parquet(out_dir / "coactivation.parquet", pd.concat(coactivation, ignore_index=True))


def synthesise_analyses(out_dir: Path, tokens: int = 4096, seed: int = 0) -> None:
    """The analysis tables of the aggregate stage in ``out_dir``, for :func:`routing_configs` x DATASETS."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import aggregate as synthetic  # benchmarks/aggregate.py: routing logs in the route stage's format

    from routelab.report.diagnostics import layer_histograms, router_probabilities
    from routelab.report.explorer import collect_explorer
    from routelab.report.routing_analyses import collect_routing_analyses

    configs = routing_configs()
    run_dirs = synthetic.write_runs(out_dir.parent / "runs", len(configs) * len(DATASETS), tokens, LAYERS,
                                    EXPERTS, len(DATASETS))
    # the synthetic runs' names in creation order are the report's configs in routing_configs() order
    names = {}
    for dataset_index, dataset in enumerate(DATASETS):
        created = [d for d in run_dirs if d.name == synthetic.DATASETS[dataset_index]]
        names.update({(d.parent.name, d.name): (config["routing"], dataset) for d, config in zip(created, configs)})

    def renamed(table: pd.DataFrame) -> pd.DataFrame:
        keys = [names[key] for key in zip(table["routing"], table["dataset"])]
        return table.assign(routing=[k[0] for k in keys], dataset=[k[1] for k in keys])

    tables = collect_routing_analyses(run_dirs, "topk8", coactivation_layer=False, workers=2)
    tables["explorer"] = collect_explorer(run_dirs, 3, None)
    for name, table in tables.items():
        write_parquet(out_dir / f"{name}.parquet", renamed(table))
    rng = np.random.default_rng(seed)
    diagnostics = []
    for routing, dataset in names.values():  # 300 sampled tokens per run and layer, as decisions.parquet
        for layer in range(LAYERS):
            logits = rng.normal(0.0, 1.0 + layer / LAYERS, (300, EXPERTS))
            diagnostics.append(layer_histograms(router_probabilities(logits)).assign(
                routing=routing, dataset=dataset, layer=layer))
    write_parquet(out_dir / "router_diagnostics.parquet", pd.concat(diagnostics, ignore_index=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--documents", type=int, default=300, help="documents per dataset (default 300)")
    parser.add_argument("--repetitions", type=int, default=section_defaults("report")["bootstrap_repetitions"],
                        help="bootstrap repetitions (default: the config schema's default, %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="report.py --workers: 2, as the report rule runs it (threads: 2); 1 = one process")
    parser.add_argument("--keep", type=Path, help="write the synthetic tables and the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        synthesise(root / "aggregate", args.documents)
        synthesise_analyses(root / "aggregate")
        command = [sys.executable, str(REPO / "workflow/scripts/report.py"), "--runs",
                   str(root / "aggregate" / "runs.parquet"), "--plots-root", str(root / "plots"),
                   "--experiment", "benchmark", "--baseline", "topk8", "--repetitions", str(args.repetitions),
                   "--workers", str(args.workers), "--out-dir", str(root / "report")]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            sys.exit(f"report stage failed:\n{result.stderr[-4000:]}")
    print(f"report stage, 20 configs x 3 datasets ({LAYERS} layers x {EXPERTS} experts, {args.documents} "
          f"documents per dataset, {args.repetitions} bootstrap repetitions): {elapsed:.1f} s "
          f"= {elapsed / TARGET_S:.2f} x the {TARGET_S:.0f} s target; CPU time {cpu:.1f} s "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: a busy machine stretches wall time)")


if __name__ == "__main__":
    main()
