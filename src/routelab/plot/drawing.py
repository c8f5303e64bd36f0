"""Per-run figures of routing behaviour: plain arrays in, a matplotlib ``Figure`` out.

Cross-run figures live in :mod:`routelab.report.figures`; loading a run's files into the arrays
these functions take lives in :mod:`routelab.plot.run_figures`.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so they need no display,
never touch the global backend and are freed as soon as they go out of scope. A figure is saved
only when a ``path`` is given, and then atomically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter
from scipy.special import betaincc, stdtr

from routelab.io.files import atomic_path

DPI = 120  # sharp on screen and in the report; 150 cost a third more time per figure for no legibility gain

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
        # zlib level 1: the same pixels, a fifth larger, and a quarter less time to save the figure
        fig.savefig(tmp, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})


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
    std = float(np.sqrt((counts * (ks - mean) ** 2).sum() / total))
    median = _quantile_from_counts(ks, counts, 0.5)

    fig = Figure(figsize=(7.2, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bar(bins, heights, width=0.85, color="C0", alpha=0.8)
    if np.unique(ks[counts > 0]).size > 1:  # a KDE of a single value is a degenerate spike
        grid = np.linspace(bins[0] - 0.5, bins[-1] + 0.5, 200)
        # density x decisions x bar width (1) puts the curve on the bars' scale
        ax.plot(grid, _kde_from_counts(ks, counts, grid) * total, color="C1", linewidth=1.5, label="KDE")
    ax.axvline(mean, color="C3", linestyle="-", linewidth=2, label=f"mean = {mean:.2f}")
    ax.axvline(median, color="C2", linestyle="-.", linewidth=1.5, label=f"median = {median:g}")
    ax.axvline(min_k, color="0.3", linestyle="--", linewidth=1.5, label=f"min_k = {min_k}")
    ax.axvline(max_k, color="0.1", linestyle=":", linewidth=1.5, label=f"max_k = {max_k}")
    ax.set_xlim(bins[0] - 1, bins[-1] + 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("experts selected per token and layer")
    ax.set_ylabel("routing decisions")
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.text(1.02, 0.0, _stats_text(mean, median, std, int(ks[counts > 0].min()), int(ks[counts > 0].max())),
            transform=ax.transAxes, ha="left", va="bottom", family="monospace", fontsize=9,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6"})
    if title:
        ax.set_title(title)
    return fig


def _stats_text(mean: float, median: float, std: float, low: int, high: int) -> str:
    return f"mean   {mean:.2f}\nmedian {median:g}\nstd    {std:.2f}\nrange  {low}–{high}"


MIN_KDE_BANDWIDTH = 0.5  # experts: k is discrete, a narrower kernel only draws spikes at the integers


def _kde_from_counts(values: np.ndarray, counts: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian KDE density on ``grid`` of ``values`` repeated ``counts`` times, with Scott's bandwidth
    (sample std x n^(-1/5)) of the repeated sample but at least ``MIN_KDE_BANDWIDTH``: what
    ``scipy.stats.gaussian_kde`` gives for the repeated array with that bandwidth. (Passing counts as
    its ``weights`` would not: it takes them as reliability weights, which changes the bandwidth.)"""
    n = counts.sum()
    mean = (values * counts).sum() / n
    scott = np.sqrt((counts * (values - mean) ** 2).sum() / (n - 1)) * n ** -0.2
    bandwidth = max(scott, MIN_KDE_BANDWIDTH)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return (counts * np.exp(-0.5 * z ** 2)).sum(axis=1) / (n * bandwidth * np.sqrt(2 * np.pi))


def _quantile_from_counts(values: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The ``q`` quantile of ``values`` repeated ``counts`` times, interpolated linearly between order
    statistics as ``np.quantile`` does, without materialising the repeated array."""
    order = np.argsort(values)
    values, counts = values[order], np.asarray(counts, dtype=np.int64)[order]
    ends = np.cumsum(counts)  # order statistic i (0-based) has value values[searchsorted(ends, i, "right")]
    position = q * (ends[-1] - 1)
    low, high = np.floor(position), np.ceil(position)
    below, above = values[np.searchsorted(ends, [low, high], side="right")]
    return float(below + (above - below) * (position - low))


def _integer_values(values: np.ndarray, name: str) -> np.ndarray:
    bad = ~np.isfinite(values) | (values != np.round(values))
    if bad.any():
        raise ValueError(f"{name} must hold whole numbers, got {values[bad][0]!r}")
    return values.astype(int)


def experts_histogram(k: Any, min_k: int, max_k: int, title: str | None = None,
                      path: str | os.PathLike | None = None) -> Figure:
    """Histogram of the number of experts selected per (token, layer) decision.

    ``k``: ``[decisions]`` experts selected in each decision. One bar per integer k (decisions), a
    Gaussian KDE of k scaled to the bars (when k takes more than one value; Scott's bandwidth, at
    least ``MIN_KDE_BANDWIDTH`` since k is discrete), vertical lines at the
    mean, median, ``min_k`` and ``max_k``, and a box with mean, median, population std and range.
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
    share, label = _share_of_tokens(counts, tokens_per_layer)

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


def _check_lengths(reference: str, size: int, **others: Any) -> None:
    """ValueError naming the argument whose length differs from ``reference``'s ``size``."""
    for name, values in others.items():
        if len(values) != size:
            raise ValueError(f"{name} has {len(values)} entries but {reference} has {size}")


def _probabilities(values: np.ndarray, name: str) -> np.ndarray:
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"{name} must lie in [0, 1]; got values from {np.nanmin(values):g} to "
                         f"{np.nanmax(values):g}" + (" and NaN" if np.isnan(values).any() else ""))
    return values


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")


def _sample_indices(n: int, max_points: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` items; a fixed seed makes the sample (and so
    the figure) the same on every run."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, size=max_points, replace=False))


def _evenly_spaced(n: int, count: int) -> np.ndarray:
    """``count`` (at most ``n``) indices spread evenly over ``0..n-1``, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).round().astype(int))


def _panels(n: int, columns: int, size: tuple[float, float]) -> tuple[Figure, list[Any]]:
    columns = min(n, columns)
    rows = -(-n // columns)
    fig = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.remove()
    return fig, axes[:n]


def _share_of_tokens(counts: np.ndarray, tokens_per_layer: Any) -> tuple[np.ndarray, str]:
    """``counts [layers, experts]`` as % of each layer's tokens (or of its selections when
    ``tokens_per_layer`` is None), with the matching axis label."""
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
    return share, label


def _corner_text(ax: Any, text: str, x: float = 0.98, y: float = 0.97, ha: str = "right",
                 va: str = "top") -> None:
    ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9})


def _ks_distance_to_uniform(p: np.ndarray) -> float:
    """One-sample Kolmogorov–Smirnov statistic against uniform [0, 1] (what ``scipy.stats.kstest``
    returns as ``statistic``), from one sort: millions of p-values are common."""
    ordered = np.sort(p)
    rank = np.arange(1, ordered.size + 1) / ordered.size
    return float(max((rank - ordered).max(), (ordered - (rank - 1.0 / ordered.size)).max()))


def pvalue_distribution(pvalues: Any, bins: int = 20, title: str | None = None,
                        path: str | os.PathLike | None = None) -> Figure:
    """P-values against the uniform [0, 1] they follow when the null describes the logits.

    ``pvalues``: ``[values]`` p-values (all experts of the sampled decisions, pooled). Left: density
    histogram on ``bins`` equal bins over [0, 1] with the uniform density 1 dashed. Right: empirical
    CDF on a 201-point grid against the diagonal, with the Kolmogorov–Smirnov distance to uniform.
    Mass piled near 0 are the experts a p-value router can select.
    """
    p = _probabilities(as_array(pvalues, "pvalues"), "pvalues")
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    hist_ax, cdf_ax = fig.subplots(1, 2)
    hist_ax.hist(p, bins=np.linspace(0.0, 1.0, bins + 1), density=True, color="C0", alpha=0.8,
                 label="p-values")
    hist_ax.axhline(1.0, color="0.2", linestyle="--", linewidth=1.2, label="uniform [0, 1]")
    hist_ax.set_xlim(0, 1)
    hist_ax.set_xlabel("p-value")
    hist_ax.set_ylabel("density")
    hist_ax.legend(loc="lower center", framealpha=0.9)

    grid = np.linspace(0.0, 1.0, 201)
    cdf_ax.plot(grid, np.searchsorted(np.sort(p), grid, side="right") / p.size, color="C0",
                label="empirical CDF")
    cdf_ax.plot([0, 1], [0, 1], color="0.2", linestyle="--", linewidth=1.2, label="uniform [0, 1]")
    cdf_ax.set_xlim(0, 1)
    cdf_ax.set_ylim(0, 1)
    cdf_ax.set_xlabel("p-value")
    cdf_ax.set_ylabel("fraction ≤ p-value")
    cdf_ax.legend(frameon=False, loc="upper left")
    distance = _ks_distance_to_uniform(p)
    _corner_text(cdf_ax, f"KS distance {distance:.3f}\nmean {p.mean():.3f} (uniform 0.5)\n"
                         f"n = {p.size:,}", y=0.03, va="bottom")
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return fig


def logit_vs_pvalue(logits: Any, pvalues: Any, layer: Any, max_points: int = 20_000,
                    title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Router logit against its p-value, one point per (decision, expert), coloured by layer.

    ``logits``, ``pvalues``, ``layer``: ``[points]`` each. At most ``max_points`` points are drawn, a
    fixed-seed random sample, so a large run stays legible and fast. A null fitted per layer shows as
    one monotone (decreasing) curve per colour.
    """
    x = as_array(logits, "logits")
    y = _probabilities(as_array(pvalues, "pvalues"), "pvalues")
    layers = _integer_values(as_array(layer, "layer"), "layer")
    _check_lengths("logits", x.size, pvalues=y, layer=layers)
    keep = _sample_indices(x.size, max_points)
    low, high = int(layers.min()), int(layers.max())

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    points = ax.scatter(x[keep], y[keep], c=layers[keep], s=6, alpha=0.6, linewidths=0,
                        cmap=colormaps["viridis"].resampled(high - low + 1), vmin=low - 0.5, vmax=high + 0.5)
    colorbar = fig.colorbar(points, ax=ax, label="layer")
    colorbar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("router logit")
    ax.set_ylabel("p-value")
    ax.set_ylim(-0.02, 1.02)
    shown = f"{keep.size:,} of {x.size:,}" if keep.size < x.size else f"{x.size:,}"
    ax.set_title(f"{title + ': ' if title else ''}{shown} (decision, expert) pairs", fontsize=10)
    save_figure(fig, path)
    return fig


def _bh_inputs(sorted_pvalues: Any, alpha: float, passing_rank: Any, k: Any
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sorted_p = _probabilities(as_array(sorted_pvalues, "sorted_pvalues", ndim=2), "sorted_pvalues")
    if np.any(np.diff(sorted_p, axis=1) < 0):
        raise ValueError("sorted_pvalues rows must be in ascending order")
    _check_alpha(alpha)
    ranks = _integer_values(as_array(passing_rank, "passing_rank"), "passing_rank")
    ks = _integer_values(as_array(k, "k"), "k")
    _check_lengths("sorted_pvalues", sorted_p.shape[0], passing_rank=ranks, k=ks)
    num_experts = sorted_p.shape[1]
    for name, values in (("passing_rank", ranks), ("k", ks)):
        if values.min() < 0 or values.max() > num_experts:
            raise ValueError(f"{name} must lie in [0, {num_experts}] (the number of experts)")
    return sorted_p, ranks, ks


def _spread_over_ranks(ranks: np.ndarray, count: int) -> np.ndarray:
    """Up to ``count`` decision indices covering the range of passing ranks: the first decision of
    evenly spaced distinct ranks, then (when there are fewer distinct ranks than ``count``) further
    decisions spread over the rest; ordered by rank."""
    distinct = np.unique(ranks)
    chosen = [int(np.flatnonzero(ranks == rank)[0]) for rank in distinct[_evenly_spaced(distinct.size, count)]]
    order = np.argsort(ranks, kind="stable")
    rest = order[~np.isin(order, chosen)]
    if len(chosen) < count and rest.size:
        chosen += [int(i) for i in rest[_evenly_spaced(rest.size, count - len(chosen))]]
    return np.array(sorted(chosen, key=lambda i: (ranks[i], i)), dtype=int)


def bh_decisions(sorted_pvalues: Any, alpha: float, passing_rank: Any, k: Any,
                 labels: Sequence[str] | None = None, max_panels: int = 6, title: str | None = None,
                 path: str | os.PathLike | None = None) -> Figure:
    """The Benjamini–Hochberg step-up made visible for a few sampled decisions.

    ``sorted_pvalues``: ``[decisions, experts]`` each decision's p-values in ascending order;
    ``passing_rank``, ``k``: ``[decisions]`` the step-up rank ``max{i : p_(i) <= i*alpha/N}`` (0 when
    none passes) and the experts finally selected (after the ``min_k``/``max_k`` clamp); ``labels``:
    ``[decisions]`` panel titles. ``max_panels`` decisions are shown, spread over the distinct passing
    ranks (lowest to highest). Each panel, on log-log axes: the sorted p-values (the ``k`` selected in
    red), the BH line ``i*alpha/N`` and a dashed vertical line at the passing rank.
    """
    sorted_p, ranks, ks = _bh_inputs(sorted_pvalues, alpha, passing_rank, k)
    if labels is not None:
        _check_lengths("sorted_pvalues", sorted_p.shape[0], labels=labels)
    chosen = _spread_over_ranks(ranks, max_panels)
    num_experts = sorted_p.shape[1]
    expert_rank = np.arange(1, num_experts + 1)
    fig, axes = _panels(chosen.size, 3, (3.8, 3.0))
    for ax, row in zip(axes, chosen):
        ax.plot(expert_rank, sorted_p[row], "o", markersize=3, color="0.55", label="sorted p-values")
        ax.plot(expert_rank[:ks[row]], sorted_p[row, :ks[row]], "o", markersize=4, color="C3",
                label=f"selected (k = {ks[row]})")
        ax.plot(expert_rank, expert_rank * alpha / num_experts, color="C0", linewidth=1.5,
                label=f"i·α/N (α = {alpha:g})")
        if ranks[row] > 0:
            ax.axvline(ranks[row], color="C2", linestyle="--", linewidth=1.2,
                       label=f"passing rank = {ranks[row]}")
        else:
            _corner_text(ax, "no p-value under the line:\npassing rank 0", x=0.03, ha="left")
        ax.set_xscale("log")
        ax.set_yscale("log")
        # powers of two for ranks, and no minor ticks: log-axis tick placement dominates drawing time
        ax.xaxis.set_major_locator(FixedLocator(2.0 ** np.arange(int(np.log2(num_experts)) + 1)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("rank i (ascending p-value)")
        ax.set_ylabel("p-value")
        ax.legend(frameon=False, fontsize=7, loc="lower right")
        if labels is not None:
            ax.set_title(labels[row], fontsize=9)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return fig


def bh_pass_rate(sorted_pvalues: Any, alpha: float, passing_rank: Any, k: Any, title: str | None = None,
                 path: str | os.PathLike | None = None) -> Figure:
    """How often the expert at each p-value rank passes, over sampled decisions.

    Inputs as for :func:`bh_decisions`. Three lines against the rank i (ascending p-value), in % of
    decisions: ``p_(i) <= i*alpha/N`` (the rank's own comparison), ``i <= passing rank`` (selected by
    the step-up, which also keeps ranks above their own line when a later rank passes) and
    ``i <= k`` (selected after the ``min_k``/``max_k`` clamp). The x axis ends a little after the last
    rank any line reaches.
    """
    sorted_p, ranks, ks = _bh_inputs(sorted_pvalues, alpha, passing_rank, k)
    num_experts = sorted_p.shape[1]
    expert_rank = np.arange(1, num_experts + 1)
    own_test = 100.0 * (sorted_p <= expert_rank * alpha / num_experts).mean(axis=0)
    step_up = 100.0 * (expert_rank[None, :] <= ranks[:, None]).mean(axis=0)
    selected = 100.0 * (expert_rank[None, :] <= ks[:, None]).mean(axis=0)

    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(expert_rank, own_test, "o-", markersize=3, color="C0", label="p_(i) ≤ i·α/N")
    ax.plot(expert_rank, step_up, "s-", markersize=3, color="C2", label="i ≤ passing rank (BH step-up)")
    ax.plot(expert_rank, selected, "^-", markersize=3, color="C3", label="i ≤ k (after min_k / max_k)")
    reached = np.flatnonzero((own_test > 0) | (step_up > 0) | (selected > 0))
    last = int(reached.max()) + 1 if reached.size else 1
    ax.set_xlim(0.5, min(num_experts, max(last + 2, 8)) + 0.5)
    ax.set_ylim(-2, 102)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank i (ascending p-value)")
    ax.set_ylabel("% of sampled decisions")
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}{ranks.size:,} decisions, α = {alpha:g}", fontsize=10)
    save_figure(fig, path)
    return fig


def routing_sequence(weights: Any, tokens: Sequence[str], layers: Sequence[int] | None = None,
                     max_tokens: int = 40, max_experts: int = 24, title: str | None = None,
                     path: str | os.PathLike | None = None) -> Figure:
    """Which experts each token of one sequence is routed to, and with what weight.

    ``weights``: ``[layers, tokens, experts]`` routing weight, NaN where the expert was not selected;
    ``tokens``: ``[tokens]`` the tokens as text (x axis); ``layers``: ``[layers]`` layer numbers (panel
    labels, default 0, 1, ...). One panel per layer, stacked; the first ``max_tokens`` tokens; rows are
    only the experts selected for at least one shown token, the ``max_experts`` most often selected
    when more are (by expert number). Blank cells: not selected.
    """
    w = as_array(weights, "weights", ndim=3)
    num_layers, num_tokens, _ = w.shape
    _check_lengths("weights' token axis", num_tokens, tokens=tokens)
    layers = list(range(num_layers)) if layers is None else list(layers)
    _check_lengths("weights' layer axis", num_layers, layers=layers)
    shown_tokens = min(num_tokens, max_tokens)
    w = w[:, :shown_tokens]
    selected = ~np.isnan(w)
    uses = selected.sum(axis=1)  # [layers, experts]
    rows = []
    for layer_uses in uses:
        used = np.flatnonzero(layer_uses)
        if used.size > max_experts:  # keep the most used; stable sort keeps ties in expert order
            used = np.sort(used[np.argsort(-layer_uses[used], kind="stable")[:max_experts]])
        rows.append(used)
    vmax = float(np.nanmax(w)) if selected.any() else 1.0

    heights = [max(r.size, 1) for r in rows]
    fig = Figure(figsize=(2.5 + 0.2 * shown_tokens, 1.2 + sum(0.16 * h + 0.35 for h in heights)),
                 layout="constrained")
    # Not sharex: shared axes build a tick object per token on every panel, most of the figure's time.
    axes = fig.subplots(num_layers, 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax in axes[:-1]:
        ax.set_xticks([])
    image = None
    for ax, layer_w, used, layer in zip(axes, w, rows, layers):
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
        if used.size == 0:
            _corner_text(ax, "no expert selected", x=0.5, y=0.5, ha="center", va="center")
            ax.set_yticks([])
            continue
        image = ax.imshow(np.ma.masked_invalid(layer_w[:, used].T), aspect="auto", cmap="viridis",
                          vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(used.size), [str(e) for e in used], fontsize=6)
    axes[-1].set_xticks(range(shown_tokens), list(tokens[:shown_tokens]), rotation=90, fontsize=7)
    axes[-1].set_xlabel("token")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="routing weight", shrink=0.8)
    note = f"first {shown_tokens} of {num_tokens} tokens" if shown_tokens < num_tokens else f"{num_tokens} tokens"
    axes[0].set_title(f"{title + ': ' if title else ''}{note}", fontsize=10)
    save_figure(fig, path)
    return fig


def _bar_vertices(x: np.ndarray, heights: np.ndarray, width: float) -> np.ndarray:
    """``[bars, 4, 2]`` corners of bars centred on ``x`` rising from 0 to ``heights``."""
    left, right = x - width / 2, x + width / 2
    zero = np.zeros_like(heights)
    return np.stack([np.column_stack(corner) for corner in
                     ((left, zero), (left, heights), (right, heights), (right, zero))], axis=1)


def _utilisation_text(share: np.ndarray) -> str:
    mean, std = share.mean(), share.std()
    cv = f"{std / mean:.2f}" if mean > 0 else "n/a"
    unused = int((share == 0).sum())
    ratio = f"{share.max() / share.min():.1f}" if unused == 0 else f"∞ ({unused} unused)"
    return f"CV {cv}\nmax/min {ratio}"


def expert_utilisation(counts: Any, tokens_per_layer: Any = None, max_panels: int = 16,
                       title: str | None = None, path: str | os.PathLike | None = None) -> Figure:
    """Per-layer expert load: one bar per expert, coloured over-/under-used.

    ``counts``: ``[layers, experts]`` selections; ``tokens_per_layer``: ``[layers]`` decisions, which
    makes a bar the % of the layer's tokens routed to the expert (without it, % of the layer's
    selections). One panel per layer (``max_panels`` evenly spaced layers when there are more): a
    line at the mean, a band of mean ± population std, bars red above the band (over-used), blue
    below it (under-used), grey within, and the coefficient of variation (std/mean) and max/min ratio.
    """
    counts = as_array(counts, "counts", ndim=2)
    share, unit = _share_of_tokens(counts, tokens_per_layer)
    shown = _evenly_spaced(counts.shape[0], max_panels)
    experts = np.arange(counts.shape[1])
    fig, axes = _panels(shown.size, 4, (4.2, 2.6))
    for ax, layer in zip(axes, shown):
        values = share[layer]
        mean, std = values.mean(), values.std()
        colours = np.where(values > mean + std, "C3", np.where(values < mean - std, "C0", "0.6"))
        # one collection of bars, not a Rectangle artist per expert: far cheaper to draw at 64+ experts
        ax.add_collection(PolyCollection(_bar_vertices(experts, values, 0.9), facecolors=colours,
                                         edgecolors="none"), autolim=True)
        ax.autoscale_view()
        ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.15, linewidth=0)
        ax.axhline(mean, color="0.1", linewidth=1.0)
        _corner_text(ax, _utilisation_text(values))
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Patch(color="C3", label="over-used (> mean + std)"),
               Patch(color="0.6", label="within mean ± std"),
               Patch(color="C0", label="under-used (< mean − std)"),
               Patch(color="0.5", alpha=0.15, label="mean ± std band (line: mean)")]
    fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
    return fig


def token_rarity(token_ids: Any, experts: Any, max_points: int = 5000, title: str | None = None,
                 path: str | os.PathLike | None = None) -> Figure:
    """Do rare tokens get more experts? Rarity against experts selected, one point per token.

    ``token_ids``: ``[tokens]`` token ids of the run's data; ``experts``: ``[tokens]`` experts selected
    for each token (e.g. its mean over layers). Rarity is ``-log10`` of the token id's relative
    frequency among ``token_ids`` (0 = every token is this one; +1 = ten times rarer). Drawn: a
    fixed-seed sample of ``max_points`` tokens, the least-squares line and, in the box, Pearson and
    Spearman correlations with their p-values over all tokens (neither line nor correlations when
    rarity or experts is constant, e.g. top-k: the box says so).
    """
    ids = _integer_values(as_array(token_ids, "token_ids"), "token_ids")
    y = as_array(experts, "experts")
    _check_lengths("token_ids", ids.size, experts=y)
    _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    rarity = -np.log10(counts[inverse] / ids.size)
    keep = _sample_indices(ids.size, max_points)

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.scatter(rarity[keep], y[keep], s=8, alpha=0.3, linewidths=0, color="C0",
               label=f"tokens ({keep.size:,} of {ids.size:,} drawn)" if keep.size < ids.size else "tokens")
    if np.ptp(rarity) > 0 and np.ptp(y) > 0:
        slope, intercept = np.polyfit(rarity, y, 1)
        ends = np.array([rarity.min(), rarity.max()])
        ax.plot(ends, intercept + slope * ends, color="C3", linewidth=2,
                label=f"least squares: {slope:+.3f} experts per decade")
        (pearson, pearson_p), (spearman, spearman_p) = correlation(rarity, y), correlation(rarity, y, ranks=True)
        text = (f"Pearson r = {pearson:.3f} (p = {pearson_p:.2g})\n"
                f"Spearman ρ = {spearman:.3f} (p = {spearman_p:.2g})")
    else:
        text = "correlation undefined: " + ("experts selected is constant" if np.ptp(y) == 0
                                            else "every token id is equally frequent")
    _corner_text(ax, f"{text}\nn = {ids.size:,} tokens", x=0.02, ha="left")
    ax.ticklabel_format(axis="y", useOffset=False)  # a constant k (top-k) would read "1e-11 + 8"
    ax.set_xlabel("token rarity: −log10 relative frequency")
    ax.set_ylabel("experts selected per token")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
    if title:
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    return fig


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (``scipy.stats.rankdata``'s default)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2.0)[inverse]


def correlation(x: np.ndarray, y: np.ndarray, ranks: bool = False) -> tuple[float, float]:
    """Pearson's r (Spearman's ρ with ``ranks``) of ``x`` and ``y`` and its two-sided p-value, computed
    as ``scipy.stats.pearsonr`` (r's exact beta distribution) and ``spearmanr`` (the t-test with n - 2
    degrees of freedom) compute them. Written here because importing ``scipy.stats`` costs every plot
    job more than a second; tests compare it against scipy."""
    n = x.size
    if ranks:
        r = np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1]
        with np.errstate(divide="ignore"):
            t = r * np.sqrt(np.clip((n - 2) / ((r + 1.0) * (1.0 - r)), 0.0, None))
        return float(r), float(2.0 * stdtr(n - 2, -abs(t)))
    # centred and scaled as scipy does, so that r rounds alike (it decides p near |r| = 1)
    x, y = x - x.mean(), y - y.mean()
    x, y = x / np.abs(x).max(), y / np.abs(y).max()
    r = float(np.clip(np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y)), -1.0, 1.0))
    if n == 2:
        return r, 1.0
    a = n / 2 - 1  # r ~ Beta(a, a) on [-1, 1] under independence
    return r, float(min(1.0, 2.0 * betaincc(a, a, (abs(r) + 1.0) / 2.0)))


def _box_stats(values: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """Matplotlib ``bxp`` statistics of integer ``values`` repeated ``counts`` times: quartiles
    interpolated as ``np.percentile``, whiskers at the furthest values within 1.5 IQR, and each
    distinct value beyond them once as a flier."""
    q1, median, q3 = (_quantile_from_counts(values, counts, q) for q in (0.25, 0.5, 0.75))
    low, high = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
    inside = values[(values >= low) & (values <= high)]
    return {"med": median, "q1": q1, "q3": q3,
            "whislo": inside.min() if inside.size else q1, "whishi": inside.max() if inside.size else q3,
            "fliers": values[(values < low) | (values > high)]}


def layer_experts_boxplot(layer: Any, k: Any, title: str | None = None,
                          path: str | os.PathLike | None = None) -> Figure:
    """Experts selected per decision, one box per layer, with the per-layer mean as a line.

    ``layer``, ``k``: ``[decisions]`` the layer of each decision and the experts it selected. Boxes
    span the quartiles with the median line, whiskers reach the furthest k within 1.5 IQR, and each
    distinct k beyond them is one flier marker (k is discrete, so one marker per value says it all).
    """
    layers = _integer_values(as_array(layer, "layer"), "layer")
    ks = _integer_values(as_array(k, "k"), "k")
    _check_lengths("layer", layers.size, k=ks)
    # one bincount over (layer, k) cells: a sort or a mask per layer costs seconds on millions of rows
    layer_low, k_low = layers.min(), ks.min()
    k_span = ks.max() - k_low + 1
    cells = np.bincount((layers - layer_low) * k_span + (ks - k_low),
                        minlength=(layers.max() - layer_low + 1) * k_span).reshape(-1, k_span)  # [layers, k]
    present = np.flatnonzero(cells.sum(axis=1)) + layer_low
    k_values = np.arange(k_low, k_low + k_span)
    boxes, means = [], []
    for row in cells[present - layer_low]:
        boxes.append(_box_stats(k_values[row > 0], row[row > 0]))
        means.append(float((k_values * row).sum() / row.sum()))

    fig = Figure(figsize=(max(5.0, 1.5 + 0.45 * present.size), 3.8), layout="constrained")
    ax = fig.subplots()
    ax.bxp(boxes, positions=present, widths=0.6, showfliers=True, manage_ticks=False,
           flierprops={"marker": "o", "markersize": 3, "markerfacecolor": "0.5", "markeredgecolor": "0.5",
                       "gid": "flier"},
           medianprops={"color": "C0", "linewidth": 1.5, "gid": "median"}, boxprops={"gid": "box"},
           whiskerprops={"gid": "whisker"}, capprops={"gid": "cap"})
    ax.plot(present, means, "o-", color="C3", markersize=4, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("experts selected per token")
    ax.legend(frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
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
