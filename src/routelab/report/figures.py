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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from routelab.plot.drawing import as_array, save_figure
from routelab.report.statistics import correlation, pareto_front

SUBPLOT_SIZE = (4.6, 3.6)  # inches per panel
MAX_COLUMNS = 3  # panels per figure row


def _chosen_layers(table: pd.DataFrame, layers: Sequence[int] | None) -> list:
    """``layers`` (default: every layer of ``table``), each checked to be in the table."""
    available = sorted(table["layer"].unique())
    chosen = available if layers is None else list(layers)
    unknown = [layer for layer in chosen if layer not in available]
    if not chosen or unknown:
        raise ValueError(f"layers {unknown or chosen} not in the table; available: {available}")
    return chosen


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


LINE_STYLES = ("-", "--", "-.", ":")


def routing_style(index: int) -> dict[str, Any]:
    """Colour and line style of the ``index``-th routing line: 20 colours, then the next line style,
    so 80 configs stay apart (10 colours alone repeat from the eleventh)."""
    return {"color": colormaps["tab20"](index % 20), "linestyle": LINE_STYLES[(index // 20) % len(LINE_STYLES)]}


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

MERGE_PIXELS = 6.0  # points closer than this on screen share one label: their labels could never sit apart


def _name_lines(names: Sequence[str], per_line: int = 2) -> str:
    """``names`` joined by commas, ``per_line`` to a line, so a shared label stays narrow."""
    lines = [", ".join(names[i:i + per_line]) for i in range(0, len(names), per_line)]
    return ",\n".join(lines)


def _merged_labels(ax: Any, x: np.ndarray, y: np.ndarray,
                   labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Points that (nearly) coincide on screen get one label listing them, placed at the first of them
    (several configs often tie on a metric)."""
    screen = ax.transData.transform(np.column_stack([x, y]))
    group = np.full(len(x), -1)
    for i in range(len(x)):
        if group[i] < 0:
            near = (group < 0) & (np.hypot(*(screen - screen[i]).T) < MERGE_PIXELS)
            group[near] = i
    firsts = np.unique(group)
    names = [_name_lines(sorted(str(labels[j]) for j in np.flatnonzero(group == i))) for i in firsts]
    return x[firsts], y[firsts], names


LABEL_RADII = (3, 10, 18, 28, 40, 55, 75, 100, 130, 170, 220)  # pixels from a point to its label, tried in turn
LABEL_DIRECTIONS = tuple(np.deg2rad(np.arange(0, 360, 22.5)))  # right first, then anticlockwise
MARKER_PIXELS = 7.0  # half the side of the box a point's marker keeps free of labels


def _overlap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Area shared by ``box`` ``[x0, y0, x1, y1]`` and each of ``boxes`` ``[n, 4]``."""
    if not len(boxes):
        return np.zeros(0)
    width = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    height = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


def _place_label(point: np.ndarray, size: np.ndarray, frame: np.ndarray, taken: np.ndarray) -> tuple[np.ndarray, float]:
    """The centre (pixels) of a ``size`` ``[w, h]`` label for ``point``: the nearest of the candidate
    places around it that lies inside ``frame`` and overlaps none of the ``taken`` boxes; if none is
    free, the candidate overlapping least. Returns ``(centre, radius)``."""
    best, best_cost = None, np.inf
    for radius in LABEL_RADII:
        for angle in LABEL_DIRECTIONS:
            direction = np.array([np.cos(angle), np.sin(angle)])
            centre = point + direction * (radius + size / 2)
            box = np.concatenate([centre - size / 2, centre + size / 2])
            outside = (np.clip(frame[:2] - box[:2], 0, None).sum() + np.clip(box[2:] - frame[2:], 0, None).sum())
            cost = _overlap(box, taken).sum() + 1e3 * outside
            if cost == 0:
                return centre, radius
            if cost < best_cost:
                best, best_cost = (centre, radius), cost
    return best


def label_points(axes_points: Sequence[tuple[Any, np.ndarray, np.ndarray, Sequence[str]]],
                 fontsize: float = 7) -> None:
    """Name the points of each panel, ``[(ax, x, y, labels)]``, with no label overlapping another label
    or a point: each label takes the nearest free place around its point (right first, then round it,
    farther out in steps, a thin leader line once it is away from the point). Points that coincide on
    screen share one label listing them. Call it last: it measures the laid-out figure and then fixes
    the layout."""
    if not axes_points:
        return
    figure = axes_points[0][0].get_figure(root=True)
    renderer = (figure.canvas if hasattr(figure.canvas, "get_renderer") else FigureCanvasAgg(figure)).get_renderer()
    figure.draw_without_rendering()  # the constrained layout fixes every panel's size ...
    figure.set_layout_engine("none")  # ... and keeps it, so the labels stay where they are put
    points_per_pixel = 72.0 / figure.dpi
    for ax, x, y, labels in axes_points:
        x, y, labels = _merged_labels(ax, np.asarray(x, float), np.asarray(y, float), labels)
        screen = ax.transData.transform(np.column_stack([x, y])) if len(x) else np.zeros((0, 2))
        frame = np.asarray(ax.get_window_extent(renderer).extents)
        taken = [np.concatenate([p - MARKER_PIXELS, p + MARKER_PIXELS]) for p in screen]
        # texts already in the panel (a statistics box) stay clear too
        taken += [np.asarray(text.get_window_extent(renderer).padded(4).extents) for text in ax.texts]
        for i in np.lexsort((screen[:, 1], screen[:, 0])) if len(x) else []:
            probe = ax.text(0, 0, labels[i], fontsize=fontsize)
            extent = probe.get_window_extent(renderer)
            probe.remove()
            size = np.array([extent.width, extent.height]) + 2.0  # a pixel of air round each label
            centre, radius = _place_label(screen[i], size, frame, np.array(taken))
            leader = {"arrowstyle": "-", "color": "0.55", "linewidth": 0.5, "shrinkA": 0, "shrinkB": 3}
            ax.annotate(labels[i], (x[i], y[i]), fontsize=fontsize, ha="center", va="center",
                        xytext=tuple((centre - screen[i]) * points_per_pixel), textcoords="offset points",
                        arrowprops=leader if radius > LABEL_RADII[1] else None, zorder=4,
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 0.3})
            taken.append(np.concatenate([centre - size / 2, centre + size / 2]))


def _figure_legend(fig: Figure, axes: Sequence[Any]) -> None:
    """One legend for all panels, below them (the panels share their colours), so it covers no point."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        columns = max(1, min(len(entries), int(fig.get_figwidth() // 1.5)))  # ~1.5 inches an entry
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncols=columns,
                   frameon=False, fontsize=8)


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
    labelled = []  # the routing names go on once every panel is drawn and the layout is fixed
    for ax, dataset in zip(axes, datasets):
        column, higher_is_better = metric_by_dataset[dataset]
        rows = table[(table["dataset"] == dataset) & table[column].notna() & table[x].notna()]
        for method, points in rows.groupby("method", sort=True):
            ax.scatter(points[x], points[column], color=colours[method], label=method, zorder=2)
        labelled.append((ax, rows[x].to_numpy(float), rows[column].to_numpy(float), rows["routing"].tolist()))
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
    _figure_legend(fig, axes)
    label_points(labelled)
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
    ax.set_xlim(-1, num_experts)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("expert")
    if entropy is not None:
        # as the right-hand axis' tick labels, so the layout keeps them clear of the bubbles at any width
        right = ax.twinx()
        right.set_ylim(ax.get_ylim())
        right.set_yticks(np.arange(num_configs), [f"H = {value:.3f}" for value in entropy], fontsize=8)
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
    labelled = []  # the routing names go on once every panel is drawn and the layout is fixed
    for ax, dataset in zip(axes, datasets):
        column, higher_is_better = metric_by_dataset[dataset]
        _require_columns(table, [column])
        rows = table[(table["dataset"] == dataset) & table[column].notna()]
        ax.scatter(rows["entropy"], rows[column], color="C0", zorder=2)
        labelled.append((ax, rows["entropy"].to_numpy(float), rows[column].to_numpy(float), rows["routing"].tolist()))
        ax.margins(x=0.15, y=0.15)
        ax.set_title(dataset)
        ax.set_ylabel(f"{column} ({_better(higher_is_better)})")
        result = correlation(rows["entropy"], rows[column])
        # the statistics go under the axis label, where they cover no point
        ax.set_xlabel("normalised expert-usage entropy (1 = all experts equally)\n\n" + _correlation_text(result),
                      fontsize=8)
    label_points(labelled)
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
        style = {"color": "black", "linestyle": "--"} if routing == baseline else routing_style(i)
        ax.plot(rows["tau"], rows["fraction"], label=routing, **style)
        ax.fill_between(rows["tau"], rows["low"], rows["high"], alpha=0.15, color=style["color"])
    ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("score relative to baseline (τ)")
    ax.set_ylabel("fraction of documents with score > τ")
    # beside the axes: with 20+ configs a legend inside covers the curves
    ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncols=max(1, math.ceil(table["routing"].nunique() / 25)))
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
                 else {**routing_style(i), "linewidth": 1.4})
        ax.plot(x, row, marker="o", label=routing, **style)
    for position in x:
        ax.axvline(position, color="0.6", linewidth=0.8)
    for position, (lo, hi) in enumerate(zip(low, high)):
        ax.text(position, -0.06, f"{lo:.4g}", ha="center", va="top", fontsize=7)
        ax.text(position, 1.06, f"{hi:.4g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [label for _, label in axes])
    ax.set_yticks([])
    ax.set_ylim(-0.15, 1.15)
    ax.set_xlim(-0.5, len(axes) - 0.5)  # room for the outer axes' labels, which are wider than a gap
    ax.legend(frameon=False, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncols=max(1, math.ceil(len(table) / 25)))
    save_figure(fig, path)
    return fig


# --------------------------------------------------------------------------- item 17

DIAGNOSTIC_PANELS = (("router_entropy_norm", "router entropy / log E"),
                     ("top1_margin", "top-1 − top-2 probability"))
DIAGNOSTIC_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def router_diagnostics(quantiles: pd.DataFrame, baseline: str | None = None, layers: Sequence[int] | None = None,
                       path: str | os.PathLike | None = None) -> Figure:
    """Distributions of the router's normalised entropy and top-1 / top-2 probability margin: a row of
    panels per statistic, a column per layer, a row per routing in each panel with its 5–95 % range (thin
    bar), interquartile range (thick bar) and median (tick); the baseline in red, its median dotted
    across the panel.

    ``quantiles``: ``routing, layer, statistic, quantile, value`` with the quantiles of
    :data:`DIAGNOSTIC_QUANTILES` (:func:`routelab.report.diagnostics.pooled_quantiles`).
    ``layers``: the layers to draw (default all).
    """
    _require_columns(quantiles, ["routing", "layer", "statistic", "quantile", "value"], "quantiles")
    layers = _chosen_layers(quantiles, layers)
    routings = sorted(quantiles["routing"].unique())
    wide = quantiles.pivot_table(index=["statistic", "layer", "routing"], columns="quantile", values="value")
    missing = [q for q in DIAGNOSTIC_QUANTILES if not np.isclose(wide.columns, q).any()]
    if missing:
        raise ValueError(f"quantiles lacks the quantile(s) {missing}; it has {sorted(wide.columns)}")
    wide.columns = [min(DIAGNOSTIC_QUANTILES, key=lambda q, c=c: abs(q - c)) for c in wide.columns]
    fig = Figure(figsize=(1.6 + 2.4 * len(layers), len(DIAGNOSTIC_PANELS) * (1.0 + 0.22 * len(routings))),
                 layout="constrained")
    grid = fig.subplots(len(DIAGNOSTIC_PANELS), len(layers), squeeze=False, sharey=True, sharex="row")
    y = np.arange(len(routings))
    colours = ["C3" if routing == baseline else "C0" for routing in routings]
    for (statistic, label), row in zip(DIAGNOSTIC_PANELS, grid):
        for ax, layer in zip(row, layers):
            try:
                values = wide.loc[(statistic, layer)].reindex(routings)
            except KeyError:
                values = pd.DataFrame(np.nan, index=routings, columns=list(DIAGNOSTIC_QUANTILES))
            ax.hlines(y, values[0.05], values[0.95], colors=colours, linewidth=1.2)
            ax.hlines(y, values[0.25], values[0.75], colors=colours, linewidth=5, alpha=0.5)
            ax.scatter(values[0.5], y, color=colours, marker="|", s=90, zorder=3)
            if baseline in values.index and np.isfinite(values.loc[baseline, 0.5]):
                ax.axvline(values.loc[baseline, 0.5], color="C3", linestyle=":", linewidth=1)
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        row[0].set_yticks(y, routings)
        row[0].set_ylim(len(routings) - 0.5, -0.5)
    save_figure(fig, path)
    return fig


def specialisation_order(ratio: Any) -> tuple[np.ndarray, np.ndarray]:
    """Column order of a ``[datasets, experts]`` heatmap of each expert's share relative to uniform:
    experts grouped by their peak dataset (the row where their ratio is largest), groups in row order,
    and within a group the most specialised first. Specialisation = the peak ratio over the expert's
    mean ratio across datasets (1: every dataset uses it alike, whatever its load); ties by expert id.

    Returns ``(order [experts], peak [experts])``: expert ids left to right and each one's peak row.
    """
    ratio = as_array(ratio, "ratio", ndim=2)
    peak = np.argmax(ratio, axis=0)
    mean = ratio.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        specialisation = np.where(mean > 0, ratio.max(axis=0) / mean, 0.0)
    experts = np.arange(ratio.shape[1])
    order = np.lexsort((experts, -specialisation, peak))  # last key sorts first
    return order, peak


SPECIALISATION_RANGE = 8.0  # colour scale 1/8 .. 8 times uniform; beyond it the end colours
EXPERT_TICKS_UP_TO = 64  # above this many experts the columns get no per-expert tick labels


def domain_specialisation(table: pd.DataFrame, uniform: float | None = None, layers: Sequence[int] | None = None,
                          title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Domain specialisation as heatmaps, one per layer: row = dataset, column = expert, colour = the
    share of the dataset's tokens routed to the expert relative to uniform (log scale, 1 = even spread,
    red above, blue below). Experts are ordered per layer by :func:`specialisation_order` (grouped by
    peak dataset, thin lines between the groups), so specialised experts form a block diagonal.

    ``table``: ``dataset, layer, expert, share`` (share in % of the dataset's tokens).
    ``uniform``: the even share in % (e.g. 100 k / experts); None = each (dataset, layer)'s mean share
    over the experts. ``layers``: the layers to draw (default all).
    """
    _require_columns(table, ["dataset", "layer", "expert", "share"])
    layers = _chosen_layers(table, layers)
    datasets = sorted(table["dataset"].unique())
    num_experts = int(table["expert"].max()) + 1
    norm = LogNorm(vmin=1 / SPECIALISATION_RANGE, vmax=SPECIALISATION_RANGE)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")  # grey: an expert with no row for the dataset
    fig = Figure(figsize=(min(3.0 + 0.13 * num_experts, 16.0), 0.6 + len(layers) * (0.9 + 0.26 * len(datasets))),
                 layout="constrained")
    panels = fig.subplots(len(layers), 1, squeeze=False).ravel()
    image = None
    for ax, layer in zip(panels, layers):
        rows = table[table["layer"] == layer]
        share = rows.pivot_table(index="dataset", columns="expert", values="share", aggfunc="sum")
        share = share.reindex(index=datasets, columns=range(num_experts)).to_numpy(dtype=float)
        reference = np.nanmean(share, axis=1, keepdims=True) if uniform is None else uniform
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = share / reference
        order, peak = specialisation_order(np.nan_to_num(ratio))
        # a never-chosen expert (ratio 0) takes the lowest colour rather than the "missing" grey
        shown = np.clip(ratio[:, order], norm.vmin, None)
        image = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
        for boundary in np.flatnonzero(np.diff(peak[order])):
            ax.axvline(boundary + 0.5, color="black", linewidth=0.8)
        ax.set_yticks(np.arange(len(datasets)), datasets)
        if num_experts <= EXPERT_TICKS_UP_TO:
            ax.set_xticks(np.arange(num_experts), [str(e) for e in order], fontsize=5.5, rotation=90)
            ax.set_xlabel("expert (ordered by peak dataset, then specialisation)")
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{num_experts} experts (ordered by peak dataset, then specialisation)")
        ax.set_title(f"layer {layer}", fontsize=10)
    colorbar = fig.colorbar(image, ax=list(panels), label="share of the dataset's tokens / uniform", shrink=0.9,
                            extend="both")
    ticks = [2.0 ** i for i in range(-3, 4)]
    colorbar.set_ticks(ticks, labels=[f"{v:g}" if v >= 1 else f"1/{1 / v:g}" for v in ticks])
    colorbar.minorticks_off()
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
