"""Shards of a dataset and the parts of a run: split evaluation windows by whole documents, merge parts.

A dataset too big for one job is evaluated in ``n`` shards, named like Snakemake's scatter items
``"{i}-of-{n}"`` (``i`` from 1). A shard is a contiguous run of whole documents (a document's
windows never straddle two shards), balanced by token count, so concatenating the shards' outputs in
shard order gives the rows of one unsharded run in the same order.

A run's result is assembled from parts (the chunks of a checkpointed run, or the shards of a sharded
one) by the functions of :mod:`routelab.run.records`, so the two paths cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the Snakefile imports this module: keep torch and pandas out of its start-up
    import pandas as pd

SHARD_NAME = re.compile(r"^([0-9]+)-of-([0-9]+)$")


def shard_name(index: int, count: int) -> str:
    """``"{index}-of-{count}"``, 1-based as Snakemake's scatter items."""
    return f"{index}-of-{count}"


def parse_shard(name: str) -> tuple[int, int]:
    """``"2-of-4"`` -> ``(2, 4)``; a bad name raises naming it and the valid form."""
    match = SHARD_NAME.match(str(name))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ValueError(f"--shard: {name!r} is not valid; use I-of-N with 1 <= I <= N, e.g. 2-of-4")
    return int(match.group(1)), int(match.group(2))


def shard_bounds(doc_tokens: Sequence[int], shards: int) -> np.ndarray:
    """Document index boundaries ``[shards + 1]`` (shard i holds documents ``bounds[i]:bounds[i+1]``).

    ``doc_tokens [documents]``: tokens per document in evaluation order. Each shard starts at the first
    document that begins at or after its equal share of the tokens, and holds at least one document.
    """
    count = len(doc_tokens)
    if shards < 1 or shards > count:
        raise ValueError(f"shards: {shards} is not valid for {count} documents; need 1 <= shards <= documents "
                         "(a shard holds whole documents)")
    starts = np.concatenate([[0], np.cumsum(doc_tokens, dtype=np.int64)])  # tokens before document j
    cuts = np.searchsorted(starts, starts[-1] * np.arange(1, shards) / shards, side="left")
    bounds = [0]
    for i, cut in enumerate(cuts, start=1):
        # at least one document in this shard and in each later one
        bounds.append(int(min(max(cut, bounds[-1] + 1), count - (shards - i))))
    return np.asarray(bounds + [count])


def select_shard(windows: pd.DataFrame, name: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The windows of shard ``name`` (``"i-of-n"``) and where it lies in the dataset.

    ``windows`` as prepare_dataset writes them (``doc_id``, ``input_ids``, ...; each document's windows
    consecutive). Returns the shard's windows (a slice, original order and ids) and
    ``{"shard", "windows": [start, end), "documents": [first, last] doc ids, "tokens_before"}``;
    ``tokens_before`` counts the real tokens of all earlier windows (the decision sampler's offset).
    """
    index, count = parse_shard(name)
    doc_ids = windows["doc_id"].to_numpy()
    if np.any(np.diff(doc_ids) < 0):
        raise ValueError("windows: doc_id is not in ascending order; shards need each document's windows together")
    lengths = windows["input_ids"].map(len).to_numpy()
    starts = np.flatnonzero(np.r_[True, doc_ids[1:] != doc_ids[:-1]]) if len(doc_ids) else np.zeros(0, int)
    doc_tokens = np.add.reduceat(lengths, starts) if len(starts) else np.zeros(0, int)
    bounds = shard_bounds(doc_tokens, count)
    window_edges = np.r_[starts, len(windows)]
    first, last = int(window_edges[bounds[index - 1]]), int(window_edges[bounds[index]])
    info = {"shard": name, "windows": [first, last], "documents": [int(doc_ids[first]), int(doc_ids[last - 1])],
            "tokens_before": int(lengths[:first].sum())}
    return windows.iloc[first:last], info


def check_parts(parts: Sequence[dict[str, Any]], total_windows: int) -> None:
    """The shards' ``part.json`` records form one run: shards 1..n of n, in order, of one config, and their
    window ranges tile ``[0, total_windows)``."""
    count = len(parts)
    for i, part in enumerate(parts, start=1):
        if part["shard"] != shard_name(i, count):
            raise ValueError(f"shard {i} of {count}: got part {part['shard']!r}; pass all shards in order")
        if part["provenance"]["config_hash"] != parts[0]["provenance"]["config_hash"]:
            raise ValueError(f"shard {part['shard']}: config_hash differs from shard 1's; the shards come "
                             "from different configs (rerun them)")
    edges = [part["windows"] for part in parts]
    expected_start = 0
    for part, (start, end) in zip(parts, edges):
        if start != expected_start:
            raise ValueError(f"shard {part['shard']}: windows start at {start}, expected {expected_start}")
        expected_start = end
    if expected_start != total_windows:
        raise ValueError(f"shards cover {expected_start} windows but the dataset has {total_windows}")
