"""The cross-run comparison report: a table, two figures and a self-contained HTML page.

Input is the aggregate run table (:func:`routelab.aggregate.collect_runs`). ``write_report`` writes
into ``out_dir``: ``comparison.csv``, ``comparison.md``, ``figures/experts_vs_alpha.png``,
``figures/quality_vs_experts.png`` and ``report.html`` (figures embedded as base64 data URIs, per-run
figures linked relative to the report).
"""

from __future__ import annotations

import base64
import html
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from routelab.aggregate import ROUTING_PARAMS
from routelab.io import write_text
from routelab.plots import experts_vs_alpha, message_figure, quality_vs_experts
from routelab.quality import PRIMARY_METRIC

log = logging.getLogger(__name__)

ROUTING_STATS = ("experts_mean", "experts_std", "ceiling_hit_rate", "floor_hit_rate", "tokens_per_s")
# File names of the per-run figures under plots_root/{routing}/{dataset}/ (written by plot_run).
RUN_FIGURES = {"experts_histogram.png": "experts per decision", "expert_heatmap.png": "expert usage"}
NO_BH_RUNS = "no BH runs in this experiment"


@dataclass(frozen=True)
class ReportFigure:
    """A cross-run figure of the report: where it is written and how the HTML presents it."""
    anchor: str
    title: str
    caption: str


EXPERTS_VS_ALPHA = ReportFigure(
    "experts-vs-alpha", "Experts selected vs alpha",
    "Mean number of experts selected per token and layer by BH routing against its false-discovery "
    "level alpha, one panel per dataset and one line per max_k; error bars are ± one standard "
    "deviation across routing decisions. The dashed line is the top-k baseline. A line below it "
    "means BH uses fewer experts than the baseline; a line that flattens at max_k means the ceiling "
    "binds and a larger max_k would change the routing.")
QUALITY_VS_EXPERTS = ReportFigure(
    "quality-vs-experts", "Quality vs experts selected",
    "Primary quality metric of each run against its mean number of experts per token and layer, one "
    "panel per dataset; points are coloured by routing method and labelled with the routing name, "
    "and the ringed point is the baseline. The y-axis label says whether higher or lower is better: "
    "the best trade-offs lie to the left (fewer experts) and towards the better side.")


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


def comparison_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: routing, dataset, method, params, the primary metric column(s) of the tasks
    present, then experts_mean, experts_std, ceiling_hit_rate, floor_hit_rate (in %) and
    tokens_per_s. Sorted by dataset, method, routing."""
    if runs.empty:
        raise ValueError("runs is empty: nothing to compare")
    metric_columns = list(dict.fromkeys(column for column, _ in metric_by_dataset(runs).values()))
    table = runs[["routing", "dataset", "method"]].copy()
    table["params"] = runs.apply(params_text, axis=1)
    for column in (*metric_columns, *ROUTING_STATS):
        table[column] = runs[column] if column in runs.columns else float("nan")
    return table.sort_values(["dataset", "method", "routing"], ignore_index=True)


def baseline_experts(runs: pd.DataFrame, baseline: str) -> tuple[dict[str, float], str]:
    """``{dataset: experts_mean}`` of the baseline routing and a legend label for it."""
    rows = runs[runs["routing"] == baseline]
    if rows.empty:
        raise ValueError(f"baseline {baseline!r} is not among the routings "
                         f"{sorted(runs['routing'].unique())}")
    k = rows["k"].dropna() if "k" in rows.columns else pd.Series(dtype=float)
    label = f"baseline {baseline}" + (f" (k = {_format_value(float(k.iloc[0]))})" if len(k) else "")
    return dict(zip(rows["dataset"], rows["experts_mean"])), label


def write_figures(runs: pd.DataFrame, figures_dir: str | os.PathLike, baseline: str) -> dict[str, bool]:
    """Write both cross-run figures; returns, per file name, whether it shows data (False: the
    experts-vs-alpha figure is a placeholder because there are no BH runs)."""
    figures_dir = Path(figures_dir)
    reference, label = baseline_experts(runs, baseline)
    bh_runs = runs[runs["method"] == "bh"]
    if bh_runs.empty:
        log.info("%s: experts_vs_alpha.png is a placeholder", NO_BH_RUNS)
        message_figure(NO_BH_RUNS, path=figures_dir / "experts_vs_alpha.png")
    else:
        experts_vs_alpha(bh_runs, reference, path=figures_dir / "experts_vs_alpha.png",
                         baseline_label=label)
    quality_vs_experts(runs, metric_by_dataset(runs), baseline=baseline,
                       path=figures_dir / "quality_vs_experts.png")
    return {"experts_vs_alpha.png": not bh_runs.empty, "quality_vs_experts.png": True}


def per_run_links(runs: pd.DataFrame, plots_root: str | os.PathLike,
                  report_dir: str | os.PathLike) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``[(routing, dataset, [(figure label, path relative to report_dir)])]`` for every run."""
    links = []
    for run in runs.sort_values(["routing", "dataset"]).itertuples(index=False):
        run_dir = Path(plots_root) / run.routing / run.dataset
        files = [(label, os.path.relpath(run_dir / name, report_dir)) for name, label in RUN_FIGURES.items()]
        links.append((run.routing, run.dataset, files))
    return links


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
td:nth-child(-n+4), th:nth-child(-n+4) { text-align: left; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #444; font-size: 0.92em; max-width: 900px; }
section { margin-top: 2em; }
"""


def _figure_section(figure: ReportFigure, png_path: Path, drawn: bool, note: str) -> str:
    title = f'<h2 id="{figure.anchor}">{html.escape(figure.title)}</h2>'
    if not drawn:
        return f"<section>{title}<p>{html.escape(note)}</p></section>"
    data = base64.b64encode(png_path.read_bytes()).decode("ascii")
    return (f'<section>{title}<figure><img src="data:image/png;base64,{data}" '
            f'alt="{html.escape(figure.title)}"><figcaption>{html.escape(figure.caption)}'
            f"</figcaption></figure></section>")


def _per_run_section(links: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(routing)}</td><td>{html.escape(dataset)}</td><td>"
        + " · ".join(f'<a href="{html.escape(href)}">{html.escape(label)}</a>' for label, href in files)
        + "</td></tr>" for routing, dataset, files in links)
    return ('<section><h2 id="per-run-figures">Per-run figures</h2><p class="caption">For each run: '
            "the histogram of experts selected per token and layer, and the heatmap of how often each "
            "expert is selected in each layer.</p><table><thead><tr><th>routing</th><th>dataset</th>"
            f"<th>figures</th></tr></thead><tbody>{rows}</tbody></table></section>")


def render_html(comparison: pd.DataFrame, experiment: str, baseline: str, figures_dir: Path,
                drawn: dict[str, bool], links: list[tuple[str, str, list[tuple[str, str]]]]) -> str:
    """The self-contained report page."""
    metrics = ", ".join(f"{column} ({'higher' if better else 'lower'} is better)"
                        for column, better in dict(PRIMARY_METRIC.values()).items()
                        if column in comparison.columns)
    table_html = comparison.to_html(index=False, na_rep="–", float_format=lambda v: f"{v:.4g}",
                                    border=0, escape=True)
    sections = [
        ("comparison", "Comparison table"),
        (EXPERTS_VS_ALPHA.anchor, EXPERTS_VS_ALPHA.title),
        (QUALITY_VS_EXPERTS.anchor, QUALITY_VS_EXPERTS.title),
        ("per-run-figures", "Per-run figures"),
    ]
    toc = "".join(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in sections)
    caption = ("One row per (routing, dataset) run. Primary metric: " + metrics + ". experts_mean / "
               "experts_std: experts selected per token and layer; ceiling_hit_rate / floor_hit_rate: "
               "% of decisions that selected max_k / min_k experts; tokens_per_s: evaluation "
               "throughput.")
    body = [
        "<h1>Routing comparison report</h1>",
        f'<p class="meta">Experiment: <b>{html.escape(experiment)}</b> · baseline: '
        f"<b>{html.escape(baseline)}</b> · {len(comparison)} runs</p>",
        f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>",
        f'<section><h2 id="comparison">Comparison table</h2><p class="caption">{html.escape(caption)}'
        f'</p><div class="table-wrap">{table_html}</div></section>',
        _figure_section(EXPERTS_VS_ALPHA, figures_dir / "experts_vs_alpha.png",
                        drawn["experts_vs_alpha.png"],
                        "Skipped: there are no BH runs in this experiment."),
        _figure_section(QUALITY_VS_EXPERTS, figures_dir / "quality_vs_experts.png",
                        drawn["quality_vs_experts.png"], ""),
        _per_run_section(links),
    ]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>routelab report: {html.escape(experiment)}</title>\n<style>{CSS}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def write_report(runs: pd.DataFrame, out_dir: str | os.PathLike, experiment: str, baseline: str,
                 plots_root: str | os.PathLike) -> Path:
    """Write comparison.csv/.md, figures/*.png and report.html into ``out_dir`` (each atomically);
    returns the path of report.html."""
    out_dir = Path(out_dir)
    comparison = comparison_table(runs)
    baseline_experts(runs, baseline)  # an unknown baseline fails before anything is written
    write_text(out_dir / "comparison.csv", comparison.to_csv(index=False))
    write_text(out_dir / "comparison.md", comparison.to_markdown(index=False, floatfmt=".4g", missingval="–") + "\n")
    figures_dir = out_dir / "figures"
    drawn = write_figures(runs, figures_dir, baseline)
    links = per_run_links(runs, plots_root, out_dir)
    report = out_dir / "report.html"
    write_text(report, render_html(comparison, experiment, baseline, figures_dir, drawn, links))
    return report
