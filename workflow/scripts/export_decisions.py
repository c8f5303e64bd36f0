#!/usr/bin/env python
"""Export a run's sampled routing decisions as the JSON routing logs researchers read.

Reads ``--run-dir`` (``decisions.parquet``, ``summary.json``, ``provenance.json``) and writes into
``--out-dir``:

- ``decisions_detailed.json``  one entry per sampled (token, layer): logit and p-value stats, BH steps;
- ``decisions_summary.json``   experts-selected statistics of all decisions, p-value mean/std.

    python workflow/scripts/export_decisions.py --run-dir results/demo/runs/bh/code \
        --out-dir results/demo/exports/bh/code
"""

import argparse
import logging
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from routelab.cli import run
from routelab.io.files import read_json, write_json
from routelab.record.json_logs import detailed_log, summary_log

log = logging.getLogger("export_decisions")


def main(args: argparse.Namespace) -> None:
    run_dir = Path(args.run_dir).resolve()
    decisions = pq.read_table(run_dir / "decisions.parquet")
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "provenance.json")["routing"]
    name = args.experiment_name or f"{run_dir.parent.name}/{run_dir.name}"  # runs/{routing}/{dataset}
    timestamp = datetime.now(UTC).isoformat(timespec="seconds")
    out = Path(args.out_dir)
    write_json(out / "decisions_detailed.json",
               detailed_log(decisions, name, config, summary["total_decisions"], timestamp))
    write_json(out / "decisions_summary.json", summary_log(summary, decisions.num_rows, name, config, timestamp))
    log.info("exported %d sampled decisions of %d (%s) to %s", decisions.num_rows, summary["total_decisions"],
             name, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="run directory (decisions.parquet, summary.json, ...)")
    parser.add_argument("--experiment-name", default=None, help="name in the logs; default: <routing>/<dataset>")
    parser.add_argument("--out-dir", required=True, help="directory for the two JSON files")
    run(main, parser)
