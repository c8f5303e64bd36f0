"""Figures of routing behaviour: plain arrays or tidy tables in, a matplotlib ``Figure`` out.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so they need no display,
never touch the global backend and are freed as soon as they go out of scope. A figure is saved
only when a ``path`` is given, and then atomically.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from routelab.io import atomic_path

DPI = 150
SUBPLOT_SIZE = (4.6, 3.6)  # inches per panel
MAX_COLUMNS = 3  # panels per figure row


def as_array(values: Any, name: str, ndim: int = 1) -> np.ndarray:
    """``values`` (tensor on any device, array or list) as a non-empty float array of ``ndim`` dims."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=float)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def save_figure(fig: Figure, path: str | os.PathLike | None, dpi: int = DPI) -> None:
    """Write ``fig`` as PNG to ``path`` atomically; do nothing when ``path`` is None."""
    if path is None:
        return
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")


def _check_bounds(min_k: int, max_k: int) -> None:
    if min_k > max_k:
        raise ValueError(f"min_k ({min_k}) must not exceed max_k ({max_k})")


def _draw_k_histogram(ks: np.ndarray, counts: np.ndarray, min_k: int, max_k: int,
                      title: str | None) -> Figure:
    """Bars of decisions per number of experts, one bar per integer k from the lowest to the highest
    of the observed k, ``min_k`` and ``max_k`` (zero-height bars fill the gaps)."""
    _check_bounds(min_k, max_k)
    if np.any(counts < 0):
        raise ValueError("k counts must be non-negative")
    total = counts.sum()
    if total == 0:
        raise ValueError("k counts sum to zero: no routing decisions to plot")
    bins = np.arange(min(ks.min(), min_k), max(ks.max(), max_k) + 1)
    heights = np.zeros(bins.size)
    np.add.at(heights, (ks - bins[0]).astype(int), counts)
    mean = float((ks * counts).sum() / total)

    fig = Figure(figsize=(6.0, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(bins, heights, width=0.85, color="C0", alpha=0.8)
    ax.axvline(mean, color="C3", linestyle="-", linewidth=2, label=f"mean = {mean:.2f}")
    ax.axvline(min_k, color="0.3", linestyle="--", linewidth=1.5, label=f"min_k = {min_k}")
    ax.axvline(max_k, color="0.1", linestyle=":", linewidth=1.5, label=f"max_k = {max_k}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experts selected per token and layer")
    ax.set_ylabel("routing decisions")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title)
    return fig


def _integer_values(values: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise ValueError(f"{name} must hold whole numbers of experts")
    return values.astype(int)


def experts_histogram(k: Any, min_k: int, max_k: int, title: str | None = None,
                      path: str | os.PathLike | None = None) -> Figure:
    """Histogram of the number of experts selected per (token, layer) decision.

    ``k``: ``[decisions]`` experts selected in each decision. Vertical lines mark the mean, ``min_k``
    and ``max_k``.
    """
    ks, counts = np.unique(_integer_values(as_array(k, "k"), "k"), return_counts=True)
    fig = _draw_k_histogram(ks, counts, min_k, max_k, title)
    save_figure(fig, path)
    return fig


def experts_histogram_from_counts(k_histogram: Mapping[int | str, int], min_k: int, max_k: int,
                                  title: str | None = None,
                                  path: str | os.PathLike | None = None) -> Figure:
    """:func:`experts_histogram` from precomputed counts ``{k: decisions}`` (summary.json's
    ``k_histogram``, whose keys are strings)."""
    if not k_histogram:
        raise ValueError("k_histogram is empty")
    ks = _integer_values(np.array([float(k) for k in k_histogram]), "k_histogram keys")
    counts = np.array([float(c) for c in k_histogram.values()])
    fig = _draw_k_histogram(ks, counts, min_k, max_k, title)
    save_figure(fig, path)
    return fig


def expert_heatmap(counts: Any, title: str | None = None, path: str | os.PathLike | None = None,
                   tokens_per_layer: Any = None) -> Figure:
    """Heatmap of how often each expert is selected in each layer.

    ``counts``: ``[layers, experts]`` selections. With ``tokens_per_layer`` (``[layers]`` routing
    decisions) a cell is the % of tokens routed to that expert; without it, the % of the layer's
    selections.
    """
    counts = as_array(counts, "counts", ndim=2)
    if tokens_per_layer is None:
        denominator, label = counts.sum(axis=1), "% of selections"
    else:
        denominator, label = as_array(tokens_per_layer, "tokens_per_layer"), "% of tokens"
        if denominator.size != counts.shape[0]:
            raise ValueError(f"tokens_per_layer has {denominator.size} entries but counts has "
                             f"{counts.shape[0]} layers")
        if np.any(denominator <= 0):
            raise ValueError("tokens_per_layer must be positive")
    share = 100.0 * np.divide(counts, denominator[:, None], out=np.zeros_like(counts),
                              where=denominator[:, None] > 0)

    num_layers, num_experts = counts.shape
    fig = Figure(figsize=(min(3.0 + 0.12 * num_experts, 16.0), 1.6 + 0.35 * num_layers),
                 layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                      interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return fig


def message_figure(message: str, path: str | os.PathLike | None = None) -> Figure:
    """A blank figure with ``message`` centred: keeps an output file present when there is nothing
    to plot."""
    fig = Figure(figsize=(6.0, 2.0))
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12)
    save_figure(fig, path)
    return fig


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str = "table") -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{name} is empty")


def _panel_grid(n: int) -> tuple[Figure, list[Any]]:
    """A figure with ``n`` panels in rows of at most MAX_COLUMNS; unused cells removed."""
    columns = min(n, MAX_COLUMNS)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(SUBPLOT_SIZE[0] * columns, SUBPLOT_SIZE[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _baseline_for(baseline: float | Mapping[str, float] | None, dataset: str) -> float | None:
    if isinstance(baseline, Mapping):
        return baseline.get(dataset)
    return baseline


def _line_keys(table: pd.DataFrame) -> list[str]:
    """max_k plus any other routing parameter that varies, so each line is one alpha sweep."""
    extra = [c for c in ("min_k", "temperature", "weights", "null_model")
             if c in table.columns and table[c].nunique(dropna=False) > 1]
    return ["max_k", *extra]


def _line_label(keys: list[str], values: tuple) -> str:
    return ", ".join(f"{key} = {value:g}" if isinstance(value, (int, float, np.number))
                     else f"{key} = {value}" for key, value in zip(keys, values))


def _label_alphas(ax: Any, alphas: pd.Series, max_labels: int = 8) -> None:
    """Tick the swept alphas themselves (``0.05`` rather than ``5 x 10^-2``) when they are few."""
    values = sorted(alphas.dropna().unique())
    if len(values) <= max_labels:
        ax.set_xticks(values, [f"{value:g}" for value in values])
        ax.minorticks_off()


def experts_vs_alpha(table: pd.DataFrame, baseline_experts: float | Mapping[str, float] | None = None,
                     path: str | os.PathLike | None = None,
                     baseline_label: str = "top-k baseline") -> Figure:
    """Mean experts per decision against the BH level alpha: one panel per dataset, one line per
    max_k with ±experts_std error bars, and a dashed line for the top-k baseline.

    ``table``: BH runs with columns ``dataset, alpha, max_k, experts_mean, experts_std``.
    ``baseline_experts``: experts of the baseline run, one number or ``{dataset: number}``.
    """
    _require_columns(table, ["dataset", "alpha", "max_k", "experts_mean", "experts_std"])
    datasets = sorted(table["dataset"].unique())
    keys = _line_keys(table)
    # the same parameters get the same colour in every panel
    colours = {_line_label(keys, values): f"C{i}"
               for i, (values, _) in enumerate(table.groupby(keys, sort=True, dropna=False))}
    fig, axes = _panel_grid(len(datasets))
    log_x = bool((table["alpha"] > 0).all())
    for ax, dataset in zip(axes, datasets):
        rows = table[table["dataset"] == dataset]
        for values, line in rows.groupby(keys, sort=True, dropna=False):
            line = line.sort_values("alpha")
            ax.errorbar(line["alpha"], line["experts_mean"], yerr=line["experts_std"], marker="o",
                        capsize=3, color=colours[_line_label(keys, values)], label=_line_label(keys, values))
        reference = _baseline_for(baseline_experts, dataset)
        if reference is not None:
            ax.axhline(reference, color="0.4", linestyle="--", linewidth=1.2, label=baseline_label)
        if log_x:
            ax.set_xscale("log")
        _label_alphas(ax, rows["alpha"])
        ax.set_title(dataset)
        ax.set_xlabel("alpha (BH false-discovery level)")
        ax.set_ylabel("experts per token and layer")
        ax.legend(frameon=False, fontsize=8)
    save_figure(fig, path)
    return fig


def quality_vs_experts(table: pd.DataFrame, metric_by_dataset: Mapping[str, tuple[str, bool]],
                       baseline: str | None = None,
                       path: str | os.PathLike | None = None) -> Figure:
    """Quality metric against mean experts per decision: one panel per dataset, one point per
    routing (coloured by method, annotated with the routing name), the baseline ringed.

    ``table``: columns ``routing, dataset, method, experts_mean`` and the metric columns.
    ``metric_by_dataset``: ``{dataset: (metric column, higher_is_better)}``.
    """
    _require_columns(table, ["routing", "dataset", "method", "experts_mean"])
    datasets = sorted(table["dataset"].unique())
    missing = [d for d in datasets if d not in metric_by_dataset]
    if missing:
        raise ValueError(f"metric_by_dataset has no entry for dataset(s) {missing}")
    for dataset in datasets:
        _require_columns(table, [metric_by_dataset[dataset][0]])
    colours = {method: f"C{i}" for i, method in enumerate(sorted(table["method"].unique()))}
    fig, axes = _panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        column, higher_is_better = metric_by_dataset[dataset]
        rows = table[(table["dataset"] == dataset) & table[column].notna()]
        for method, points in rows.groupby("method", sort=True):
            ax.scatter(points["experts_mean"], points[column], color=colours[method], label=method,
                       zorder=2)
        for point in rows.itertuples(index=False):
            ax.annotate(point.routing, (point.experts_mean, getattr(point, column)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        highlighted = rows[rows["routing"] == baseline]
        if not highlighted.empty:
            ax.scatter(highlighted["experts_mean"], highlighted[column], s=180, facecolors="none",
                       edgecolors="black", linewidths=1.5, label=f"baseline ({baseline})", zorder=3)
        ax.margins(x=0.12, y=0.1)
        ax.set_title(dataset)
        ax.set_xlabel("experts per token and layer (mean)")
        ax.set_ylabel(f"{column} ({'higher' if higher_is_better else 'lower'} is better)")
        ax.legend(frameon=False, fontsize=8)
    save_figure(fig, path)
    return fig
