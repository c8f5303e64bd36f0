"""The cross-run comparison report: tables, statistics, figures and a self-contained HTML page.

Input is the aggregate stage's tidy tables (:mod:`routelab.aggregate`): the run table, and
optionally the per-document scores, the per-(run, layer, expert) counts and the co-activation of one
layer; a section whose table is missing says so instead of drawing. ``write_report`` writes into
``out_dir``: ``comparison.{csv,md,tex}``, the statistics behind the figures as CSV
(``quality_ci.csv``, ``entropy_correlation.csv``, ``rliable_intervals.csv``, ``improvement.csv``,
``performance_profiles.csv``), ``figures/*.png`` and ``report.html``, which shows the figures
beside it (``figures/``) and links every per-run figure, all by relative paths.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from routelab import comparison_plots as cp
from routelab import stats
from routelab.aggregate import ROUTING_PARAMS, default_layer
from routelab.io import write_text
from routelab.plots import message_figure
from routelab.quality import PRIMARY_METRIC

log = logging.getLogger(__name__)

ROUTING_STATS = ("experts_mean", "experts_std", "ceiling_hit_rate", "floor_hit_rate",
                 "active_expert_flops_vs_topk", "tokens_per_s", "peak_memory_mb")
NO_BH_RUNS = "no BH runs in this experiment"
NO_EXPERT_COUNTS = "no expert counts in the aggregate (expert_counts.parquet)"
MAX_SPECIALISATION_LAYERS = 4


@dataclass(frozen=True)
class ReportOptions:
    """Statistical settings of the report (config section ``report``)."""
    repetitions: int = 2000  # bootstrap resamples of every CI
    confidence: float = 0.95
    seed: int = 0
    layer: int | None = None  # layer of the expert-activation figures; None = the middle layer

    def __post_init__(self) -> None:
        if self.repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {self.repetitions}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")


@dataclass(frozen=True)
class ReportFigure:
    """A cross-run figure of the report: its file, where the HTML shows it and how to read it."""
    file: str
    anchor: str
    title: str
    caption: str


FIGURES = (
    ReportFigure(
        "experts_vs_alpha.png", "experts-vs-alpha", "Experts selected vs alpha",
        "Mean number of experts selected per token and layer by BH routing against its false-discovery "
        "level alpha, one panel per dataset and one line per max_k; error bars are ± one standard "
        "deviation across routing decisions. The dashed line is the top-k baseline. A line below it "
        "means BH uses fewer experts than the baseline; a line that flattens at max_k means the ceiling "
        "binds and a larger max_k would change the routing."),
    ReportFigure(
        "quality_vs_experts.png", "quality-vs-experts", "Quality vs experts selected",
        "Primary quality metric of each run against its mean number of experts per token and layer, one "
        "panel per dataset; points are coloured by routing method and labelled with the routing name, "
        "the ringed point is the baseline, and vertical bars are bootstrap confidence intervals over "
        "documents. The dotted step line is the Pareto frontier: the runs no other run beats on both "
        "fewer experts and better quality. The y-axis label says whether higher or lower is better."),
    ReportFigure(
        "quality_vs_flops.png", "quality-vs-flops", "Quality vs active expert FLOPs",
        "As the previous figure, with the active expert FLOPs per token (all MoE layers, from the expert "
        "shapes and the experts actually selected) on the x axis: the compute cost of the routing. "
        "Points on the dotted Pareto frontier are the efficient configs for that dataset."),
    ReportFigure(
        "expert_bubbles.png", "expert-bubbles", "Expert activation per config",
        "One row per routing config, one column per expert of the analysed layer (all datasets pooled). "
        "Bubble area and colour are the expert's share of the config's selections relative to the "
        "largest share in the figure. H is the normalised Shannon entropy of the row (1 = every expert "
        "used equally often, 0 = a single expert): a low H means the config concentrates its load."),
    ReportFigure(
        "entropy_vs_quality.png", "entropy-vs-quality", "Expert-usage entropy vs quality",
        "Normalised expert-usage entropy of each run (mean over layers) against its quality, one panel "
        "per dataset. The box gives Pearson's r and Spearman's ρ with their two-sided p-values; the "
        "words summarise |r| (< 0.1 negligible, < 0.3 weak, < 0.5 moderate, < 0.7 strong). With few "
        "configs per dataset a large r can still be far from significant."),
    ReportFigure(
        "rliable_intervals.png", "rliable-intervals", "Aggregate scores with stratified-bootstrap CIs",
        "rliable interval estimates over per-document scores relative to the baseline (1 = the baseline's "
        "quality, higher is better; see Methods): median across datasets of the mean score, interquartile "
        "mean (IQM), mean, and optimality gap (how far scores fall below the baseline's level; lower is "
        "better). Bars are stratified-bootstrap CIs (documents resampled within each dataset), ticks the "
        "point estimates; the baseline is red. Non-overlapping bars indicate a difference beyond "
        "document sampling noise."),
    ReportFigure(
        "probability_of_improvement.png", "probability-of-improvement", "Probability of improvement over the baseline",
        "For each routing X, the probability that X scores higher than the baseline on a randomly drawn "
        "document of a dataset (ties count one half), averaged over datasets, with its stratified-bootstrap "
        "CI. Above 0.5 (dashed): X is more often better than worse; a CI that excludes 0.5 makes that "
        "statistically meaningful."),
    ReportFigure(
        "performance_profiles.png", "performance-profiles", "Performance profiles",
        "For each routing, the fraction of (document, dataset) scores above each threshold τ, with a "
        "bootstrap band. Scores are relative to the baseline, whose profile drops from 1 to 0 at τ = 1 "
        "(dotted). A curve that lies above another everywhere is better on the whole score distribution, "
        "not only on average."),
    ReportFigure(
        "efficiency.png", "efficiency", "Efficiency: compute, memory, time and quality",
        "Parallel coordinates, one line per routing config (the baseline black and dashed). Each axis is "
        "scaled between its smallest and largest value, written below and above it: active expert FLOPs "
        "per token, peak memory, evaluation time per 1000 tokens (means or maxima over datasets) and "
        "quality relative to the baseline (mean over datasets of the primary metric's ratio, oriented so "
        "that above 1 is better). A config low on the first three axes and high on the last is efficient."),
    ReportFigure(
        "domain_specialisation.png", "domain-specialisation", "Domain specialisation of experts",
        "As in the OLMoE paper: for the baseline routing, the share of each dataset's tokens routed to "
        "each expert, one panel per layer and one line per dataset; the dashed line is an even spread "
        "(experts per token ÷ experts). An expert that peaks for one dataset only is specialised in that "
        "domain; lines that coincide mean the layer routes every domain alike."),
    ReportFigure(
        "coactivation.png", "coactivation", "Expert co-activation",
        "For the analysed layer, one panel per routing config (all datasets pooled): cell (i, j) is the "
        "share of the tokens routed to expert i (row) that were also routed to expert j (column). Bright "
        "off-diagonal cells are experts that work as a team; a uniform dark panel means experts are "
        "combined freely (or, with about one expert per token, rarely combined at all)."),
)
FIGURE = {figure.file: figure for figure in FIGURES}

METHODS_TEXT = (
    "Confidence intervals are percentile bootstraps that resample documents ({repetitions} resamples, "
    "{confidence:.0%} level, seed {seed}): the routing is deterministic, so the uncertainty that matters "
    "is which documents were evaluated. Perplexity is recomputed from the resampled documents' summed "
    "log-likelihoods and token counts, accuracy from their correctness. For the rliable analysis each "
    "document gets a score relative to the baseline on the same document, exp((LL_config − "
    "LL_baseline) / tokens) — the baseline's per-document perplexity divided by the config's (cloze "
    "documents use the target's log-likelihood) — so 1 is the baseline's quality, above 1 better, and "
    "all datasets share one scale. rliable's score matrices are [documents, datasets] per routing "
    "(documents take the place of runs, datasets of tasks); each dataset contributes its first "
    "{documents} documents (the smallest dataset's count), and the stratified bootstrap resamples "
    "documents within each dataset.")


def metric_by_dataset(runs: pd.DataFrame) -> dict[str, tuple[str, bool]]:
    """``{dataset: (primary metric column, higher_is_better)}`` from each dataset's task."""
    metrics = {}
    for dataset, tasks in runs.groupby("dataset")["task"]:
        task_names = sorted(tasks.unique())
        if len(task_names) != 1:
            raise ValueError(f"dataset {dataset!r} has runs of several tasks {task_names}; expected one")
        if task_names[0] not in PRIMARY_METRIC:
            raise ValueError(f"dataset {dataset!r} has task {task_names[0]!r}; known tasks are "
                             f"{sorted(PRIMARY_METRIC)}")
        metrics[dataset] = PRIMARY_METRIC[task_names[0]]
    return metrics


def params_text(run: pd.Series) -> str:
    """The routing parameters a run has, as ``alpha=0.05, min_k=1, ...``."""
    return ", ".join(f"{name}={_format_value(run[name])}" for name in ROUTING_PARAMS
                     if name in run.index and pd.notna(run[name]))


def _format_value(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def _peak_memory(runs: pd.DataFrame) -> pd.Series:
    """Peak GPU memory where the run used one, else peak process memory (MB)."""
    cuda = runs["peak_cuda_mb"] if "peak_cuda_mb" in runs.columns else pd.Series(np.nan, index=runs.index)
    rss = runs["peak_rss_mb"] if "peak_rss_mb" in runs.columns else pd.Series(np.nan, index=runs.index)
    return pd.to_numeric(cuda, errors="coerce").fillna(pd.to_numeric(rss, errors="coerce"))


def comparison_table(runs: pd.DataFrame, intervals: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per run: routing, dataset, method, params, the primary metric column(s) of the tasks
    present (each followed by ``{metric}_ci_low`` / ``_ci_high`` when ``intervals`` are given),
    then experts_mean, experts_std, ceiling_hit_rate, floor_hit_rate (in %),
    active_expert_flops_vs_topk, tokens_per_s and peak_memory_mb. Sorted by dataset, method, routing.

    ``intervals``: ``routing, dataset, metric, low, high`` (:func:`routelab.stats.run_quality_intervals`).
    """
    if runs.empty:
        raise ValueError("runs is empty: nothing to compare")
    metric_columns = list(dict.fromkeys(column for column, _ in metric_by_dataset(runs).values()))
    table = runs[["routing", "dataset", "method"]].copy()
    table["params"] = runs.apply(params_text, axis=1)
    extra = runs.assign(peak_memory_mb=_peak_memory(runs))
    for column in metric_columns:
        table[column] = runs[column] if column in runs.columns else np.nan
        if intervals is not None:
            bounds = intervals[intervals["metric"] == column].set_index(["routing", "dataset"])
            keys = pd.MultiIndex.from_frame(runs[["routing", "dataset"]])
            table[f"{column}_ci_low"] = bounds["low"].reindex(keys).to_numpy()
            table[f"{column}_ci_high"] = bounds["high"].reindex(keys).to_numpy()
    for column in ROUTING_STATS:
        table[column] = extra[column] if column in extra.columns else np.nan
    return table.sort_values(["dataset", "method", "routing"], ignore_index=True)


def display_table(comparison: pd.DataFrame, metric_by_dataset: dict[str, tuple[str, bool]]) -> pd.DataFrame:
    """The comparison table as text for Markdown, LaTeX and HTML: one ``quality`` column
    (``metric value [low, high]``), ``experts`` as ``mean ± std``, rates in %, FLOPs relative to
    top-k, throughput and memory rounded."""
    rows = []
    for row in comparison.itertuples(index=False):
        column, higher = metric_by_dataset[row.dataset]
        value = getattr(row, column)
        quality = "–" if pd.isna(value) else f"{value:.4g}"
        low, high = getattr(row, f"{column}_ci_low", np.nan), getattr(row, f"{column}_ci_high", np.nan)
        if pd.notna(low) and pd.notna(high):
            quality += f" [{low:.4g}, {high:.4g}]"
        rows.append({
            "routing": row.routing, "dataset": row.dataset, "params": row.params,
            "metric": f"{column} ({'↑' if higher else '↓'})", "quality [CI]": quality,
            "experts": _number(row.experts_mean, ".3g") + " ± " + _number(row.experts_std, ".2g"),
            "ceiling %": _number(row.ceiling_hit_rate, ".3g"), "floor %": _number(row.floor_hit_rate, ".3g"),
            "FLOPs vs top-k": _number(row.active_expert_flops_vs_topk, ".3g"),
            "tokens/s": _number(row.tokens_per_s, ",.0f"), "memory MB": _number(row.peak_memory_mb, ",.0f")})
    return pd.DataFrame(rows)


def _number(value: float, spec: str) -> str:
    return "–" if pd.isna(value) else format(value, spec)


def latex_table(display: pd.DataFrame, caption: str) -> str:
    """``display`` as a booktabs LaTeX table (``\\toprule`` / ``\\midrule`` / ``\\bottomrule``), text
    escaped for LaTeX. Needs ``\\usepackage{booktabs}``."""
    text = display.replace({"↑": "higher better", "↓": "lower better"}, regex=True)
    text = text.replace({"±": "+/-", "–": "--"}, regex=True)
    styler = (text.style.hide(axis="index").format(escape="latex")
              .format_index(escape="latex", axis=1))
    return styler.to_latex(hrules=True, caption=caption, label="tab:routing-comparison",
                           column_format="l" * 4 + "r" * (len(text.columns) - 4), position="htbp")


def baseline_experts(runs: pd.DataFrame, baseline: str) -> tuple[dict[str, float], str]:
    """``{dataset: experts_mean}`` of the baseline routing and a legend label for it."""
    rows = runs[runs["routing"] == baseline]
    if rows.empty:
        raise ValueError(f"baseline {baseline!r} is not among the routings "
                         f"{sorted(runs['routing'].unique())}")
    k = rows["k"].dropna() if "k" in rows.columns else pd.Series(dtype=float)
    label = f"baseline {baseline}" + (f" (k = {_format_value(float(k.iloc[0]))})" if len(k) else "")
    return dict(zip(rows["dataset"], rows["experts_mean"])), label


# --------------------------------------------------------------------------- derived tables

def run_entropy(expert_counts: pd.DataFrame) -> pd.DataFrame:
    """``routing, dataset, entropy``: mean over layers of the normalised Shannon entropy of each
    layer's expert usage."""
    rows = []
    for (routing, dataset), counts in expert_counts.groupby(["routing", "dataset"], sort=True):
        matrix = counts.pivot(index="layer", columns="expert", values="count").to_numpy()
        rows.append({"routing": routing, "dataset": dataset,
                     "entropy": float(np.mean(stats.normalized_entropy(matrix, axis=1)))})
    return pd.DataFrame(rows, columns=["routing", "dataset", "entropy"])


def analysis_layer(runs: pd.DataFrame, options: ReportOptions, coactivation: pd.DataFrame | None) -> int:
    """The configured layer, else the co-activation table's layer, else the middle layer."""
    if options.layer is not None:
        return options.layer
    if coactivation is not None and not coactivation.empty:
        return int(coactivation["layer"].iloc[0])
    return default_layer(int(runs["num_layers"].max()))


def entropy_correlations(entropy: pd.DataFrame, runs: pd.DataFrame,
                         metrics: dict[str, tuple[str, bool]]) -> pd.DataFrame:
    """Per dataset: Pearson and Spearman correlation of run entropy with the primary metric."""
    merged = entropy.merge(runs, on=["routing", "dataset"])
    rows = []
    for dataset, (column, higher) in sorted(metrics.items()):
        part = merged[merged["dataset"] == dataset]
        rows.append({"dataset": dataset, "metric": column, **stats.correlation(part["entropy"], part[column])})
    return pd.DataFrame(rows)


def efficiency_table(runs: pd.DataFrame, baseline: str,
                     metrics: dict[str, tuple[str, bool]]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """One row per routing config with the parallel-coordinates axes that have data, and the axes."""
    table = runs.assign(peak_memory_mb=_peak_memory(runs))
    base = table[table["routing"] == baseline].set_index("dataset")
    relative = []
    for run in table.itertuples(index=False):
        column, higher = metrics[run.dataset]
        value, reference = np.float64(getattr(run, column)), np.float64(base[column].get(run.dataset, np.nan))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = value / reference if higher else reference / value
        relative.append(float(ratio) if np.isfinite(ratio) else np.nan)
    table["quality_vs_baseline"] = relative
    if "tokens_per_s" in table.columns:
        table["ms_per_1k_tokens"] = 1e6 / pd.to_numeric(table["tokens_per_s"], errors="coerce")
    candidates = [("active_expert_flops_per_token", "active expert FLOPs / token", "mean"),
                  ("peak_memory_mb", "peak memory (MB)", "max"),
                  ("ms_per_1k_tokens", "time (ms / 1000 tokens)", "mean"),
                  ("quality_vs_baseline", "quality vs baseline (×, ↑)", "mean")]
    present = [(c, label, how) for c, label, how in candidates
               if c in table.columns and pd.to_numeric(table[c], errors="coerce").notna().any()]
    per_config = table.groupby("routing", sort=True).agg(
        **{c: (c, how) for c, _, how in present}).reset_index()
    return per_config, [(c, label) for c, label, _ in present]


# --------------------------------------------------------------------------- figures

@dataclass
class Section:
    """What the HTML shows for one figure: drawn, or a note saying why not."""
    figure: ReportFigure
    drawn: bool
    note: str = ""
    table_html: str = ""


class ReportBuilder:
    """Computes the report's statistics and figures from the aggregate tables."""

    def __init__(self, runs: pd.DataFrame, baseline: str, out_dir: Path, options: ReportOptions,
                 scores: pd.DataFrame | None, expert_counts: pd.DataFrame | None,
                 coactivation: pd.DataFrame | None) -> None:
        self.runs, self.baseline, self.out_dir, self.options = runs, baseline, out_dir, options
        self.scores, self.expert_counts, self.coactivation = scores, expert_counts, coactivation
        self.figures_dir = out_dir / "figures"
        self.metrics = metric_by_dataset(runs)
        self.layer = analysis_layer(runs, options, coactivation)
        self.intervals: pd.DataFrame | None = None
        self.documents = 0

    def _bootstrap_options(self) -> dict:
        return {"repetitions": self.options.repetitions, "confidence": self.options.confidence,
                "seed": self.options.seed}

    def quality_intervals(self) -> pd.DataFrame | None:
        if self.scores is not None and self.intervals is None:
            log.info("bootstrap CIs of %d runs' quality (%d resamples)", len(self.runs), self.options.repetitions)
            self.intervals = stats.run_quality_intervals(self.scores, self.metrics, **self._bootstrap_options())
            self._write_csv("quality_ci.csv", self.intervals)
        return self.intervals

    def _write_csv(self, name: str, table: pd.DataFrame) -> None:
        write_text(self.out_dir / name, table.to_csv(index=False))

    def _path(self, file: str) -> Path:
        return self.figures_dir / file

    def _skip(self, file: str, reason: str) -> Section:
        log.info("%s is a placeholder: %s", file, reason)
        message_figure(reason, path=self._path(file))
        return Section(FIGURE[file], drawn=False, note=reason)

    def experts_vs_alpha(self) -> Section:
        file = "experts_vs_alpha.png"
        bh_runs = self.runs[self.runs["method"] == "bh"]
        if bh_runs.empty:
            return self._skip(file, NO_BH_RUNS)
        reference, label = baseline_experts(self.runs, self.baseline)
        cp.experts_vs_alpha(bh_runs, reference, path=self._path(file), baseline_label=label)
        return Section(FIGURE[file], True)

    def quality_vs(self, file: str, x: str, x_label: str) -> Section:
        if x not in self.runs.columns or self.runs[x].isna().all():
            return self._skip(file, f"the runs have no {x}")
        cp.quality_vs_experts(self.runs, self.metrics, baseline=self.baseline, path=self._path(file), x=x,
                              x_label=x_label, intervals=self.quality_intervals())
        return Section(FIGURE[file], True)

    def expert_bubbles(self) -> Section:
        file = "expert_bubbles.png"
        if self.expert_counts is None:
            return self._skip(file, NO_EXPERT_COUNTS)
        layer = self.expert_counts[self.expert_counts["layer"] == self.layer]
        if layer.empty:
            return self._skip(file, f"no expert counts for layer {self.layer}")
        weights = layer.pivot_table(index="routing", columns="expert", values="count", aggfunc="sum").sort_index()
        entropy = stats.normalized_entropy(weights.to_numpy(), axis=1)
        cp.expert_bubble_heatmap(weights.to_numpy(), list(weights.index), entropy,
                                 title=f"layer {self.layer}, all datasets", path=self._path(file))
        return Section(FIGURE[file], True)

    def entropy_vs_quality(self) -> Section:
        file = "entropy_vs_quality.png"
        if self.expert_counts is None:
            return self._skip(file, NO_EXPERT_COUNTS)
        entropy = run_entropy(self.expert_counts)
        table = entropy.merge(self.runs, on=["routing", "dataset"])
        cp.entropy_vs_quality(table, self.metrics, path=self._path(file))
        correlations = entropy_correlations(entropy, self.runs, self.metrics)
        self._write_csv("entropy_correlation.csv", correlations)
        return Section(FIGURE[file], True, table_html=_html_table(correlations, index=False))

    def rliable(self) -> list[Section]:
        files = ("rliable_intervals.png", "probability_of_improvement.png", "performance_profiles.png")
        if self.scores is None:
            return [self._skip(file, "no per-document scores in the aggregate (scores.parquet)") for file in files]
        relative = stats.relative_document_scores(self.scores, self.baseline)
        matrices, _, self.documents = stats.score_matrices(relative)
        options = self._bootstrap_options()
        log.info("rliable interval estimates of %d routings (%d documents x %d datasets)", len(matrices),
                 self.documents, len(relative))
        intervals = stats.interval_estimates(matrices, **options)
        self._write_csv("rliable_intervals.csv", intervals)
        cp.interval_estimates_plot(intervals, baseline=self.baseline, path=self._path(files[0]))
        sections = [Section(FIGURE[files[0]], True, table_html=_html_table(
            intervals.pivot(index="routing", columns="metric", values="estimate")[list(stats.AGGREGATE_METRICS)]))]
        if len(matrices) < 2:
            sections.append(self._skip(files[1], "only the baseline has scores: nothing to compare"))
        else:
            log.info("rliable probability of improvement over %s", self.baseline)
            improvement = stats.improvement_over_baseline(matrices, self.baseline, **options)
            self._write_csv("improvement.csv", improvement)
            cp.improvement_plot(improvement, self.baseline, path=self._path(files[1]))
            sections.append(Section(FIGURE[files[1]], True))
        log.info("rliable performance profiles")
        profiles = stats.performance_profiles(matrices, stats.profile_thresholds(matrices), **options)
        self._write_csv("performance_profiles.csv", profiles)
        cp.performance_profile_plot(profiles, baseline=self.baseline, path=self._path(files[2]))
        sections.append(Section(FIGURE[files[2]], True))
        return sections

    def efficiency(self) -> Section:
        file = "efficiency.png"
        table, axes = efficiency_table(self.runs, self.baseline, self.metrics)
        if len(axes) < 2:
            return self._skip(file, "fewer than two efficiency measures were recorded")
        cp.efficiency_parallel_coordinates(table, axes, baseline=self.baseline, path=self._path(file))
        return Section(FIGURE[file], True)

    def domain_specialisation(self) -> Section:
        file = "domain_specialisation.png"
        if self.expert_counts is None:
            return self._skip(file, NO_EXPERT_COUNTS)
        counts = self.expert_counts[self.expert_counts["routing"] == self.baseline]
        if counts.empty:
            return self._skip(file, f"no expert counts for the baseline {self.baseline}")
        share = counts.assign(share=100.0 * counts["count"] / counts["decisions"])
        num_layers = int(share["layer"].max()) + 1
        spaced = np.linspace(0, num_layers - 1, min(num_layers, MAX_SPECIALISATION_LAYERS)).round().astype(int)
        layers = sorted({*spaced.tolist(), self.layer} & set(range(num_layers)))
        base_runs = self.runs[self.runs["routing"] == self.baseline]
        uniform = 100.0 * float(base_runs["experts_mean"].mean()) / int(base_runs["num_experts"].max())
        cp.domain_specialisation(share, uniform=uniform, layers=layers, title=f"routing {self.baseline}",
                                 path=self._path(file))
        return Section(FIGURE[file], True)

    def coactivation_figure(self) -> Section:
        file = "coactivation.png"
        if self.coactivation is None or self.coactivation.empty:
            return self._skip(file, "no co-activation counts in the aggregate (coactivation.parquet)")
        num_experts = int(self.runs["num_experts"].max())
        matrices = {}
        for routing, cells in self.coactivation.groupby("routing", sort=True):
            matrix = np.zeros((num_experts, num_experts))
            np.add.at(matrix, (cells["expert"].to_numpy(), cells["other"].to_numpy()), cells["count"].to_numpy())
            matrices[routing] = matrix
        layer = int(self.coactivation["layer"].iloc[0])
        cp.coactivation_heatmap(matrices, layer=layer, path=self._path(file))
        return Section(FIGURE[file], True)

    def sections(self) -> list[Section]:
        steps: list[Callable[[], Section | list[Section]]] = [
            self.experts_vs_alpha,
            lambda: self.quality_vs("quality_vs_experts.png", "experts_mean", "experts per token and layer (mean)"),
            lambda: self.quality_vs("quality_vs_flops.png", "active_expert_flops_per_token",
                                    "active expert FLOPs per token"),
            self.expert_bubbles, self.entropy_vs_quality, self.rliable, self.efficiency,
            self.domain_specialisation, self.coactivation_figure,
        ]
        sections = []
        for step in steps:
            start = time.perf_counter()
            result = step()
            result = result if isinstance(result, list) else [result]
            log.info("%s: %.1f s", ", ".join(section.figure.file for section in result), time.perf_counter() - start)
            sections.extend(result)
        return sections


# --------------------------------------------------------------------------- per-run links

def run_figure_files(plot_dir: Path) -> list[tuple[str, str]]:
    """``[(file, title)]`` of one run's figures: from plot_dir/index.json (drawn entries only)
    when present, else every PNG in plot_dir, titled from :data:`routelab.plots.RUN_FIGURES`."""
    from routelab import plots

    titles = getattr(plots, "RUN_FIGURES", {})
    index = plot_dir / "index.json"
    if index.is_file():
        entries = json.loads(index.read_text())
        return [(entry["file"], entry.get("title") or titles.get(entry["file"], entry["file"]))
                for entry in entries if entry.get("drawn", True)]
    order = {name: i for i, name in enumerate(titles)}
    files = sorted((p.name for p in plot_dir.glob("*.png")), key=lambda name: (order.get(name, len(order)), name))
    return [(name, titles.get(name, Path(name).stem.replace("_", " "))) for name in files]


def per_run_links(runs: pd.DataFrame, plots_root: str | os.PathLike,
                  report_dir: str | os.PathLike) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``[(routing, dataset, [(figure title, path relative to report_dir)])]`` for every run."""
    links = []
    for run in runs.sort_values(["routing", "dataset"]).itertuples(index=False):
        plot_dir = Path(plots_root) / run.routing / run.dataset
        files = [(title, os.path.relpath(plot_dir / name, report_dir)) for name, title in run_figure_files(plot_dir)]
        links.append((run.routing, run.dataset, files))
    return links


# --------------------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1280px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { margin-bottom: 0.2em; }
.meta { color: #555; margin-top: 0; }
nav { background: #f6f6f6; padding: 0.6em 1.2em; border-radius: 6px; }
.table-wrap { overflow-x: auto; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.8em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.6em; text-align: right; white-space: nowrap; }
tbody tr:hover { background: #fafafa; }
th { background: #f0f0f0; }
td:first-child, th:first-child { text-align: left; }
table.comparison td:nth-child(-n+5), table.comparison th:nth-child(-n+5) { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #444; font-size: 0.92em; max-width: 900px; }
section { margin-top: 2em; }
"""


def _html_table(table: pd.DataFrame, index: bool = True, classes: str | None = None) -> str:
    return ('<div class="table-wrap">' + table.to_html(index=index, na_rep="–", border=0, escape=True,
                                                       classes=classes, float_format=lambda v: f"{v:.4g}")
            + "</div>")


def _figure_html(section: Section, report_dir: Path, figures_dir: Path) -> str:
    figure = section.figure
    title = f'<h2 id="{figure.anchor}">{html.escape(figure.title)}</h2>'
    if not section.drawn:
        return f'<section>{title}<p class="caption">Skipped: {html.escape(section.note)}.</p></section>'
    src = os.path.relpath(figures_dir / figure.file, report_dir)
    return (f'<section>{title}<figure><img src="{html.escape(src)}" alt="{html.escape(figure.title)}">'
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>{section.table_html}</section>")


def _per_run_html(links: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(routing)}</td><td>{html.escape(dataset)}</td><td>"
        + (" · ".join(f'<a href="{html.escape(href)}">{html.escape(title)}</a>' for title, href in files)
           or "no figures found")
        + "</td></tr>" for routing, dataset, files in links)
    return ('<section><h2 id="per-run-figures">Per-run figures</h2><p class="caption">Every figure the '
            "plot stage drew for each run (experts selected, expert usage by layer, p-values, BH "
            "decisions, utilisation, ...), opened from here by relative links.</p>"
            '<div class="table-wrap"><table><thead><tr><th>routing</th><th>dataset</th><th>figures</th>'
            f"</tr></thead><tbody>{rows}</tbody></table></div></section>")


def render_html(display: pd.DataFrame, experiment: str, baseline: str, sections: list[Section],
                links: list[tuple[str, str, list[tuple[str, str]]]], methods: str, report_dir: Path,
                figures_dir: Path) -> str:
    """The report page: title, contents, methods, comparison table, one section per figure, links."""
    toc_entries = [("methods", "Methods"), ("comparison", "Comparison table"),
                   *((s.figure.anchor, s.figure.title) for s in sections), ("per-run-figures", "Per-run figures")]
    toc = "".join(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in toc_entries)
    caption = ("One row per (routing, dataset) run. quality [CI]: the dataset's primary metric (↑ higher "
               "is better, ↓ lower is better) with its bootstrap confidence interval over documents; "
               "experts: mean ± std of experts selected per token and layer; ceiling % / floor %: share "
               "of decisions that selected max_k / min_k experts; FLOPs vs top-k: active expert FLOPs "
               "relative to the model's own top-k; tokens/s: evaluation throughput; memory: peak GPU "
               "memory, or process memory on CPU. The same table is in comparison.csv (all numbers), "
               "comparison.md and comparison.tex (booktabs).")
    body = [
        "<h1>Routing comparison report</h1>",
        f'<p class="meta">Experiment: <b>{html.escape(experiment)}</b> · baseline: '
        f"<b>{html.escape(baseline)}</b> · {len(display)} runs</p>",
        f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>",
        f'<section><h2 id="methods">Methods</h2><p class="caption">{html.escape(methods)}</p></section>',
        f'<section><h2 id="comparison">Comparison table</h2><p class="caption">{html.escape(caption)}</p>'
        f'<p><a href="comparison.csv">comparison.csv</a> · <a href="comparison.md">comparison.md</a> · '
        f'<a href="comparison.tex">comparison.tex</a></p>{_html_table(display, index=False, classes="comparison")}</section>',
        *(_figure_html(section, report_dir, figures_dir) for section in sections),
        _per_run_html(links),
    ]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>routelab report: {html.escape(experiment)}</title>\n<style>{CSS}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(runs: pd.DataFrame, out_dir: str | os.PathLike, experiment: str, baseline: str,
                 plots_root: str | os.PathLike, scores: pd.DataFrame | None = None,
                 expert_counts: pd.DataFrame | None = None, coactivation: pd.DataFrame | None = None,
                 options: ReportOptions | None = None) -> Path:
    """Write the comparison tables, statistics, figures and report.html into ``out_dir`` (each file
    atomically); returns the path of report.html. ``scores`` / ``expert_counts`` /
    ``coactivation`` are the aggregate stage's tables; without one, its sections say so."""
    out_dir = Path(out_dir)
    options = options or ReportOptions()
    if runs.empty:
        raise ValueError("runs is empty: nothing to compare")
    baseline_experts(runs, baseline)  # an unknown baseline fails before anything is written
    builder = ReportBuilder(runs, baseline, out_dir, options, scores, expert_counts, coactivation)
    intervals = builder.quality_intervals()
    comparison = comparison_table(runs, intervals)
    display = display_table(comparison, builder.metrics)
    write_text(out_dir / "comparison.csv", comparison.to_csv(index=False))
    write_text(out_dir / "comparison.md", display.to_markdown(index=False) + "\n")
    write_text(out_dir / "comparison.tex", latex_table(
        display, f"Routing comparison, experiment {experiment}; baseline {baseline}."))
    sections = builder.sections()
    methods = METHODS_TEXT.format(repetitions=options.repetitions, confidence=options.confidence,
                                  seed=options.seed, documents=builder.documents or "all")
    links = per_run_links(runs, plots_root, out_dir)
    report = out_dir / "report.html"
    write_text(report, render_html(display, experiment, baseline, sections, links, methods, out_dir,
                                   builder.figures_dir))
    return report
