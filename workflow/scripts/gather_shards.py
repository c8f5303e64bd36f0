#!/usr/bin/env python
"""Stage gather_shards: merge the shards of one sharded run into the files an unsharded route writes.

Each ``--parts`` directory is one shard's output of ``route.py --shard I-of-N`` (in shard order).
Writes into ``--out`` what ``route.py`` writes for a whole dataset (see routelab.run.records):
``routing.parquet``, ``decisions.parquet`` and ``scores.parquet`` concatenated in shard order;
``summary.json`` from the summed recorder states; ``metrics.json`` recomputed from the merged
per-document scores; ``system.json`` (compute time summed, peak memory maxed); ``provenance.json``
(shard 1's, plus each shard's documents, windows and batch size).

    python workflow/scripts/gather_shards.py --data results/demo/data/code --out results/demo/runs/bh/code \
        --parts results/demo/shards/bh/code/1-of-2 results/demo/shards/bh/code/2-of-2
"""

import argparse

from routelab.cli import run
from routelab.run.records import gather_shards


def main(args: argparse.Namespace) -> None:
    gather_shards(args.parts, args.data, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", required=True, help="the shards' output directories, in shard order")
    parser.add_argument("--data", required=True, help="prepared dataset directory (its info.json counts the windows)")
    parser.add_argument("--out", required=True, help="run output directory")
    run(main, parser)
