"""Router diagnostics: per (run, layer) distributions of the router's entropy and top-1 / top-2 margin.

Read from each run's sampled detail (``decisions.parquet``: every n-th token's router ``logits`` over all
``E`` experts). The router's probability distribution over the experts is what the family's probability
rules count on (docs/models.md, "What a rule ranks"): ``softmax(logits)`` for softmax families and the
sigmoid scores normalised to sum to 1 for sigmoid families. Per token and layer:

- ``router_entropy``: Shannon entropy of ``p`` in nats (0..log E);
- ``router_entropy_norm``: the same divided by log E (1 = uniform over all experts);
- ``top1_margin``: ``p_(1) - p_(2)``, the two largest probabilities (0..1).

These are the per-token values whose means summary.json reports under the same names. A distribution
is kept as a histogram of :data:`BINS` equal bins over the statistic's range (its non-empty bins), so the
report can pool datasets and read any quantile (:func:`histogram_quantiles`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from scipy.special import expit, softmax

from routelab.report.aggregate import read_run_file

STATISTICS = ("router_entropy", "router_entropy_norm", "top1_margin")
SCORES = ("softmax", "sigmoid")
BINS = 500  # histogram bins per statistic: quantiles to within 0.2 % of its range; only non-empty bins are kept
COLUMNS = ("routing", "dataset", "layer", "statistic", "bin_low", "bin_high", "count")


def router_probabilities(logits: np.ndarray, score: str = "softmax") -> np.ndarray:
    """``[tokens, E]`` router probabilities (float64, rows sum to 1) from ``[tokens, E]`` router logits:
    ``softmax`` families take the softmax, ``sigmoid`` families the sigmoid scores normalised over all
    experts (a group-limited router's candidate mask and a selection bias are not in the logits)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be [tokens, experts >= 2], got shape {list(logits.shape)}")
    if score == "softmax":
        return softmax(logits, axis=1)
    if score == "sigmoid":
        scores = expit(logits)
        return scores / scores.sum(axis=1, keepdims=True)
    raise ValueError(f"score: {score!r} is not valid; choose one of {list(SCORES)}")


def entropy_nats(probs: np.ndarray) -> np.ndarray:
    """``[tokens]`` Shannon entropy in nats of each row of ``probs`` ``[tokens, E]`` (0 log 0 = 0)."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return terms.sum(axis=1)


def probability_margin(probs: np.ndarray) -> np.ndarray:
    """``[tokens]`` gap between the largest and second largest probability of each row of ``[tokens, E]``."""
    probs = np.asarray(probs, dtype=np.float64)
    top = np.partition(probs, probs.shape[1] - 2, axis=1)[:, -2:]
    return top[:, 1] - top[:, 0]


def token_statistics(probs: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STATISTICS` for each token, ``{name: [tokens]}``."""
    entropy = entropy_nats(probs)
    return {"router_entropy": entropy, "router_entropy_norm": entropy / math.log(probs.shape[1]),
            "top1_margin": probability_margin(probs)}


def statistic_edges(statistic: str, num_experts: int, bins: int = BINS) -> np.ndarray:
    """``[bins + 1]`` bin edges of a statistic: ``[0, log E]`` for the entropy in nats, else ``[0, 1]``."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic: {statistic!r} is not valid; choose one of {list(STATISTICS)}")
    high = math.log(num_experts) if statistic == "router_entropy" else 1.0
    return np.linspace(0.0, high, bins + 1)


def layer_histograms(probs: np.ndarray, bins: int = BINS) -> pd.DataFrame:
    """One layer's tokens ``[tokens, E]`` as histograms: ``statistic, bin_low, bin_high, count``, the
    non-empty of ``bins`` equal bins per statistic (its counts sum to ``tokens``)."""
    parts = []
    for name, values in token_statistics(probs).items():
        edges = statistic_edges(name, probs.shape[1], bins)
        # rounding can put a uniform row's entropy a hair above log E: it belongs in the last bin
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        kept = counts > 0  # a sampled layer of OLMoE fills a few hundred of the bins
        parts.append(pd.DataFrame({"statistic": name, "bin_low": edges[:-1][kept], "bin_high": edges[1:][kept],
                                   "count": counts[kept].astype(np.int64)}))
    return pd.concat(parts, ignore_index=True)


def histogram_quantiles(bin_low: Sequence[float], bin_high: Sequence[float], counts: Sequence[float],
                        quantiles: Sequence[float]) -> np.ndarray:
    """Quantiles of a histogram, values spread evenly within each bin (linear interpolation of the
    cumulative counts): ``[len(quantiles)]``, NaN when the counts sum to 0. Bins must be sorted and
    disjoint; gaps between them (left-out empty bins) hold no values."""
    low, high = np.asarray(bin_low, dtype=float), np.asarray(bin_high, dtype=float)
    counts = np.asarray(counts, dtype=float)
    total = counts.sum()
    if total <= 0:
        return np.full(len(quantiles), np.nan)
    after = np.cumsum(counts) / total
    before = after - counts / total
    # the cumulative share at each bin's two edges: flat across a gap, rising linearly within a bin
    points, shares = np.column_stack([low, high]).ravel(), np.column_stack([before, after]).ravel()
    return np.interp(np.asarray(quantiles, dtype=float), shares, points)


def decision_logits(path: str | os.PathLike, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """``(layers [rows] int, logits [rows, E] float32)`` of a decisions.parquet: one read of its
    ``layer`` and ``logits`` columns."""
    table = pq.read_table(path, columns=["layer", "logits"])
    logits = table.column("logits").combine_chunks()
    lengths = np.diff(logits.offsets.to_numpy())
    if lengths.size and (lengths != num_experts).any():
        raise ValueError(f"{path}: logits lists of length {sorted(set(lengths.tolist()))}; the run has "
                         f"{num_experts} experts")
    values = logits.flatten().to_numpy(zero_copy_only=False).reshape(len(logits), num_experts)
    return table.column("layer").to_numpy().astype(np.int64), values


def run_router_diagnostics(run_dir: str | os.PathLike, score: str | None = None, bins: int = BINS) -> pd.DataFrame:
    """The histograms of one run (:data:`COLUMNS`); empty when its decisions.parquet sampled nothing.
    ``score`` None: the run's own, summary.json's ``router_score`` (softmax for runs written without it)."""
    summary = read_run_file(run_dir, "summary.json")
    score = _check_score(summary.get("router_score", "softmax") if score is None else score)
    path = Path(run_dir) / "decisions.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"run file missing: {path}")
    layers, logits = decision_logits(path, int(summary["num_experts"]))
    parts = []
    for layer in np.unique(layers):
        histograms = layer_histograms(router_probabilities(logits[layers == layer], score), bins)
        histograms.insert(0, "layer", int(layer))
        parts.append(histograms)
    if not parts:
        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.concat(parts, ignore_index=True)
    table.insert(0, "dataset", summary["dataset"])
    table.insert(0, "routing", summary["routing"])
    return table


def collect_router_diagnostics(run_dirs: Iterable[str | os.PathLike], score: str | None = None,
                               bins: int = BINS) -> pd.DataFrame:
    """Router-diagnostic histograms of every run: one row per (run, layer, statistic, bin) with
    ``routing, dataset, layer, statistic, bin_low, bin_high, count`` (sampled tokens whose value lies
    in the bin), sorted by routing, dataset, layer, statistic, bin. ``score``: the model family's
    router score (``softmax`` or ``sigmoid``) for every run; None: each run's own (summary.json's
    ``router_score``, which the route stage records). Runs whose decisions.parquet is empty add no rows."""
    if score is not None:
        _check_score(score)
    run_dirs = list(run_dirs)
    if not run_dirs:
        raise ValueError("run_dirs is empty: no sampled decisions to read")
    tables = [table for table in (run_router_diagnostics(run_dir, score, bins) for run_dir in run_dirs)
              if not table.empty]
    if not tables:
        return pd.DataFrame(columns=list(COLUMNS))
    table = pd.concat(tables, ignore_index=True)
    table["layer"] = table["layer"].astype(np.int64)
    return table.sort_values(["routing", "dataset", "layer", "statistic", "bin_low"], ignore_index=True)


def _check_score(score: str) -> str:
    if score not in SCORES:
        raise ValueError(f"score: {score!r} is not valid; choose one of {list(SCORES)}")
    return score


def pooled_quantiles(table: pd.DataFrame, quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> pd.DataFrame:
    """Quantiles of each (routing, layer, statistic) distribution, the datasets' histograms pooled (each
    sampled token counts once): ``routing, layer, statistic, quantile, value``."""
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(table.columns)}")
    pooled = table.groupby(["routing", "layer", "statistic", "bin_low", "bin_high"], sort=True,
                           as_index=False)["count"].sum()
    rows = []
    for (routing, layer, statistic), bins in pooled.groupby(["routing", "layer", "statistic"], sort=True):
        values = histogram_quantiles(bins["bin_low"], bins["bin_high"], bins["count"], quantiles)
        rows.extend({"routing": routing, "layer": int(layer), "statistic": statistic, "quantile": float(q),
                     "value": float(v)} for q, v in zip(quantiles, values))
    return pd.DataFrame(rows, columns=["routing", "layer", "statistic", "quantile", "value"])
