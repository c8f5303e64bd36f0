"""The per-run figure set: a run directory's files read into the arrays :mod:`routelab.plot.drawing`
draws, every figure of :data:`routelab.catalogue.RUN_FIGURES` written to a plot directory, listed in
index.json.

Loading reads only the Parquet columns a figure needs (``routing.parquet`` holds one row per token and
layer, millions for a real model); the plot functions sample what they draw. Figures that do not apply
to a run (p-value figures for a router without p-values, BH figures for a router other than BH, no
sampled decisions) are written as a figure saying why and marked ``"drawn": false`` in the index, so
the set of files is the same for every run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from routelab.catalogue import RUN_FIGURES
from routelab.io.files import read_json, write_json
from routelab.plot.drawing import (
    bh_decisions,
    bh_pass_rate,
    expert_heatmap,
    expert_utilisation,
    experts_histogram_from_counts,
    layer_experts_boxplot,
    logit_vs_pvalue,
    message_figure,
    pvalue_distribution,
    routing_sequence,
    token_rarity,
)

log = logging.getLogger(__name__)

SEQUENCE_LAYERS = 4  # panels of the sample-sequence heatmap: evenly spaced layers, first and last included

Decoder = Callable[[int], str]


def read_columns(path: str | os.PathLike, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Scalar ``columns`` of a Parquet file as ``{name: [rows]}`` numpy arrays."""
    table = pq.read_table(path, columns=list(columns))
    return {name: table.column(name).to_numpy() for name in columns}


def _list_matrix(column: pa.ChunkedArray) -> np.ndarray | None:
    """A list column whose rows all have the same length as ``[rows, length]`` float array; None when
    every row is null (the column exists but the router did not fill it)."""
    if len(column) == 0 or column.null_count == len(column):
        return None
    if column.null_count:
        raise ValueError(f"list column has {column.null_count} null rows among {len(column)}")
    lists = column.combine_chunks()
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(float)
    return values.reshape(len(lists), -1)


def read_decisions(path: str | os.PathLike) -> dict[str, Any]:
    """The sampled decisions (decisions.parquet) as arrays: ``layer, k, token_id, position,
    passing_rank`` ``[decisions]`` (``passing_rank`` None without BH) and ``logits, pvalues,
    sorted_pvalues`` ``[decisions, experts]`` (the p-value ones None for routers without p-values)."""
    table = pq.read_table(path, columns=["token_id", "position", "layer", "k", "logits", "pvalues",
                                         "sorted_pvalues", "passing_rank"])
    rank = table.column("passing_rank")
    return {
        **{name: table.column(name).to_numpy() for name in ("token_id", "position", "layer", "k")},
        "passing_rank": None if len(rank) == 0 or rank.null_count else rank.to_numpy(),
        **{name: _list_matrix(table.column(name)) for name in ("logits", "pvalues", "sorted_pvalues")},
    }


def experts_per_token(token_id: np.ndarray, layer: np.ndarray, k: np.ndarray, num_layers: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(token_ids [tokens], experts [tokens])``: the mean of k over layers for each token, from the
    token-major rows of routing.parquet (each token's ``num_layers`` rows in layer order, which the
    recorder writes; checked, since a different order would silently mix tokens)."""
    in_order = np.broadcast_to(np.arange(num_layers), (layer.size // num_layers, num_layers))
    if layer.size % num_layers or not np.array_equal(layer.reshape(-1, num_layers), in_order):
        raise ValueError(f"routing rows are not token-major with {num_layers} layers per token")
    return token_id[::num_layers], k.reshape(-1, num_layers).mean(axis=1)


def sequence_weights(path: str | os.PathLike, num_experts: int, window_id: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One window's routing as ``(token_ids [tokens], layers [layers], weights [layers, tokens,
    experts])``, weights NaN where the expert was not selected. ``window_id`` None: the first window
    in the file (read from its first row group only)."""
    if window_id is None:
        window_id = pq.ParquetFile(path).read_row_group(0, columns=["window_id"]).column(0)[0].as_py()
    table = pq.read_table(path, columns=["position", "token_id", "layer", "experts", "weights"],
                          filters=[("window_id", "==", window_id)])
    position, layer = table.column("position").to_numpy(), table.column("layer").to_numpy()
    positions, token_index = np.unique(position, return_inverse=True)
    layers, layer_index = np.unique(layer, return_inverse=True)
    token_ids = np.zeros(positions.size, dtype=np.int64)
    token_ids[token_index] = table.column("token_id").to_numpy()

    experts = table.column("experts").combine_chunks()
    chosen = experts.flatten().to_numpy().astype(np.int64)
    row = np.repeat(np.arange(len(experts)), np.diff(experts.offsets.to_numpy()))
    weights = np.full((layers.size, positions.size, num_experts), np.nan)
    weights[layer_index[row], token_index[row], chosen] = (
        table.column("weights").combine_chunks().flatten().to_numpy())
    return token_ids, layers, weights


def token_label(text: str) -> str:
    """A token's text as a readable tick label: whitespace made visible, empty text marked."""
    if text == "":
        return "∅"
    return text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t")


def load_token_decoder(model: str | os.PathLike) -> Decoder:
    """``token id -> text`` with the model's tokenizer. A local model directory with tokenizer.json
    is read with ``tokenizers`` directly (fast: no transformers import); anything else through
    ``AutoTokenizer`` (hub id or path, from the local cache when offline)."""
    tokenizer_file = Path(model) / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model))
    return lambda token_id: tokenizer.decode([int(token_id)], skip_special_tokens=False)


def _pvalue_reason(method: str, decisions: dict[str, Any]) -> str | None:
    """Why the p-value figures cannot be drawn for this run, or None when they can."""
    if decisions["k"].size == 0:
        return "no sampled decisions in decisions.parquet\n(evaluation.decision_sample_every is 0)"
    if decisions["pvalues"] is None:
        return f"{method} routing computes no p-values:\nthis figure does not apply"
    return None


def _bh_reason(method: str, alpha: float | None, decisions: dict[str, Any]) -> str | None:
    reason = _pvalue_reason(method, decisions)
    if reason is None and (alpha is None or decisions["passing_rank"] is None):
        reason = f"{method} routing has no BH level alpha:\nthe BH step-up figures do not apply"
    return reason


def draw_run_figures(run_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     decode: Decoder | None = None) -> list[dict[str, Any]]:
    """Write every figure of RUN_FIGURES for the run in ``run_dir`` into ``out_dir`` and
    ``out_dir/index.json``: ``[{"file", "title", "drawn"}]`` in RUN_FIGURES order, with a ``reason``
    for figures that do not apply. ``decode`` turns token ids into text for the sample-sequence
    heatmap (token ids are shown without it). Returns the index."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if not (run_dir / "summary.json").is_file():  # routelab.report.aggregate has this check, but imports pandas
        raise FileNotFoundError(f"run file missing: {run_dir / 'summary.json'}")
    summary = read_json(run_dir / "summary.json")
    name = f"{summary['routing']} on {summary['dataset']}"
    method, alpha = summary["method"], summary["params"].get("alpha")
    num_layers, num_experts = summary["num_layers"], summary["num_experts"]
    tokens_per_layer = [layer["decisions"] for layer in summary["per_layer"]]
    routing = read_columns(run_dir / "routing.parquet", ["token_id", "layer", "k"])
    decisions = read_decisions(run_dir / "decisions.parquet")
    label = decode or str

    def histogram(path: Path) -> None:
        experts_histogram_from_counts(summary["k_histogram"], summary["min_k"], summary["max_k"],
                                      title=name, path=path)

    def heatmap(path: Path) -> None:
        expert_heatmap(summary["expert_counts"], title=name, path=path, tokens_per_layer=tokens_per_layer)

    def pvalues(path: Path) -> None:
        pvalue_distribution(decisions["pvalues"].ravel(), title=name, path=path)

    def logit_scatter(path: Path) -> None:
        logit_vs_pvalue(decisions["logits"].ravel(), decisions["pvalues"].ravel(),
                        np.repeat(decisions["layer"], num_experts), title=name, path=path)

    def bh_samples(path: Path) -> None:
        labels = [f"layer {layer}, token {token_label(label(token))!r}"
                  for layer, token in zip(decisions["layer"], decisions["token_id"])]
        bh_decisions(decisions["sorted_pvalues"], alpha, decisions["passing_rank"], decisions["k"],
                     labels=labels, title=name, path=path)

    def bh_rate(path: Path) -> None:
        bh_pass_rate(decisions["sorted_pvalues"], alpha, decisions["passing_rank"], decisions["k"],
                     title=name, path=path)

    def sequence(path: Path) -> None:
        token_ids, layers, weights = sequence_weights(run_dir / "routing.parquet", num_experts)
        keep = np.unique(np.linspace(0, layers.size - 1, min(layers.size, SEQUENCE_LAYERS)).round().astype(int))
        routing_sequence(weights[keep], [token_label(label(t)) for t in token_ids], layers=layers[keep],
                         title=name, path=path)

    def utilisation(path: Path) -> None:
        expert_utilisation(summary["expert_counts"], tokens_per_layer=tokens_per_layer, title=name, path=path)

    def rarity(path: Path) -> None:
        token_ids, experts = experts_per_token(routing["token_id"], routing["layer"], routing["k"], num_layers)
        token_rarity(token_ids, experts, title=name, path=path)

    def layer_boxes(path: Path) -> None:
        layer_experts_boxplot(routing["layer"], routing["k"], title=name, path=path)

    pvalue_reason = _pvalue_reason(method, decisions)
    bh_reason = _bh_reason(method, alpha, decisions)
    figures: dict[str, tuple[Callable[[Path], None], str | None]] = {
        "experts_histogram.png": (histogram, None),
        "expert_heatmap.png": (heatmap, None),
        "pvalue_distribution.png": (pvalues, pvalue_reason),
        "logit_vs_pvalue.png": (logit_scatter, pvalue_reason),
        "bh_decisions.png": (bh_samples, bh_reason),
        "bh_pass_rate.png": (bh_rate, bh_reason),
        "routing_sequence.png": (sequence, None),
        "expert_utilisation.png": (utilisation, None),
        "token_rarity.png": (rarity, None),
        "layer_experts.png": (layer_boxes, None),
    }
    assert list(figures) == [figure.file for figure in RUN_FIGURES], "every catalogued figure is drawn, in its order"
    index = []
    for figure in RUN_FIGURES:
        draw, reason = figures[figure.file]
        path = out_dir / figure.file
        entry = {"file": figure.file, "title": figure.title, "drawn": reason is None}
        if reason is None:
            draw(path)
        else:
            message_figure(f"{figure.title}\n\n{reason}", path=path)
            entry["reason"] = reason.replace("\n", " ")
        log.info("%s %s", "drew" if reason is None else "not applicable:", path)
        index.append(entry)
    write_json(out_dir / "index.json", index)
    return index
