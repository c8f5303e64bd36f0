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
from pathlib import Path

from routelab.cli import json_arg, run
from routelab.data import document_table, load_texts, window_table
from routelab.io import write_json, write_parquet

log = logging.getLogger("prepare_dataset")


def resolve_window(requested: int | None, model: str) -> int:
    from transformers import AutoConfig

    limit = int(getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", 2048))
    if requested is not None and requested > limit:
        raise ValueError(f"evaluation.window: {requested} exceeds the model's max positions ({limit})")
    return requested or limit


def main(args: argparse.Namespace) -> None:
    from routelab.modeling import load_tokenizer

    spec = {"task": "perplexity", "split": "test", "text_column": "text", "documents": 100,
            "calibration_documents": 50, **args.spec}
    task, n_eval, n_cal = spec["task"], spec["documents"], spec["calibration_documents"]
    tokenizer = load_tokenizer(args.model)
    window = resolve_window(args.window, args.model)
    texts = load_texts(spec, n_eval, start=0, seed=args.seed, split="eval")
    # Demo calibration text comes from its own random stream; real data uses the documents after the eval ones.
    if spec["source"] == "demo":
        calibration = load_texts(spec, n_cal, start=0, seed=args.seed, split="calibration")
    elif spec.get("calibration_split"):
        calibration = load_texts({**spec, "split": spec["calibration_split"]}, n_cal, start=0)
    else:
        calibration = load_texts(spec, n_cal, start=n_eval)
    documents = document_table(texts, task)
    windows = window_table(documents, tokenizer, task, window)
    cal_windows = window_table(document_table(calibration, "perplexity"), tokenizer, "perplexity", window)

    out = Path(args.out)
    write_parquet(out / "documents.parquet", documents)
    write_parquet(out / "windows.parquet", windows)
    write_parquet(out / "calibration.parquet", cal_windows)
    info = {"spec": spec, "task": task, "window": window, "documents": len(documents),
            "windows": len(windows), "scored_tokens": int(sum(sum(t != -100 for t in r) for r in windows["labels"])),
            "words": int(documents["words"].sum()), "bytes": int(documents["bytes"].sum()),
            "calibration_documents": len(calibration), "calibration_windows": len(cal_windows),
            "tokenizer": str(args.model), "seed": args.seed}
    write_json(out / "info.json", info)
    log.info("prepared %s", info)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=json_arg, required=True, help="dataset spec (config datasets.NAME) as JSON")
    parser.add_argument("--model", required=True, help="model directory or hub id (its tokenizer is used)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--window", type=int, default=None, help="window length in tokens (default: model max)")
    parser.add_argument("--seed", type=int, default=0)
    run(main, parser)
