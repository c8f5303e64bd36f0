"""The report page: report.html, with the comparison table, one section per figure (its caption from
the figure catalogue) and links to every run's figures, all by relative paths.

The page is self-contained and works offline: its CSS and JavaScript (``assets/report.{css,js}``) are
inlined, its data is embedded JSON (:func:`interactive_data`, :func:`embed_json`), and the token
explorer's per-run data lies beside it in ``explorer/<n>.js`` (:mod:`routelab.report.explorer`)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from routelab.catalogue import RUN_FIGURES, Figure


@dataclass
class Section:
    """What the HTML shows for one figure: drawn, or a note saying why not."""
    figure: Figure
    drawn: bool
    note: str = ""
    table_html: str = ""


def run_figure_files(plot_dir: Path) -> list[tuple[str, str]]:
    """``[(file, title)]`` of one run's figures: from plot_dir/index.json (drawn entries only)
    when present, else every PNG in plot_dir, titled from :data:`routelab.catalogue.RUN_FIGURES`."""
    titles = {figure.file: figure.title for figure in RUN_FIGURES}
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


def asset(name: str) -> str:
    """The text of ``assets/<name>`` (the page's CSS and JavaScript, shipped as package data)."""
    text = resources.files("routelab.report").joinpath("assets", name).read_text(encoding="utf-8")
    assert "</script" not in text.lower() and "</style" not in text.lower(), f"{name} would end its element early"
    return text


def embed_json(data: Any) -> str:
    """``data`` as JSON that is safe inside ``<script type="application/json">``: every ``<``, ``>`` and
    ``&`` is a ``\\u`` escape, so no ``</script>`` or ``<!--`` in the data can end or change the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> float | None:
    number = pd.to_numeric(value, errors="coerce")
    return float(number) if pd.notna(number) and np.isfinite(number) else None


def plot_points(comparison: pd.DataFrame, runs: pd.DataFrame, metric_by_dataset: dict[str, tuple[str, bool]],
                baseline: str) -> list[dict]:
    """The quality-vs-cost plot's points, one per run: ``routing, dataset, method, params, metric,
    higher, quality, low, high`` (the CI, None without one), ``experts_mean``, ``flops`` (active expert
    FLOPs per token), ``flops_vs_baseline`` (over the baseline's on the same dataset) and ``baseline``."""
    flops = runs.set_index(["routing", "dataset"])["active_expert_flops_per_token"] \
        if "active_expert_flops_per_token" in runs.columns else pd.Series(dtype=float)
    points = []
    for row in comparison.itertuples(index=False):
        metric, higher = metric_by_dataset[row.dataset]
        cost = _finite(flops.get((row.routing, row.dataset)))
        base = _finite(flops.get((baseline, row.dataset)))
        points.append({
            "routing": row.routing, "dataset": row.dataset, "method": row.method, "params": row.params,
            "metric": metric, "higher": bool(higher), "quality": _finite(getattr(row, metric)),
            "low": _finite(getattr(row, f"{metric}_ci_low", None)),
            "high": _finite(getattr(row, f"{metric}_ci_high", None)),
            "experts_mean": _finite(row.experts_mean), "flops": cost,
            "flops_vs_baseline": cost / base if cost is not None and base else None,
            "baseline": row.routing == baseline})
    return points


def interactive_data(comparison: pd.DataFrame, runs: pd.DataFrame, metric_by_dataset: dict[str, tuple[str, bool]],
                     baseline: str, explorer: list[dict] | None = None) -> dict:
    """What the page's script reads: the baseline, the plot's points (:func:`plot_points`) and the
    explorer's run index (:func:`routelab.report.explorer.write_explorer_files`)."""
    return {"baseline": baseline, "explorer": list(explorer or []),
            "plot": {"x_label": "active expert FLOPs per token",
                     "points": plot_points(comparison, runs, metric_by_dataset, baseline)}}


def html_table(table: pd.DataFrame, index: bool = True, classes: str | None = None) -> str:
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


COMPARISON_CAPTION = (
    "One row per (routing, dataset) run. quality [CI]: the dataset's primary metric (↑ higher is better, ↓ lower "
    "is better) with its bootstrap confidence interval over documents; experts: mean ± std of experts selected "
    "per token and layer; ceiling % / floor %: share of decisions that selected max_k / min_k experts; FLOPs vs "
    "top-k: active expert FLOPs relative to the model's own top-k; tokens/s: evaluation throughput; memory: peak "
    "GPU memory, or process memory on CPU. Click a column's header to sort by it (numbers by value; quality and "
    "experts by their first number), type in the box to keep the rows containing every word. The same table "
    "is in comparison.csv (all numbers), comparison.md and comparison.tex (booktabs).")

PLOT_CAPTION = (
    "Each run's quality against its active expert FLOPs per token (the cost of the experts it ran), one "
    "dataset at a time; the vertical bars are the bootstrap CIs, the baseline is ringed in black. Hover a "
    "point (or focus it with Tab) for its routing, parameters, quality with CI, mean experts and FLOPs "
    "relative to the baseline.")

EXPLORER_CAPTION = (
    "A few documents of every run (the same documents in every run, so runs can be compared token by "
    "token), their text with each token shaded by the experts it used. Hover a token for its experts and "
    "weights in every layer; click it to keep it while reading the table. For rules with p-values, the "
    "chosen layer's sorted p-values are drawn against the Benjamini–Hochberg line i·α/N with the selected "
    "experts filled; click a layer's row to choose it. Each run's data is a script in explorer/ beside this "
    "page, loaded when the run is chosen.")


def _comparison_html(display: pd.DataFrame) -> str:
    controls = ('<div class="controls"><label>Filter <input type="search" id="table-filter" '
                'placeholder="routing, method, parameter…"></label><label>Dataset <select id="table-dataset">'
                '<option value="">all</option></select></label><span id="table-count"></span></div>')
    return (f'<section><h2 id="comparison">Comparison table</h2><p class="caption">{html.escape(COMPARISON_CAPTION)}'
            '</p><p><a href="comparison.csv">comparison.csv</a> · <a href="comparison.md">comparison.md</a> · '
            f'<a href="comparison.tex">comparison.tex</a></p>{controls}'
            f'{html_table(display, index=False, classes="comparison")}</section>')


def _plot_html() -> str:
    return ('<section><h2 id="quality-vs-cost">Quality vs cost (interactive)</h2>'
            f'<p class="caption">{html.escape(PLOT_CAPTION)}</p><div class="controls"><label>Dataset '
            '<select id="plot-dataset"></select></label></div><div class="plot-wrap"><div id="cost-plot"></div>'
            '<div class="tooltip" id="plot-tooltip" role="tooltip" hidden></div></div></section>')


def _explorer_html(has_runs: bool) -> str:
    title = '<h2 id="explorer">Token-level routing explorer</h2>'
    if not has_runs:
        return (f'<section>{title}<p class="caption">No explorer data in the aggregate (explorer.parquet): '
                "the aggregate stage writes it from each run's first documents.</p></section>")
    return (f'<section>{title}<p class="caption">{html.escape(EXPLORER_CAPTION)}</p><div id="explorer-app">'
            '<div class="controls"><label>Run <select id="explorer-run"></select></label><label>Document '
            '<select id="explorer-doc"></select></label><label>Shade by <select id="explorer-shade"></select></label>'
            '<span id="explorer-status"></span></div><p class="caption" id="explorer-legend"></p>'
            '<div class="explorer-text" id="explorer-text"></div><div class="explorer-detail" id="explorer-detail">'
            "</div></div></section>")


def render_html(display: pd.DataFrame, experiment: str, baseline: str, sections: list[Section],
                links: list[tuple[str, str, list[tuple[str, str]]]], methods: str, report_dir: Path,
                figures_dir: Path, findings_html: str = "", interactive: dict | None = None) -> str:
    """The report page: title, the findings block (``findings_html``, already escaped HTML), contents,
    methods, comparison table (sortable and filterable), the interactive quality-vs-cost plot and the
    token explorer (with ``interactive``, :func:`interactive_data`), one section per figure, links."""
    interactive = interactive if interactive is not None else {"baseline": baseline, "explorer": [],
                                                               "plot": {"x_label": "", "points": []}}
    toc_entries = [("methods", "Methods"), ("comparison", "Comparison table"),
                   ("quality-vs-cost", "Quality vs cost (interactive)"), ("explorer", "Token-level routing explorer"),
                   *((s.figure.anchor, s.figure.title) for s in sections), ("per-run-figures", "Per-run figures")]
    toc = "".join(f'<li><a href="#{anchor}">{html.escape(title)}</a></li>' for anchor, title in toc_entries)
    body = [
        "<h1>Routing comparison report</h1>",
        f'<p class="meta">Experiment: <b>{html.escape(experiment)}</b> · baseline: '
        f"<b>{html.escape(baseline)}</b> · {len(display)} runs</p>",
        findings_html,
        f"<nav><h2>Contents</h2><ol>{toc}</ol></nav>",
        f'<section><h2 id="methods">Methods</h2><p class="caption">{html.escape(methods)}</p></section>',
        _comparison_html(display),
        _plot_html(),
        _explorer_html(bool(interactive["explorer"])),
        *(_figure_html(section, report_dir, figures_dir) for section in sections),
        _per_run_html(links),
        f'<script type="application/json" id="report-data">{embed_json(interactive)}</script>',
        f"<script>{asset('report.js')}</script>",
    ]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>routelab report: {html.escape(experiment)}</title>\n<style>{asset('report.css')}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
