"""The report's tables: the comparison table (CSV, Markdown, LaTeX), the per-run derived tables the
figures read (expert-usage entropy, its correlation with quality, the efficiency axes)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from routelab.report import statistics as stats
from routelab.report.aggregate import parameter_columns
from routelab.run.quality import PRIMARY_METRIC

ROUTING_STATS = ("experts_mean", "experts_std", "ceiling_hit_rate", "floor_hit_rate",
                 "active_expert_flops_vs_topk", "tokens_per_s", "peak_memory_mb")

def metric_by_dataset(runs: pd.DataFrame) -> dict[str, tuple[str, bool]]:
    """``{dataset: (primary metric column, higher_is_better)}`` from each dataset's task."""
    metrics = {}
    for dataset, tasks in runs.groupby("dataset")["task"]:
        task_names = sorted(tasks.unique())
        if len(task_names) != 1:
            raise ValueError(f"dataset {dataset!r} has runs of several tasks {task_names}; expected one")
        if task_names[0] == "lm_eval":  # the metric lm-eval lists first for the task, with its direction
            rows = runs[runs["dataset"] == dataset]
            metrics[dataset] = (rows["primary_metric"].iloc[0], bool(rows["primary_higher_is_better"].iloc[0]))
            continue
        if task_names[0] not in PRIMARY_METRIC:
            raise ValueError(f"dataset {dataset!r} has task {task_names[0]!r}; known tasks are "
                             f"{sorted(PRIMARY_METRIC)}")
        metrics[dataset] = PRIMARY_METRIC[task_names[0]]
    return metrics


def params_text(run: pd.Series) -> str:
    """The routing parameters a run has, as ``alpha=0.05, min_k=1, ...``."""
    return ", ".join(f"{name}={_format_value(run[name])}" for name in parameter_columns()
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

    ``intervals``: ``routing, dataset, metric, low, high`` (:func:`routelab.report.statistics.run_quality_intervals`).
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


def run_entropy(expert_counts: pd.DataFrame) -> pd.DataFrame:
    """``routing, dataset, entropy``: mean over layers of the normalised Shannon entropy of each
    layer's expert usage."""
    rows = []
    for (routing, dataset), counts in expert_counts.groupby(["routing", "dataset"], sort=True):
        matrix = counts.pivot(index="layer", columns="expert", values="count").to_numpy()
        rows.append({"routing": routing, "dataset": dataset,
                     "entropy": float(np.mean(stats.usage_entropy(matrix, axis=1)))})
    return pd.DataFrame(rows, columns=["routing", "dataset", "entropy"])


def entropy_correlations(entropy: pd.DataFrame, runs: pd.DataFrame,
                         metrics: dict[str, tuple[str, bool]]) -> pd.DataFrame:
    """Per dataset: Pearson and Spearman correlation of run entropy with the primary metric."""
    merged = entropy.merge(runs, on=["routing", "dataset"])
    rows = []
    for dataset, (column, _) in sorted(metrics.items()):
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
