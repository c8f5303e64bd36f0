"""Cross-run figures of the comparison report: tidy tables or arrays in, a matplotlib ``Figure`` out.

Like :mod:`routelab.plot.drawing`, figures are built on ``matplotlib.figure.Figure`` (no pyplot) and saved
only when a ``path`` is given, atomically. The statistics drawn here are computed in
:mod:`routelab.report.statistics`; these functions only draw them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from routelab.plot.drawing import as_array, save_figure
from routelab.report.statistics import correlation, pareto_front

SUBPLOT_SIZE = (4.6, 3.6)  # inches per panel
MAX_COLUMNS = 3  # panels per figure row


def _require_columns(table: pd.DataFrame, columns: Sequence[str], name: str = "table") -> None:
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{name} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"{name} lacks column(s) {missing}; it has {list(table.columns)}")
    if table.empty:
        raise ValueError(f"{name} is empty")


def _panel_grid(n: int, size: tuple[float, float] = SUBPLOT_SIZE,
                columns: int = MAX_COLUMNS) -> tuple[Figure, list[Any]]:
    """A figure with ``n`` panels in rows of at most ``columns``; unused cells removed."""
    columns = min(n, columns)
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
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


def _better(higher_is_better: bool) -> str:
    return "higher is better" if higher_is_better else "lower is better"


# --------------------------------------------------------------------------- item 11

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


# --------------------------------------------------------------------------- item 12

def quality_vs_experts(table: pd.DataFrame, metric_by_dataset: Mapping[str, tuple[str, bool]],
                       baseline: str | None = None, path: str | os.PathLike | None = None,
                       x: str = "experts_mean", x_label: str = "experts per token and layer (mean)",
                       intervals: pd.DataFrame | None = None, frontier: bool = True) -> Figure:
    """Quality metric against a cost (``x``, default mean experts per decision): one panel per
    dataset, one point per routing (coloured by method, annotated with the routing name), the
    baseline ringed, the Pareto frontier (lower cost, better quality) as a step line and, with
    ``intervals``, vertical bootstrap-CI bars.

    ``table``: columns ``routing, dataset, method``, ``x`` and the metric columns.
    ``metric_by_dataset``: ``{dataset: (metric column, higher_is_better)}``.
    ``intervals``: ``routing, dataset, low, high`` (e.g. :func:`routelab.report.statistics.run_quality_intervals`).
    """
    _require_columns(table, ["routing", "dataset", "method", x])
    datasets = sorted(table["dataset"].unique())
    missing = [d for d in datasets if d not in metric_by_dataset]
    if missing:
        raise ValueError(f"metric_by_dataset has no entry for dataset(s) {missing}")
    for dataset in datasets:
        _require_columns(table, [metric_by_dataset[dataset][0]])
    if intervals is not None:
        _require_columns(intervals, ["routing", "dataset", "low", "high"], "intervals")
    colours = {method: f"C{i}" for i, method in enumerate(sorted(table["method"].unique()))}
    fig, axes = _panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        column, higher_is_better = metric_by_dataset[dataset]
        rows = table[(table["dataset"] == dataset) & table[column].notna() & table[x].notna()]
        for method, points in rows.groupby("method", sort=True):
            ax.scatter(points[x], points[column], color=colours[method], label=method, zorder=2)
        for point in rows.itertuples(index=False):
            ax.annotate(point.routing, (getattr(point, x), getattr(point, column)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        if intervals is not None:
            bounds = rows[["routing", x, column]].merge(
                intervals[intervals["dataset"] == dataset][["routing", "low", "high"]], on="routing")
            if not bounds.empty:
                # bars span the interval itself: a percentile CI need not be centred on the estimate
                ax.vlines(bounds[x], bounds["low"], bounds["high"], colors="0.45", linewidth=1, zorder=1)
        if frontier and len(rows):
            front = rows[pareto_front(rows[x], rows[column], higher_is_better)].sort_values(x)
            ax.plot(front[x], front[column], drawstyle="steps-post", color="0.2", linewidth=1,
                    linestyle=":", label="Pareto frontier", zorder=1)
        highlighted = rows[rows["routing"] == baseline]
        if not highlighted.empty:
            ax.scatter(highlighted[x], highlighted[column], s=180, facecolors="none",
                       edgecolors="black", linewidths=1.5, label=f"baseline ({baseline})", zorder=3)
        ax.margins(x=0.12, y=0.1)
        ax.set_title(dataset)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{column} ({_better(higher_is_better)})")
        ax.legend(frameon=False, fontsize=8)
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- item 14

def expert_bubble_heatmap(weights: Any, configs: Sequence[str], entropy: Any = None,
                          title: str | None = None, path: str | os.PathLike | None = None,
                          max_area: float = 120.0) -> Figure:
    """Expert activation per routing config as bubbles: row = config, column = expert, bubble area
    and colour proportional to the expert's relative weight (its share of the config's selections,
    divided by the largest share in the figure). With ``entropy`` (``[configs]``, normalised
    Shannon entropy of each row) the value is written at the end of each row.

    ``weights``: ``[configs, experts]`` non-negative selection counts or shares (rows are normalised).
    """
    weights = as_array(weights, "weights", ndim=2)
    if len(configs) != weights.shape[0]:
        raise ValueError(f"configs has {len(configs)} names but weights has {weights.shape[0]} rows")
    if np.any(weights < 0):
        raise ValueError("weights must be non-negative")
    totals = weights.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("weights has a row that sums to zero")
    shares = weights / totals
    relative = shares / shares.max()
    if entropy is not None:
        entropy = as_array(entropy, "entropy")
        if entropy.size != weights.shape[0]:
            raise ValueError(f"entropy has {entropy.size} values but weights has {weights.shape[0]} rows")
    num_configs, num_experts = shares.shape
    fig = Figure(figsize=(min(4.0 + 0.16 * num_experts, 16.0), 1.4 + 0.32 * num_configs), layout="constrained")
    ax = fig.subplots()
    rows, columns = np.meshgrid(np.arange(num_configs), np.arange(num_experts), indexing="ij")
    bubbles = ax.scatter(columns.ravel(), rows.ravel(), s=max_area * relative.ravel(), c=relative.ravel(),
                         cmap="viridis", vmin=0, vmax=1, edgecolors="none")
    fig.colorbar(bubbles, ax=ax, label="relative weight (share / largest share)", shrink=0.8)
    ax.set_yticks(np.arange(num_configs), list(configs))
    ax.set_ylim(num_configs - 0.5, -0.5)
    ax.set_xlim(-1, num_experts + (6 if entropy is not None else 0))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    if entropy is not None:
        for row, value in enumerate(entropy):
            ax.text(num_experts + 0.5, row, f"H = {value:.3f}", va="center", fontsize=8)
    if title:
        ax.set_title(title)
    save_figure(fig, path)
    return fig


def entropy_vs_quality(table: pd.DataFrame, metric_by_dataset: Mapping[str, tuple[str, bool]],
                       path: str | os.PathLike | None = None) -> Figure:
    """Normalised expert-usage entropy against the quality metric, one panel per dataset, one point
    per routing; the panel's text gives Pearson r and Spearman ρ with p-values
    (:func:`routelab.report.statistics.correlation`) and the strength in words.

    ``table``: columns ``routing, dataset, entropy`` and the metric columns.
    """
    _require_columns(table, ["routing", "dataset", "entropy"])
    datasets = sorted(table["dataset"].unique())
    missing = [d for d in datasets if d not in metric_by_dataset]
    if missing:
        raise ValueError(f"metric_by_dataset has no entry for dataset(s) {missing}")
    fig, axes = _panel_grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        column, higher_is_better = metric_by_dataset[dataset]
        _require_columns(table, [column])
        rows = table[(table["dataset"] == dataset) & table[column].notna()]
        ax.scatter(rows["entropy"], rows[column], color="C0", zorder=2)
        for point in rows.itertuples(index=False):
            ax.annotate(point.routing, (point.entropy, getattr(point, column)), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        result = correlation(rows["entropy"], rows[column])
        ax.text(0.02, 0.02, _correlation_text(result), transform=ax.transAxes, fontsize=7.5,
                va="bottom", ha="left", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"})
        ax.margins(x=0.15, y=0.15)
        ax.set_title(dataset)
        ax.set_xlabel("normalised expert-usage entropy (1 = all experts equally)")
        ax.set_ylabel(f"{column} ({_better(higher_is_better)})")
    save_figure(fig, path)
    return fig


def _correlation_text(result: Mapping[str, Any]) -> str:
    if not np.isfinite(result["pearson_r"]):
        return result["strength"]
    return (f"Pearson r = {result['pearson_r']:.2f} (p = {result['pearson_p']:.2g})\n"
            f"Spearman ρ = {result['spearman_rho']:.2f} (p = {result['spearman_p']:.2g})\n"
            f"n = {result['n']}: {result['strength']}")


# --------------------------------------------------------------------------- item 15

def _interval_rows(ax: Any, labels: Sequence[str], estimate: np.ndarray, low: np.ndarray,
                   high: np.ndarray, highlight: str | None = None) -> None:
    """One horizontal CI bar (low..high) and a point estimate per label, top to bottom."""
    y = np.arange(len(labels))
    colours = ["C3" if label == highlight else "C0" for label in labels]
    ax.hlines(y, low, high, colors=colours, linewidth=5, alpha=0.45)
    ax.scatter(estimate, y, color=colours, marker="|", s=160, zorder=3)
    ax.set_yticks(y, list(labels))
    ax.set_ylim(len(labels) - 0.5, -0.5)


def interval_estimates_plot(table: pd.DataFrame, baseline: str | None = None,
                            path: str | os.PathLike | None = None) -> Figure:
    """rliable-style interval estimates: one panel per aggregate metric (median, IQM, mean,
    optimality gap), one row per routing with its bootstrap CI as a bar and the point estimate as
    a tick; the baseline in red. A dashed line marks the baseline's level (1; 0 for the gap).

    ``table``: ``routing, metric, estimate, low, high`` (:func:`routelab.report.statistics.interval_estimates`).
    """
    _require_columns(table, ["routing", "metric", "estimate", "low", "high"])
    metrics = list(dict.fromkeys(table["metric"]))
    routings = sorted(table["routing"].unique())
    fig, axes = _panel_grid(len(metrics), size=(3.4, 0.9 + 0.3 * len(routings)), columns=4)
    for ax, metric in zip(axes, metrics):
        rows = table[table["metric"] == metric].set_index("routing").reindex(routings)
        _interval_rows(ax, routings, rows["estimate"].to_numpy(), rows["low"].to_numpy(),
                       rows["high"].to_numpy(), highlight=baseline)
        ax.axvline(0.0 if metric == "optimality gap" else 1.0, color="0.5", linestyle="--", linewidth=1)
        ax.set_title(metric)
        ax.set_xlabel("score relative to baseline")
        if ax is not axes[0]:
            ax.tick_params(labelleft=False)
    save_figure(fig, path)
    return fig


def improvement_plot(table: pd.DataFrame, baseline: str, path: str | os.PathLike | None = None) -> Figure:
    """Probability of improvement P(X > baseline) of every routing X with its bootstrap CI; the
    dashed line at 0.5 is "as likely better as worse".

    ``table``: ``routing, probability, low, high`` (:func:`routelab.report.statistics.improvement_over_baseline`).
    """
    _require_columns(table, ["routing", "probability", "low", "high"])
    rows = table.sort_values("routing")
    fig = Figure(figsize=(6.0, 1.0 + 0.32 * len(rows)), layout="constrained")
    ax = fig.subplots()
    _interval_rows(ax, rows["routing"].tolist(), rows["probability"].to_numpy(), rows["low"].to_numpy(),
                   rows["high"].to_numpy())
    ax.axvline(0.5, color="0.5", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"P(routing X scores above {baseline} on a document)")
    save_figure(fig, path)
    return fig


def performance_profile_plot(table: pd.DataFrame, baseline: str | None = None,
                             path: str | os.PathLike | None = None) -> Figure:
    """Performance profiles: for each routing, the fraction of (document, dataset) scores above
    each threshold τ, with its bootstrap band; the dotted line marks τ = 1 (baseline quality).

    ``table``: ``routing, tau, fraction, low, high`` (:func:`routelab.report.statistics.performance_profiles`).
    """
    _require_columns(table, ["routing", "tau", "fraction", "low", "high"])
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for i, (routing, rows) in enumerate(table.groupby("routing", sort=True)):
        rows = rows.sort_values("tau")
        style = {"color": "black", "linestyle": "--"} if routing == baseline else {"color": f"C{i % 10}"}
        ax.plot(rows["tau"], rows["fraction"], label=routing, **style)
        ax.fill_between(rows["tau"], rows["low"], rows["high"], alpha=0.15, color=style["color"])
    ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("score relative to baseline (τ)")
    ax.set_ylabel("fraction of documents with score > τ")
    ax.legend(frameon=False, fontsize=7, ncols=2 if table["routing"].nunique() > 8 else 1)
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- item 16

def efficiency_parallel_coordinates(table: pd.DataFrame, axes: Sequence[tuple[str, str]],
                                    baseline: str | None = None,
                                    path: str | os.PathLike | None = None) -> Figure:
    """Parallel coordinates, one line per routing config across the ``axes`` (``[(column,
    label)]``, e.g. active FLOPs, peak memory, time, quality). Each axis is scaled to [0, 1] between
    its smallest and largest value, which are written below and above it; a constant axis sits at
    0.5. The baseline is drawn black and dashed.

    ``table``: one row per config with ``routing`` and the axis columns.
    """
    if not axes:
        raise ValueError("axes is empty: give at least two (column, label) pairs")
    columns = [column for column, _ in axes]
    _require_columns(table, ["routing", *columns])
    values = table[columns].to_numpy(dtype=float)
    low, high = np.nanmin(values, axis=0), np.nanmax(values, axis=0)
    span = np.where(high > low, high - low, 1.0)
    scaled = np.where(high > low, (values - low) / span, 0.5)
    fig = Figure(figsize=(2.0 + 2.0 * len(axes), 4.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(axes))
    for i, (routing, row) in enumerate(zip(table["routing"], scaled)):
        style = ({"color": "black", "linestyle": "--", "linewidth": 2} if routing == baseline
                 else {"color": f"C{i % 10}", "linewidth": 1.4})
        ax.plot(x, row, marker="o", label=routing, **style)
    for position in x:
        ax.axvline(position, color="0.6", linewidth=0.8)
    for position, (lo, hi) in enumerate(zip(low, high)):
        ax.text(position, -0.06, f"{lo:.4g}", ha="center", va="top", fontsize=7)
        ax.text(position, 1.06, f"{hi:.4g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [label for _, label in axes])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlim(-0.3, len(axes) - 0.7)
    ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- item 17

def domain_specialisation(table: pd.DataFrame, uniform: float | None = None, layers: Sequence[int] | None = None,
                          title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Share of each dataset's tokens routed to each expert, one panel per layer, one line per
    dataset (OLMoE paper style): an expert far above the others for one dataset only is
    specialised in that domain. A dashed line marks ``uniform`` (e.g. k / experts: every expert
    equally loaded).

    ``table``: ``dataset, layer, expert, share`` (share in % of the dataset's tokens).
    ``layers``: the layers to draw (default all).
    """
    _require_columns(table, ["dataset", "layer", "expert", "share"])
    available = sorted(table["layer"].unique())
    layers = available if layers is None else list(layers)
    unknown = [layer for layer in layers if layer not in available]
    if not layers or unknown:
        raise ValueError(f"layers {unknown or layers} not in the table; available: {available}")
    datasets = sorted(table["dataset"].unique())
    fig, panels = _panel_grid(len(layers), size=(6.0, 3.2), columns=2)
    for ax, layer in zip(panels, layers):
        for i, dataset in enumerate(datasets):
            rows = table[(table["layer"] == layer) & (table["dataset"] == dataset)].sort_values("expert")
            ax.plot(rows["expert"], rows["share"], marker=".", markersize=4, linewidth=1,
                    color=f"C{i % 10}", label=dataset)
        if uniform is not None:
            ax.axhline(uniform, color="0.4", linestyle="--", linewidth=1, label="uniform")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("% of the dataset's tokens")
        ax.legend(frameon=False, fontsize=7)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return fig


def coactivation_rate(counts: Any) -> np.ndarray:
    """``[experts, experts]`` co-activation rate: cell (i, j) = share of the tokens routed to expert
    i that were also routed to j (counts[i, j] / counts[i, i]); NaN on the diagonal and for
    experts never selected."""
    counts = as_array(counts, "counts", ndim=2)
    if counts.shape[0] != counts.shape[1]:
        raise ValueError(f"counts must be square [experts, experts], got {counts.shape}")
    selected = np.diag(counts).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(selected[:, None] > 0, counts / selected[:, None], np.nan)
    np.fill_diagonal(rate, np.nan)
    return rate


def coactivation_heatmap(counts: Mapping[str, Any], layer: int | None = None,
                         path: str | os.PathLike | None = None) -> Figure:
    """Expert co-activation, one panel per routing config: colour of cell (i, j) = share of the
    tokens routed to expert i (row) that were also routed to expert j (column), from
    :func:`coactivation_rate`. All panels share one colour scale (0 to the 99th percentile of all
    rates); grey cells are the diagonal and experts never selected.

    ``counts``: ``{config: [experts, experts] co-selection counts}`` (diagonal = tokens per expert).
    """
    if not counts:
        raise ValueError("counts is empty: no configs to draw")
    rates = {name: coactivation_rate(matrix) for name, matrix in counts.items()}
    finite = np.concatenate([rate[np.isfinite(rate)] for rate in rates.values()])
    # rarely selected experts have rates of 0 or 1 from a handful of tokens; the 99th percentile
    # keeps them from flattening the colour scale of everything else
    vmax = float(np.percentile(finite, 99)) if finite.size else 1.0
    cmap = colormaps["magma"].with_extremes(bad="0.85")  # grey: diagonal, never-selected experts
    fig, axes = _panel_grid(len(rates), size=(3.6, 3.2), columns=4)
    image = None
    for ax, (name, rate) in zip(axes, rates.items()):
        image = ax.imshow(rate, cmap=cmap, vmin=0, vmax=vmax or 1.0, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    # one pair of axis labels for the figure: per-panel labels cost layout time and say nothing new
    fig.supxlabel("expert j (also selected)")
    fig.supylabel("expert i (selected)")
    fig.colorbar(image, ax=axes, label="P(j selected | i selected)", shrink=0.8)
    if layer is not None:
        fig.suptitle(f"expert co-activation in layer {layer}")
    save_figure(fig, path)
    return fig
