"""Stage prepare_dataset: documents tokenized and cut into lm-evaluation-harness windows.

Prepared dataset layout (``results/{experiment}/data/{dataset}/``):

- ``documents.parquet``: ``doc_id, text, words, bytes`` (+ ``context, target`` for cloze tasks);
- ``windows.parquet``: ``window_id, doc_id, input_ids, labels`` (``labels == -100`` is context);
- ``calibration.parquet``: windows of the held-out calibration documents (for ``calibrate_null``);
- ``info.json``: counts and the preparation parameters, and ``skipped``: documents left out, by reason
  (``empty``: no text or whitespace only; ``no_tokens``: text the tokenizer encodes to nothing;
  ``cloze_no_context``: a cloze document of one word, with no context before its last word).

A document longer than the window is cut into several rolling windows, as lm-eval does; a one-token
document is scored (its token predicted from the prefix token: BOS, or EOS for a tokenizer without BOS).
Text is tokenized as lm-eval's HFLM with the same ``add_bos_token`` (``evaluation.add_bos_token``).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from routelab.data.loading import DatasetError, load_documents
from routelab.data.tasks import prepare_task
from routelab.data.windows import (
    IGNORE,
    cloze_window,
    count_bytes,
    count_words,
    encode_pair,
    encode_text,
    prefix_token_id,
    rolling_windows,
    split_cloze,
)
from routelab.io.files import write_json, write_parquet

log = logging.getLogger(__name__)

# What a dataset entry of the config means when it leaves a key out (the schema fills these for configs).
SPEC_DEFAULTS = {"task": "perplexity", "split": "test", "text_column": "text", "documents": 100,
                 "calibration_documents": 50}


def usable_documents(texts: list[str], tokenizer, task: str, skipped: Counter) -> list[str]:
    """``texts`` without the documents a task cannot score, each counted in ``skipped`` by reason."""
    kept = []
    for text in texts:
        if task == "cloze" and not text.rstrip().rpartition(" ")[0]:
            skipped["cloze_no_context"] += 1
        elif not tokenizer.encode(text, add_special_tokens=False):
            skipped["no_tokens"] += 1
        else:
            kept.append(text)
    return kept


def document_table(texts: list[str], task: str) -> pd.DataFrame:
    """Per-document counts on the original text (what word/byte perplexity divide by)."""
    rows = []
    for doc_id, text in enumerate(texts):
        row = {"doc_id": doc_id, "text": text, "words": count_words(text), "bytes": count_bytes(text)}
        if task == "cloze":
            row["context"], row["target"] = split_cloze(text)
        rows.append(row)
    return pd.DataFrame(rows)


def load_lm_eval_tokenizer(model: str | os.PathLike, add_bos_token: bool | None = None):
    """``model``'s tokenizer as lm-eval's HFLM loads it: ``add_bos_token`` True/False makes the tokenizer
    itself add (or not) its BOS token, as HFLM's ``AutoTokenizer.from_pretrained(..., add_bos_token=...)``."""
    from routelab.model.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    if add_bos_token is not None:
        # transformers' fast tokenizers rebuild their post-processor on this, exactly as for the from_pretrained kwarg.
        tokenizer.add_bos_token = add_bos_token
    return tokenizer


def window_table(documents: pd.DataFrame, tokenizer, task: str, max_len: int,
                 add_bos_token: bool | None = None) -> pd.DataFrame:
    """Tokenize documents as lm-eval's HFLM with ``add_bos_token`` and cut them into scored windows (see
    :mod:`routelab.data.windows`)."""
    prefix = prefix_token_id(tokenizer)
    rows = []
    for doc in documents.itertuples(index=False):
        if task == "cloze":
            ctx, cont = encode_pair(tokenizer, doc.context, doc.target, add_bos_token)
            windows = [cloze_window(ctx, cont, max_len, prefix)]
        else:
            windows = rolling_windows(encode_text(tokenizer, doc.text, add_bos_token), prefix, max_len)
        for inputs, labels in windows:
            rows.append({"window_id": len(rows), "doc_id": doc.doc_id, "input_ids": inputs, "labels": labels})
    return pd.DataFrame(rows, columns=["window_id", "doc_id", "input_ids", "labels"])


def resolve_window(requested: int | None, model: str | os.PathLike) -> int:
    """The window length: ``requested`` (at most the model's max positions), or the model's max positions."""
    from routelab.model.loading import load_config

    limit = int(getattr(load_config(model), "max_position_embeddings", 2048))
    if requested is not None and requested > limit:
        raise ValueError(f"evaluation.window: {requested} exceeds the model's max positions ({limit})")
    return requested or limit


def prepare_dataset(spec: dict[str, Any], model: str | os.PathLike, out: str | os.PathLike,
                    window: int | None = None, seed: int = 0, add_bos_token: bool | None = None) -> dict[str, Any]:
    """Load the dataset ``spec`` describes, tokenize it with ``model``'s tokenizer as lm-eval's HFLM with
    ``add_bos_token`` (None: lm-eval's default), cut it into windows of ``window`` tokens (default: the model's
    max positions) and write the layout above to ``out``; returns ``info.json``'s content. An lm-eval task
    (``source: lm_eval``) is prepared by :func:`routelab.data.tasks.prepare_task`."""
    if spec["source"] == "lm_eval":
        return prepare_task({**spec, "add_bos_token": add_bos_token}, out)
    spec = {**SPEC_DEFAULTS, **spec}
    task, n_eval, n_cal = spec["task"], spec["documents"], spec["calibration_documents"]
    tokenizer = load_lm_eval_tokenizer(model, add_bos_token)
    window = resolve_window(window, model)
    texts, skipped = load_documents(spec, n_eval, start=0, seed=seed, split="eval")
    # Demo calibration text comes from its own random stream; real data uses the documents after the eval ones.
    if spec["source"] == "demo":
        calibration, _ = load_documents(spec, n_cal, start=0, seed=seed, split="calibration")
    elif spec.get("calibration_split"):
        calibration, _ = load_documents({**spec, "split": spec["calibration_split"]}, n_cal, start=0)
    else:
        calibration, _ = load_documents(spec, n_cal, start=n_eval)
    texts = usable_documents(texts, tokenizer, task, skipped)
    calibration = usable_documents(calibration, tokenizer, "perplexity", Counter())
    if not texts:
        raise DatasetError(f"no document left to evaluate: skipped {dict(skipped)}")
    if sum(skipped.values()):
        log.warning("skipped documents: %s (counted in info.json)", dict(skipped))
    documents = document_table(texts, task)
    windows = window_table(documents, tokenizer, task, window, add_bos_token)
    cal_windows = window_table(document_table(calibration, "perplexity"), tokenizer, "perplexity", window,
                               add_bos_token)
    out = Path(out)
    write_parquet(out / "documents.parquet", documents)
    write_parquet(out / "windows.parquet", windows)
    write_parquet(out / "calibration.parquet", cal_windows)
    info = {"spec": spec, "task": task, "window": window, "documents": len(documents),
            "windows": len(windows), "scored_tokens": int(sum(sum(t != IGNORE for t in r) for r in windows["labels"])),
            "words": int(documents["words"].sum()), "bytes": int(documents["bytes"].sum()),
            "skipped": {reason: int(skipped[reason]) for reason in ("empty", "no_tokens", "cloze_no_context")},
            "calibration_documents": len(calibration), "calibration_windows": len(cal_windows),
            "tokenizer": str(model), "prefix_token_id": prefix_token_id(tokenizer), "add_bos_token": add_bos_token,
            "seed": seed}
    write_json(out / "info.json", info)
    return info
