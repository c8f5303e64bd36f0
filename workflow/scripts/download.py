#!/usr/bin/env python
"""Stage download: fetch a hub model, one hub dataset or one lm-eval task's data into resources/ (needs
internet; no GPU).

    python workflow/scripts/download.py model --id allenai/OLMoE-1B-7B-0924 \
        --out resources/models/allenai/OLMoE-1B-7B-0924
    python workflow/scripts/download.py dataset --out resources/datasets/lambada \
        --spec '{"source": "hub", "path": "EleutherAI/lambada_openai", "name": "default", "split": "test"}'

    python workflow/scripts/download.py task --out resources/lm_eval/arc.json \
        --spec '{"source": "lm_eval", "task": "arc_easy"}'

A model directory gets the weights, config and tokenizer (``huggingface_hub.snapshot_download``); a
dataset directory one ``save_to_disk`` folder per split the spec uses (``split``, ``calibration_split``).
Both carry ``download.json`` and appear only when complete; a task's data goes into lm-eval's (``datasets``')
cache under resources/lm_eval/, and ``--out`` names what was fetched. Set ``HF_TOKEN`` for gated models.
"""

import argparse
import logging

from routelab.cli import json_arg, run
from routelab.data.tasks import download_task
from routelab.download import DownloadError, download_dataset, download_model

log = logging.getLogger("download")


def main(args: argparse.Namespace) -> None:
    try:
        if args.kind == "model":
            download_model(args.id, args.out, revision=args.revision)
        elif args.kind == "task":
            download_task(args.spec, args.out)
        else:
            download_dataset(args.spec, args.out)
    except DownloadError as exc:  # one line on what failed and why, not the hub's traceback
        raise SystemExit(f"error: {exc}") from None
    log.info("saved %s to %s", args.kind, args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    model = sub.add_parser("model", help="a hub model: weights, config, tokenizer")
    model.add_argument("--id", required=True, help="hub id, e.g. allenai/OLMoE-1B-7B-0924")
    model.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    model.add_argument("--out", required=True, help="output directory (resources/models/<id>)")
    dataset = sub.add_parser("dataset", help="a hub dataset: every split the spec uses")
    dataset.add_argument("--spec", type=json_arg, required=True, help="dataset spec (config datasets.NAME) as JSON")
    dataset.add_argument("--out", required=True, help="output directory (resources/datasets/<name>)")
    task = sub.add_parser("task", help="an lm-eval task's (or group's) data, into resources/lm_eval/")
    task.add_argument("--spec", type=json_arg, required=True, help="dataset spec (config datasets.NAME) as JSON")
    task.add_argument("--out", required=True, help="the record of what was fetched (resources/lm_eval/<name>.json)")
    run(main, parser)
