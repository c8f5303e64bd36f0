"""Figures of the routing analyses (:mod:`routelab.report.routing_analyses`' tables in, a ``Figure`` out).

Every figure pools the datasets (the mean over a config's datasets) and draws one line per routing
config, the configs told apart by colour and marker with the legend outside the axes, so twenty and
more configs stay legible; nothing is drawn per expert, so 64 and 256 experts read alike. Saved only
when a ``path`` is given, atomically (:func:`routelab.plot.drawing.save_figure`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from routelab.plot.drawing import save_figure
from routelab.report.statistics import require_columns

MARKERS = "osD^vP*Xh<>p"
PANEL = (5.2, 3.4)  # inches per panel of the per-layer line figures
SMALL_PANEL = (2.6, 2.1)  # inches per config panel of the specialisation figure
SMALL_COLUMNS = 5


def config_styles(routings: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A colour and marker per routing config: tab10/tab20 colours while they last, then evenly spaced
    hues; markers cycle at another period so that no two configs share both."""
    routings = list(routings)
    n = len(routings)
    colours = (colormaps["tab10"].colors[:n] if n <= 10 else colormaps["tab20"].colors[:n] if n <= 20
               else [colormaps["turbo"](x) for x in np.linspace(0.05, 0.95, n)])
    return {routing: {"color": colours[i], "marker": MARKERS[i % len(MARKERS)]} for i, routing in enumerate(routings)}


def _legend(fig: Figure, styles: dict[str, dict[str, Any]], extra: Sequence[Line2D] = ()) -> None:
    handles = [Line2D([], [], label=routing, linewidth=1.5, markersize=5, **style) for routing, style in styles.items()]
    handles.extend(extra)
    fig.legend(handles=handles, loc="outside right upper", ncols=1 if len(handles) <= 18 else 2, fontsize="small",
               frameon=False)


def _pooled(table: pd.DataFrame, keys: Sequence[str], values: Sequence[str]) -> pd.DataFrame:
    """Mean over datasets of ``values`` per ``keys``."""
    return table.groupby(list(keys), sort=True)[list(values)].mean().reset_index()


def _layer_lines(table: pd.DataFrame, x: str, panels: Sequence[tuple[str, str]], title: str,
                 chance: dict[str, str] | None = None, x_label: str = "layer") -> Figure:
    """One panel per ``(column, y label)`` of ``panels``; one line per routing over ``x``; ``chance`` maps a
    column to the column of its chance level, drawn dotted in the config's colour."""
    chance = chance or {}
    styles = config_styles(sorted(table["routing"].unique()))
    fig = Figure(figsize=(PANEL[0] * len(panels) + 2.2, PANEL[1]), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, label) in zip(axes, panels):
        for routing, style in styles.items():
            rows = table[table["routing"] == routing].sort_values(x)
            ax.plot(rows[x], rows[column], linewidth=1.3, markersize=4, **style)
            if column in chance:
                ax.plot(rows[x], rows[chance[column]], color=style["color"], linestyle=":", linewidth=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=10))
        ax.grid(alpha=0.3)
    extra = [Line2D([], [], color="0.4", linestyle=":", label="chance (shuffled tokens)")] if chance else []
    _legend(fig, styles, extra)
    fig.suptitle(title)
    return fig


def vocabulary_specialisation(vocabulary: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    """One small panel per routing config: per layer, the distribution across experts of the experts'
    vocabulary specialisation (box: quartiles, whiskers: 5th-95th percentile; datasets averaged per
    expert), and the median usage (what routing blind to the token id would give) dashed."""
    require_columns(vocabulary, ["routing", "layer", "expert", "specialisation", "usage"], "vocabulary")
    table = _pooled(vocabulary.dropna(subset=["specialisation"]), ["routing", "layer", "expert"],
                    ["specialisation", "usage"])
    routings = sorted(table["routing"].unique())
    columns = min(SMALL_COLUMNS, len(routings))
    rows = math.ceil(len(routings) / columns)
    fig = Figure(figsize=(SMALL_PANEL[0] * columns, SMALL_PANEL[1] * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True).ravel()
    for ax in axes[len(routings):]:
        ax.remove()
    for ax, routing in zip(axes, routings):
        rows_of = table[table["routing"] == routing]
        layers = sorted(rows_of["layer"].unique())
        data = [rows_of.loc[rows_of["layer"] == layer, "specialisation"].to_numpy() for layer in layers]
        ax.boxplot(data, positions=layers, widths=0.6, whis=(5, 95), showfliers=False, patch_artist=True,
                   manage_ticks=False, boxprops={"facecolor": "C0", "alpha": 0.5}, medianprops={"color": "k"})
        usage = rows_of.groupby("layer")["usage"].median()
        ax.plot(usage.index, usage.to_numpy(), color="C3", linestyle="--", linewidth=1)
        ax.set_title(routing, fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=5))
        ax.tick_params(labelsize="small")
        ax.grid(alpha=0.3, axis="y")
    fig.supxlabel("layer")
    fig.supylabel("vocabulary specialisation")
    fig.suptitle("Vocabulary specialisation of the experts (dashed: median usage, the token-blind level)")
    save_figure(fig, path)
    return fig


def cross_layer_predictability(cross_layer: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    """Per layer pair (l, l + 1) and config: the accuracy of predicting layer l + 1's top-1 expert from
    layer l's, and the share of H(top-1 of l + 1) left once layer l's top-1 is known."""
    require_columns(cross_layer, ["routing", "layer", "top1_accuracy", "conditional_entropy_bits", "entropy_bits"],
             "cross_layer")
    table = _pooled(cross_layer, ["routing", "layer"], ["top1_accuracy", "conditional_entropy_bits", "entropy_bits"])
    table["entropy_left"] = table["conditional_entropy_bits"] / table["entropy_bits"].where(table["entropy_bits"] > 0)
    fig = _layer_lines(table, "layer", [("top1_accuracy", "top-1 of l + 1 predicted from l's"),
                                        ("entropy_left", "H(top-1 of l + 1 | l) / H(top-1 of l + 1)")],
                       "Cross-layer predictability of the top-1 expert", x_label="layer l (predicting layer l + 1)")
    save_figure(fig, path)
    return fig


def temporal_locality(locality: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    """Per layer and config: the share of consecutive tokens that share an expert and their mean Jaccard,
    each with its chance level (tokens paired at random) dotted."""
    require_columns(locality, ["routing", "layer", "share_any", "jaccard", "chance_share_any", "chance_jaccard"],
                    "locality")
    table = _pooled(locality, ["routing", "layer"], ["share_any", "jaccard", "chance_share_any", "chance_jaccard"])
    fig = _layer_lines(table, "layer", [("share_any", "consecutive tokens sharing an expert"),
                                        ("jaccard", "Jaccard of consecutive tokens' experts")],
                       "Temporal locality of expert selection",
                       chance={"share_any": "chance_share_any", "jaccard": "chance_jaccard"})
    save_figure(fig, path)
    return fig


def baseline_agreement(agreement: pd.DataFrame, baseline: str, path: str | os.PathLike | None = None) -> Figure:
    """Per layer and config (the baseline left out): mean Jaccard of the config's experts with the
    baseline's on the same tokens, and the share of tokens that keep the baseline's top-1 expert."""
    require_columns(agreement, ["routing", "layer", "jaccard", "top1_kept"], "baseline_agreement")
    table = agreement[agreement["routing"] != baseline]
    if table.empty:
        raise ValueError(f"baseline_agreement has no config other than the baseline {baseline}")
    table = _pooled(table, ["routing", "layer"], ["jaccard", "top1_kept"])
    fig = _layer_lines(table, "layer", [("jaccard", f"Jaccard with {baseline}"),
                                        ("top1_kept", f"share keeping {baseline}'s top-1")],
                       f"Agreement with the baseline {baseline}")
    save_figure(fig, path)
    return fig


def adaptive_routings(table: pd.DataFrame) -> list[str]:
    """The configs of a k-by-bin table whose mean k varies (between bins, layers or datasets)."""
    spread = table.groupby("routing")["k_mean"].agg(lambda k: k.max() - k.min())
    return sorted(spread[spread > 1e-9].index)


def _bin_label(low: int, high: int) -> str:
    return f"{low}" if high == low + 1 else f"{low}–{high - 1}"


def k_by_bin(table: pd.DataFrame, low: str, high: str, x_label: str, title: str,
             path: str | os.PathLike | None = None) -> Figure:
    """Mean k per bin (columns ``low``/``high``, log2-spaced) for each adaptive config, pooled over layers
    and datasets (weighted by tokens); ValueError when no config's k varies."""
    require_columns(table, ["routing", low, high, "tokens", "k_mean"], "k table")
    routings = adaptive_routings(table)
    if not routings:
        raise ValueError("no routing config's k varies: nothing to draw")
    table = table[table["routing"].isin(routings)].assign(weighted=lambda t: t["k_mean"] * t["tokens"])
    pooled = table.groupby(["routing", low, high], sort=True)[["weighted", "tokens"]].sum().reset_index()
    pooled["k_mean"] = pooled["weighted"] / pooled["tokens"]
    bins = pooled[[low, high]].drop_duplicates().sort_values(low)
    index = {value: i for i, value in enumerate(bins[low])}
    pooled["bin"] = pooled[low].map(index)
    fig = _layer_lines(pooled, "bin", [("k_mean", "mean experts per token (k)")], title, x_label=x_label)
    ax = fig.axes[0]
    step = max(1, math.ceil(len(bins) / 10))  # at most ~10 tick labels: none overlap
    ticks = np.arange(0, len(bins), step)
    ax.set_xticks(ticks, [_bin_label(int(a), int(b)) for a, b in bins.to_numpy()[ticks]], rotation=30, ha="right")
    save_figure(fig, path)
    return fig


def k_by_position(table: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    return k_by_bin(table, "position_low", "position_high", "position in the window (log2 bins)",
                    "Where adaptive k puts its experts: position in the sequence", path)


def k_by_frequency(table: pd.DataFrame, path: str | os.PathLike | None = None) -> Figure:
    return k_by_bin(table, "frequency_low", "frequency_high", "occurrences of the token id in the dataset (log2 bins)",
                    "Where adaptive k puts its experts: token frequency", path)


def top_tokens_table(top: pd.DataFrame, routing: str, layer: int) -> pd.DataFrame:
    """The report's table of the most specialised experts of ``routing`` in ``layer``, one row per
    (dataset, expert): its specialisation and its top tokens as ``text (share %)``."""
    rows = top[(top["routing"] == routing) & (top["layer"] == layer)]
    if rows.empty:
        return pd.DataFrame(columns=["dataset", "expert", "specialisation", "top tokens"])
    label = rows["text"].where(rows["text"].notna(), rows["token_id"].map(lambda i: f"#{i}"))
    rows = rows.assign(label=[f"{text!r} ({100 * share:.0f} %)" for text, share in zip(label, rows["token_share"])])
    grouped = rows.sort_values("rank").groupby(["dataset", "expert"], sort=False)
    table = grouped.agg(specialisation=("specialisation", "first"), tokens=("label", ", ".join)).reset_index()
    table = table.rename(columns={"tokens": "top tokens"})
    return table.sort_values(["dataset", "specialisation"], ascending=[True, False], ignore_index=True)
