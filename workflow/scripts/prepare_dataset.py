#!/usr/bin/env python
"""Stage prepare_dataset: load one dataset, tokenize it with the model's tokenizer, cut windows.

Reads the demo generator, a Hugging Face hub dataset or local text/json/parquet files (as the
dataset spec says) and writes into ``--out``:

- ``documents.parquet``  evaluation documents with word and byte counts (+ cloze context/target);
- ``windows.parquet``    scored windows (lm-eval rolling windows, or one cloze window per document);
- ``calibration.parquet`` windows of the held-out calibration documents;
- ``info.json``          counts and parameters.

    python workflow/scripts/prepare_dataset.py --model results/demo/model --out results/demo/data/code \
        --spec '{"source": "demo", "domain": "code", "documents": 100, "calibration_documents": 50}'
"""

import argparse
import logging

from routelab.cli import json_arg, run
from routelab.data.prepare import prepare_dataset

log = logging.getLogger("prepare_dataset")


def main(args: argparse.Namespace) -> None:
    add_bos_token = {None: None, "true": True, "false": False}[args.add_bos_token]
    info = prepare_dataset(args.spec, args.model, args.out, window=args.window, seed=args.seed,
                           add_bos_token=add_bos_token)
    log.info("prepared %s", info)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=json_arg, required=True, help="dataset spec (config datasets.NAME) as JSON")
    parser.add_argument("--model", required=True, help="model directory or hub id (its tokenizer is used)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--window", type=int, default=None, help="window length in tokens (default: model max)")
    parser.add_argument("--add-bos-token", choices=["true", "false"], default=None,
                        help="lm-eval HFLM's add_bos_token (config evaluation.add_bos_token; default: lm-eval's)")
    parser.add_argument("--seed", type=int, default=0)
    run(main, parser)
