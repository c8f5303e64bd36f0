#!/usr/bin/env python
"""Stage gather_shards: merge the shards of one sharded run into the files an unsharded route writes.

Each ``--parts`` directory is one shard's output of ``route.py --shard I-of-N`` (in shard order).
Writes into ``--out`` what ``route.py`` writes for a whole dataset (see routelab.shards):
``routing.parquet``, ``decisions.parquet`` and ``scores.parquet`` concatenated in shard order;
``summary.json`` from the summed recorder states; ``metrics.json`` recomputed from the merged
per-document scores; ``system.json`` (compute time summed, peak memory maxed); ``provenance.json``
(shard 1's, plus each shard's documents, windows and batch size).

    python workflow/scripts/gather_shards.py --data results/demo/data/code --out results/demo/runs/bh/code \
        --parts results/demo/shards/bh/code/1-of-2 results/demo/shards/bh/code/2-of-2
"""

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from routelab.cli import run
from routelab.io import read_json, write_parquet
from routelab.recording import merge_states
from routelab.shards import (check_parts, concat_parquet, merge_system, run_metrics, run_summary,
                             write_run_records)

log = logging.getLogger("gather_shards")


def load_state(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as saved:
        return {name: saved[name] for name in saved.files}


def main(args: argparse.Namespace) -> None:
    dirs = [Path(p) for p in args.parts]
    parts = [read_json(d / "part.json") for d in dirs]
    info = read_json(Path(args.data) / "info.json")
    check_parts(parts, info["windows"])
    first = parts[0]
    out = Path(args.out)

    concat_parquet([d / "routing.parquet" for d in dirs], out / "routing.parquet")
    concat_parquet([d / "decisions.parquet" for d in dirs], out / "decisions.parquet")
    scores = pd.concat([pd.read_parquet(d / "scores.parquet") for d in dirs], ignore_index=True)
    write_parquet(out / "scores.parquet", scores)
    state = merge_states([load_state(d / "accumulators.npz") for d in dirs])
    summary = run_summary(first["summary_head"], state, first["min_k"], first["max_k"],
                          first["expert_flops_per_selection"])
    head = first["summary_head"]
    metrics = run_metrics(head["routing"], head["dataset"], first["task"], scores)
    system = merge_system([p["system"] for p in parts])
    provenance = {**first["provenance"],
                  "shards": [{"shard": p["shard"], "documents": p["documents"], "windows": p["windows"],
                              "batch_size": p["provenance"]["batch_size"]} for p in parts]}
    write_run_records(out, summary=summary, provenance=provenance, system=system, metrics=metrics,
                      k_hist=state["k_hist"])
    log.info("merged %d shards: %d documents; metrics %s", len(parts), len(scores), metrics)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", required=True, help="the shards' output directories, in shard order")
    parser.add_argument("--data", required=True, help="prepared dataset directory (its info.json counts the windows)")
    parser.add_argument("--out", required=True, help="run output directory")
    run(main, parser)
