"""The report's findings: per dataset, which routing config keeps the baseline's quality at what cost.

Per dataset (an lm-eval task counts as one): the baseline's quality with its CI; for each tolerance,
the config with the fewest active expert FLOPs per token whose paired bootstrap CI of the quality
ratio to the baseline stays within the tolerance; the configs significantly better or worse than
the baseline (a paired permutation test over documents, Holm-corrected across the configs of a
dataset); and the Pareto set of quality against active expert FLOPs.

Pairing is by document: a config and the baseline are compared on the same documents, resampled
together, so the document-to-document spread that both share cancels out of the ratio.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from routelab.report import statistics as stats

# significant digits of every float in findings.json, so that a rerun gives the same bytes
JSON_DIGITS = 6
CORRECTION = "Holm–Bonferroni"
TEST = "paired permutation test"
COST = "active_expert_flops_per_token"


# --------------------------------------------------------------------------- paired documents

def paired_documents(scores: pd.DataFrame, routing: str, baseline: str, columns: Sequence[str]
                     ) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """The score ``columns`` of ``routing`` and of ``baseline`` on the documents both have, aligned by
    ``doc_id``: two tuples of ``[documents]`` float arrays (config first).

    ``scores``: one dataset's per-document rows (``routing, doc_id`` and ``columns``).
    """
    config = scores[scores["routing"] == routing].set_index("doc_id")
    base = scores[scores["routing"] == baseline].set_index("doc_id")
    common = config.index.intersection(base.index).sort_values()
    return (tuple(config.loc[common, c].to_numpy(dtype=float) for c in columns),
            tuple(base.loc[common, c].to_numpy(dtype=float) for c in columns))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` with 0 / 0 = 1 (both configs equally bad, e.g. no correct answer)."""
    numerator, denominator = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = numerator / denominator
    return np.where((numerator == 0) & (denominator == 0), 1.0, ratio)


def paired_ratio_intervals(config: Sequence[np.ndarray], baseline: Sequence[np.ndarray],
                           statistic: Callable[..., np.ndarray], repetitions: int = 2000,
                           confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """``(ratio, low, high)``: the quality ratio ``statistic(config) / statistic(baseline)`` and its
    paired percentile bootstrap CI.

    Each resample draws documents with replacement once (numpy generator seeded by ``seed``) and
    recomputes both statistics on those same documents. ``config`` / ``baseline``: the score columns
    of :func:`routelab.report.statistics.metric_statistic`, each ``[documents]`` aligned by document;
    ``statistic(*columns, axis=-1)`` is vectorised over leading axes.
    """
    if repetitions < 1:
        raise ValueError(f"repetitions must be >= 1, got {repetitions}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    n = len(config[0])
    if n == 0:
        raise ValueError("no documents shared by the config and the baseline")
    ratio = float(_ratio(statistic(*config, axis=-1), statistic(*baseline, axis=-1)))
    picks = np.random.default_rng(seed).integers(0, n, size=(repetitions, n))  # [repetitions, documents]
    ratios = _ratio(statistic(*(c[picks] for c in config), axis=-1),
                    statistic(*(b[picks] for b in baseline), axis=-1))  # [repetitions]
    low, high = np.quantile(ratios, [(1 - confidence) / 2, (1 + confidence) / 2])
    return ratio, float(low), float(high)


def paired_permutation_pvalue(config: Sequence[np.ndarray], baseline: Sequence[np.ndarray],
                              statistic: Callable[..., np.ndarray], repetitions: int = 2000,
                              seed: int = 0) -> float:
    """Two-sided p-value of ``statistic(config) − statistic(baseline)`` under the null that the
    config's and the baseline's scores of each document are exchangeable:
    :func:`scipy.stats.permutation_test` with ``permutation_type="samples"`` (exact when 2^documents
    ≤ ``repetitions``).

    A document's score columns (log-likelihood and tokens) must swap together, so the samples handed
    to scipy are row numbers into the stacked ``[config; baseline]`` columns.
    """
    n = len(config[0])
    if n == 0:
        raise ValueError("no documents shared by the config and the baseline")
    stacked = [np.concatenate([c, b]) for c, b in zip(config, baseline)]  # [2 * documents] each

    def difference(rows_config: np.ndarray, rows_baseline: np.ndarray, axis: int = -1) -> np.ndarray:
        return (statistic(*(s[rows_config] for s in stacked), axis=axis)
                - statistic(*(s[rows_baseline] for s in stacked), axis=axis))

    result = scipy_stats.permutation_test((np.arange(n), np.arange(n, 2 * n)), difference,
                                          permutation_type="samples", vectorized=True, n_resamples=repetitions,
                                          alternative="two-sided", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values ``[tests]``, in the input order: the i-th smallest of m
    p-values is multiplied by m − i + 1, made non-decreasing in that order, capped at 1. Rejecting
    where the adjusted value is ≤ α controls the family-wise error rate at α. NaN stays NaN and does
    not count as a test."""
    pvalues = np.asarray(pvalues, dtype=float)
    adjusted = np.full(pvalues.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(pvalues))
    order = finite[np.argsort(pvalues[finite], kind="stable")]
    m = order.size
    scaled = (m - np.arange(m)) * pvalues[order]
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


# --------------------------------------------------------------------------- one dataset

COMPARISON_COLUMNS = ["routing", "documents", "quality", "ratio", "ratio_low", "ratio_high", "p_value",
                      "experts_mean", COST, "flops_saving"]


def compare_with_baseline(scores: pd.DataFrame, runs: pd.DataFrame, baseline: str, metric: str,
                          repetitions: int = 2000, confidence: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Every non-baseline config of one dataset against the baseline, on their shared documents: one
    row per config with :data:`COMPARISON_COLUMNS` (``quality``: the config's metric; ``ratio*``:
    :func:`paired_ratio_intervals`; ``p_value``: :func:`paired_permutation_pvalue`; ``flops_saving``:
    1 − config FLOPs / baseline FLOPs, a fraction). Sorted by routing.

    ``scores``: the dataset's per-document rows; ``runs``: its run rows (``routing, experts_mean,
    active_expert_flops_per_token``).
    """
    available = [c for c in scores.columns if scores[c].notna().all()]
    columns, statistic = stats.metric_statistic(metric, available)
    cost = runs.set_index("routing")
    base_flops = float(cost[COST].get(baseline, np.nan)) if COST in cost.columns else np.nan
    rows = []
    for routing in sorted(set(scores["routing"]) - {baseline}):
        config, base = paired_documents(scores, routing, baseline, columns)
        if len(config[0]) == 0:
            continue
        ratio, low, high = paired_ratio_intervals(config, base, statistic, repetitions, confidence, seed)
        flops = float(cost[COST].get(routing, np.nan)) if COST in cost.columns else np.nan
        rows.append({"routing": routing, "documents": len(config[0]), "quality": float(statistic(*config)),
                     "ratio": ratio, "ratio_low": low, "ratio_high": high,
                     "p_value": paired_permutation_pvalue(config, base, statistic, repetitions, seed),
                     "experts_mean": float(cost["experts_mean"].get(routing, np.nan)), COST: flops,
                     "flops_saving": 1.0 - flops / base_flops if base_flops > 0 else np.nan})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


def within_tolerance(comparisons: pd.DataFrame, tolerance: float, higher_is_better: bool) -> pd.Series:
    """Boolean per row: the ratio CI stays within ``tolerance`` on the bad side (higher is better:
    ``ratio_low ≥ 1 − tolerance``; lower is better: ``ratio_high ≤ 1 + tolerance``). NaN fails."""
    if higher_is_better:
        return comparisons["ratio_low"] >= 1 - tolerance
    return comparisons["ratio_high"] <= 1 + tolerance


def cheapest_within(comparisons: pd.DataFrame, tolerance: float, higher_is_better: bool) -> dict | None:
    """The row (as a dict) of the config with the fewest active expert FLOPs per token that is
    :func:`within_tolerance` and cheaper than the baseline (``flops_saving > 0``); ties go to the better
    ratio, then the routing name. None when no config qualifies: then the baseline is the answer."""
    eligible = comparisons[within_tolerance(comparisons, tolerance, higher_is_better)
                           & (comparisons["flops_saving"] > 0)]
    if eligible.empty:
        return None
    goodness = eligible["ratio"] if higher_is_better else -eligible["ratio"]
    ranked = eligible.assign(_goodness=-goodness).sort_values([COST, "_goodness", "routing"], kind="stable")
    return ranked.drop(columns="_goodness").iloc[0].to_dict()


def significant_configs(comparisons: pd.DataFrame, higher_is_better: bool, alpha: float = 0.05) -> pd.DataFrame:
    """``comparisons`` with ``p_holm`` (:func:`holm` across its configs) and ``verdict``: ``better``
    or ``worse`` than the baseline where ``p_holm ≤ alpha`` (direction from the ratio and the metric's),
    else ``not significant``."""
    adjusted = holm(comparisons["p_value"].to_numpy(dtype=float))
    improved = comparisons["ratio"] > 1 if higher_is_better else comparisons["ratio"] < 1
    verdict = np.where(adjusted <= alpha, np.where(improved, "better", "worse"), "not significant")
    return comparisons.assign(p_holm=adjusted, verdict=verdict)


def pareto_set(runs: pd.DataFrame, metric: str, higher_is_better: bool) -> pd.DataFrame:
    """The Pareto-optimal runs of one dataset (quality ``metric`` against active expert FLOPs per
    token, :func:`routelab.report.statistics.pareto_front`): ``routing, quality, experts_mean,
    active_expert_flops_per_token``, cheapest first."""
    if COST not in runs.columns or metric not in runs.columns:
        return pd.DataFrame(columns=["routing", "quality", "experts_mean", COST])
    front = stats.pareto_front(runs[COST].to_numpy(dtype=float), runs[metric].to_numpy(dtype=float),
                               higher_is_better)
    table = runs.loc[front, ["routing", metric, "experts_mean", COST]].rename(columns={metric: "quality"})
    return table.sort_values([COST, "routing"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------- all datasets

def _records(table: pd.DataFrame) -> list[dict]:
    return [{key: _plain(value) for key, value in row.items()} for row in table.to_dict("records")]


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: numpy scalars to Python, NaN / inf to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _baseline_quality(scores: pd.DataFrame | None, intervals: pd.DataFrame | None, run: pd.Series,
                      dataset: str, metric: str, options: Mapping[str, Any]) -> dict:
    if intervals is not None:
        rows = intervals[(intervals["routing"] == run["routing"]) & (intervals["dataset"] == dataset)]
        if len(rows):
            return {"quality": float(rows["estimate"].iloc[0]), "low": float(rows["low"].iloc[0]),
                    "high": float(rows["high"].iloc[0])}
    if scores is not None:
        documents = scores[scores["routing"] == run["routing"]]
        if len(documents):
            estimate, low, high = stats.bootstrap_ci(documents, metric, **options)
            return {"quality": estimate, "low": low, "high": high}
    return {"quality": float(run.get(metric, np.nan)), "low": np.nan, "high": np.nan}


def dataset_findings(runs: pd.DataFrame, scores: pd.DataFrame | None, baseline: str, metric: str,
                     higher_is_better: bool, tolerances: Sequence[float], intervals: pd.DataFrame | None = None,
                     repetitions: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """The findings of one dataset (its run rows and per-document scores) as a JSON-ready dict; see
    :func:`findings`. Without scores only the baseline's quality and the Pareto set are filled."""
    base_run = runs[runs["routing"] == baseline]
    if base_run.empty:
        raise ValueError(f"baseline {baseline!r} has no run on this dataset")
    base_run = base_run.iloc[0]
    options = {"repetitions": repetitions, "confidence": confidence, "seed": seed}
    result: dict[str, Any] = {
        "metric": metric, "higher_is_better": higher_is_better,
        "baseline": {"routing": baseline, **_baseline_quality(scores, intervals, base_run, runs["dataset"].iloc[0],
                                                               metric, options),
                     "experts_mean": float(base_run["experts_mean"]), COST: float(base_run.get(COST, np.nan))},
        "pareto": _records(pareto_set(runs, metric, higher_is_better)),
    }
    if scores is None or scores.empty or baseline not in set(scores["routing"]):
        result.update(documents=0, comparisons=[], tolerances=[], better=[], worse=[],
                      note="no per-document scores: no paired comparison")
        return result
    comparisons = compare_with_baseline(scores, runs, baseline, metric, **options)
    comparisons = significant_configs(comparisons, higher_is_better, alpha=1 - confidence)
    result["documents"] = int(scores[scores["routing"] == baseline]["doc_id"].nunique())
    result["comparisons"] = _records(comparisons)
    result["tolerances"] = [{"tolerance": float(tolerance),
                             "config": _plain_dict(cheapest_within(comparisons, tolerance, higher_is_better))}
                            for tolerance in sorted(tolerances)]
    result["better"] = sorted(comparisons.loc[comparisons["verdict"] == "better", "routing"])
    result["worse"] = sorted(comparisons.loc[comparisons["verdict"] == "worse", "routing"])
    return result


def _plain_dict(row: dict | None) -> dict | None:
    return None if row is None else {key: _plain(value) for key, value in row.items()}


def findings(runs: pd.DataFrame, scores: pd.DataFrame | None, baseline: str,
             metric_by_dataset: Mapping[str, tuple[str, bool]], tolerances: Sequence[float] = (0.005, 0.01, 0.02, 0.05),
             intervals: pd.DataFrame | None = None, repetitions: int = 2000, confidence: float = 0.95,
             seed: int = 0) -> dict:
    """The report's findings as a JSON-ready dict: the settings, and per dataset (sorted) its metric,
    the baseline's quality with its CI, one comparison per other config (quality, paired ratio CI,
    permutation p-value, Holm-adjusted p-value, verdict, experts, FLOPs saving), the cheapest config
    within each tolerance (None = none cheaper than the baseline qualifies), the significantly
    better / worse configs and the Pareto set.

    ``runs``: the aggregate's run table; ``scores``: its per-document scores (None: no paired
    analysis); ``intervals``: the quality CIs of
    :func:`routelab.report.statistics.run_quality_intervals` (the baseline's CI is taken from them
    when given, else recomputed the same way).
    """
    datasets = {}
    for dataset in sorted(metric_by_dataset):
        metric, higher_is_better = metric_by_dataset[dataset]
        dataset_runs = runs[runs["dataset"] == dataset]
        if baseline not in set(dataset_runs["routing"]):
            continue  # a dataset the baseline does not run has nothing to compare with
        dataset_scores = None if scores is None else scores[scores["dataset"] == dataset]
        datasets[dataset] = dataset_findings(dataset_runs, dataset_scores, baseline, metric, higher_is_better,
                                             tolerances, intervals, repetitions, confidence, seed)
    return {"baseline": baseline, "tolerances": sorted(float(t) for t in tolerances), "confidence": confidence,
            "repetitions": repetitions, "seed": seed, "test": TEST, "correction": CORRECTION,
            "alpha": 1 - confidence, "datasets": datasets}


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.{JSON_DIGITS}g}") if np.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(item) for item in value]
    return value


def findings_json(result: Mapping[str, Any]) -> str:
    """``result`` as JSON text: keys sorted, floats to :data:`JSON_DIGITS` significant digits, NaN as
    null, so that a rerun writes the same bytes."""
    return json.dumps(_rounded(dict(result)), indent=2, sort_keys=True, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- text

def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _quality(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _interval(low: float | None, high: float | None, spec: str = ".4g") -> str:
    if low is None or high is None or not (np.isfinite(low) and np.isfinite(high)):
        return ""
    return f" [{low:{spec}}, {high:{spec}}]"


def _saving(config: Mapping[str, Any]) -> str:
    saving = config.get("flops_saving")
    return "–" if saving is None else f"{100 * saving:.3g} %"


def _bound(higher_is_better: bool, tolerance: float) -> str:
    return f"CI low ≥ {1 - tolerance:.4g}" if higher_is_better else f"CI high ≤ {1 + tolerance:.4g}"


def method_text(result: Mapping[str, Any]) -> str:
    """One paragraph saying how every number of the findings was computed."""
    level = f"{result['confidence']:.0%}"
    return (f"Quality ratio = config's metric / baseline {result['baseline']}'s metric on the same documents, "
            f"with a paired percentile bootstrap CI ({result['repetitions']} resamples of documents, {level}, "
            f"seed {result['seed']}). A config is within a tolerance t when the CI stays within t on the bad "
            "side (higher is better: CI low ≥ 1 − t; lower is better: CI high ≤ 1 + t); the cheapest such "
            "config by active expert FLOPs per token is listed, among configs cheaper than the baseline (none: "
            "keep the baseline). Better / worse: a two-sided paired permutation test per config over documents "
            f"(scipy.stats.permutation_test, swapping a document's config and baseline scores, "
            f"{result['repetitions']} resamples), p-values {result['correction']}-corrected across the configs "
            f"of each dataset, significant at {result['alpha']:.2g}. Pareto set: no other config has fewer "
            "active expert FLOPs and better quality.")


def headline(dataset: str, entry: Mapping[str, Any]) -> str:
    """The sentence that answers "which configuration is best at what cost" for one dataset."""
    base = entry["baseline"]["routing"]
    found = [t for t in entry["tolerances"] if t["config"] is not None]
    if not entry["tolerances"]:
        return f"{dataset}: {entry.get('note', 'no comparison')}."
    if not found:
        largest = max(t["tolerance"] for t in entry["tolerances"])
        return (f"{dataset}: no config cheaper than {base} keeps {entry['metric']} within "
                f"{_percent(largest)} of it; keep {base}.")
    tightest, loosest = found[0], found[-1]
    text = f"{dataset}: {_within_text(tightest, entry['metric'], base)}"
    if loosest["config"]["routing"] != tightest["config"]["routing"]:
        text += f"; {_within_text(loosest, entry['metric'], base)}"
    return text + "."


def _within_text(item: Mapping[str, Any], metric: str, base: str) -> str:
    config = item["config"]
    return (f"{config['routing']} keeps {metric} within {_percent(item['tolerance'])} of {base} (ratio "
            f"{config['ratio']:.4f}{_interval(config['ratio_low'], config['ratio_high'], '.4f')}) with "
            f"{config['experts_mean']:.3g} experts per token and layer, {_saving(config)} fewer active expert "
            "FLOPs per token")


def _significance_text(entry: Mapping[str, Any], verdict: str) -> str:
    rows = [c for c in entry["comparisons"] if c["verdict"] == verdict]
    if not rows:
        return "none"
    return ", ".join(f"{c['routing']} (ratio {c['ratio']:.4g}, p_holm = {c['p_holm']:.2g})" for c in rows)


def _tolerance_rows(entry: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for item in entry["tolerances"]:
        config = item["config"]
        if config is None:
            rows.append([_percent(item["tolerance"]), f"none (keep {entry['baseline']['routing']})", "", "", "", ""])
            continue
        rows.append([_percent(item["tolerance"]), config["routing"], f"{config['experts_mean']:.3g}", _saving(config),
                     _quality(config["quality"]),
                     f"{config['ratio']:.4f}{_interval(config['ratio_low'], config['ratio_high'], '.4f')}"])
    return rows


TOLERANCE_HEADER = ["tolerance", "cheapest config within it", "experts", "FLOPs saving", "quality", "ratio [CI]"]


def _dataset_summary(dataset: str, entry: Mapping[str, Any]) -> dict[str, str]:
    base = entry["baseline"]
    direction = "higher is better" if entry["higher_is_better"] else "lower is better"
    pareto = ", ".join(f"{p['routing']} ({_quality(p['quality'])}, {p['experts_mean']:.3g} experts)"
                       for p in entry["pareto"]) or "–"
    return {
        "title": f"{dataset} — {entry['metric']} ({direction}; {entry['documents']} documents)",
        "baseline": (f"Baseline {base['routing']}: {entry['metric']} {_quality(base['quality'])}"
                     f"{_interval(base['low'], base['high'])}, {base['experts_mean']:.3g} experts per token and "
                     "layer."),
        "headline": headline(dataset, entry),
        "better": _significance_text(entry, "better"),
        "worse": _significance_text(entry, "worse"),
        "pareto": pareto,
    }


def findings_markdown(result: Mapping[str, Any]) -> str:
    """The findings as Markdown: the method paragraph, then per dataset the headline, the baseline,
    a tolerance table, the significantly better / worse configs and the Pareto set."""
    lines = ["# Findings", "", method_text(result), ""]
    for dataset, entry in result["datasets"].items():
        summary = _dataset_summary(dataset, entry)
        lines += [f"## {summary['title']}", "", f"**{summary['headline']}**", "", summary["baseline"], ""]
        if entry["tolerances"]:
            lines += ["| " + " | ".join(TOLERANCE_HEADER) + " |", "|" + "---|" * len(TOLERANCE_HEADER)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                      for row in _tolerance_rows(entry)]
            lines += ["", f"- Significantly better than {entry['baseline']['routing']}: {summary['better']}",
                      f"- Significantly worse: {summary['worse']}"]
        lines += [f"- Pareto set (quality vs active expert FLOPs): {summary['pareto']}", ""]
    return "\n".join(lines)


def findings_html(result: Mapping[str, Any]) -> str:
    """The findings block of report.html: a ``<section id="findings">`` with the method paragraph and
    per dataset the headline, the baseline, a small tolerance table, the significantly better / worse
    configs and the Pareto set. All text is HTML-escaped."""
    e = html.escape
    parts = ['<section id="findings" class="findings"><h2>Findings</h2>',
             f'<p class="caption">{e(method_text(result))}</p>']
    for dataset, entry in result["datasets"].items():
        summary = _dataset_summary(dataset, entry)
        parts += [f"<h3>{e(summary['title'])}</h3>", f"<p><b>{e(summary['headline'])}</b></p>",
                  f"<p>{e(summary['baseline'])}</p>"]
        if entry["tolerances"]:
            header = "".join(f"<th>{e(cell)}</th>" for cell in TOLERANCE_HEADER)
            body = "".join("<tr>" + "".join(f"<td>{e(cell)}</td>" for cell in row) + "</tr>"
                           for row in _tolerance_rows(entry))
            parts += [f'<div class="table-wrap"><table class="findings"><thead><tr>{header}</tr></thead>'
                      f"<tbody>{body}</tbody></table></div>",
                      f"<p>Significantly better than {e(entry['baseline']['routing'])}: {e(summary['better'])}. "
                      f"Significantly worse: {e(summary['worse'])}.</p>"]
        parts.append(f"<p>Pareto set (quality vs active expert FLOPs): {e(summary['pareto'])}.</p>")
    parts.append("</section>")
    return "\n".join(parts)
