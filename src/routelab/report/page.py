"""The report page: report.html, with the comparison table, one section per figure (its caption from
the figure catalogue) and links to every run's figures, all by relative paths."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

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
        f'<a href="comparison.tex">comparison.tex</a></p>'
        f'{html_table(display, index=False, classes="comparison")}</section>',
        *(_figure_html(section, report_dir, figures_dir) for section in sections),
        _per_run_html(links),
    ]
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f"<title>routelab report: {html.escape(experiment)}</title>\n<style>{CSS}</style>\n"
            "</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")
