"""The cross-run comparison report: tables, statistics, figures and a self-contained HTML page.

Input is the aggregate stage's tidy tables (:mod:`routelab.report.aggregate`): the run table, and
optionally the per-document scores, the per-(run, layer, expert) counts and the co-activation of one
layer; a section whose table is missing says so instead of drawing. :func:`write_report` writes into
``out_dir``: ``findings.{md,json}`` (:mod:`.findings`), ``comparison.{csv,md,tex}`` (:mod:`.tables`), the
statistics behind the figures as CSV (``quality_ci.csv``, ``entropy_correlation.csv``,
``rliable_intervals.csv``, ``improvement.csv``, ``performance_profiles.csv``), ``figures/*.png``
(:mod:`.figures`, listed in :data:`routelab.catalogue.REPORT_FIGURES`) and ``report.html`` (:mod:`.page`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from routelab.catalogue import REPORT_FIGURE
from routelab.io.files import write_text
from routelab.plot.drawing import message_figure
from routelab.report import analysis_figures as af
from routelab.report import figures as cp
from routelab.report import statistics as stats
from routelab.report.aggregate import default_layer
from routelab.report.diagnostics import pooled_quantiles
from routelab.report.explorer import write_explorer_files
from routelab.report.findings import findings, findings_html, findings_json, findings_markdown
from routelab.report.page import Section, html_table, interactive_data, per_run_links, render_html
from routelab.report.tables import (
    baseline_experts,
    comparison_table,
    display_table,
    efficiency_table,
    entropy_correlations,
    latex_table,
    metric_by_dataset,
    run_entropy,
)

log = logging.getLogger(__name__)

NO_BH_RUNS = "no BH runs in this experiment"
NO_EXPERT_COUNTS = "no expert counts in the aggregate (expert_counts.parquet)"
MAX_SPECIALISATION_LAYERS = 4
MAX_DIAGNOSTIC_LAYERS = 6  # panel columns of the router-diagnostics figure


@dataclass(frozen=True)
class ReportOptions:
    """Statistical settings of the report (config section ``report``)."""
    repetitions: int = 2000  # bootstrap resamples of every CI
    confidence: float = 0.95
    seed: int = 0
    layer: int | None = None  # layer of the expert-activation figures; None = the middle layer
    tolerances: tuple[float, ...] = (0.005, 0.01, 0.02, 0.05)  # relative quality losses of the findings

    def __post_init__(self) -> None:
        if self.repetitions < 1:
            raise ValueError(f"repetitions must be >= 1, got {self.repetitions}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        bad = [t for t in self.tolerances if not 0 < t < 1]
        if not self.tolerances or bad:
            raise ValueError(f"report.tolerances must be relative quality losses in (0, 1), e.g. 0.01 for 1 %; "
                             f"got {list(self.tolerances)}")


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


def analysis_layer(runs: pd.DataFrame, options: ReportOptions, coactivation: pd.DataFrame | None) -> int:
    """The configured layer, else the co-activation table's layer, else the middle layer."""
    if options.layer is not None:
        return options.layer
    if coactivation is not None and not coactivation.empty:
        return int(coactivation["layer"].iloc[0])
    return default_layer(int(runs["num_layers"].max()))


class ReportBuilder:
    """Computes the report's statistics and figures from the aggregate tables."""

    def __init__(self, runs: pd.DataFrame, baseline: str, out_dir: Path, options: ReportOptions,
                 scores: pd.DataFrame | None, expert_counts: pd.DataFrame | None,
                 coactivation: pd.DataFrame | None, analyses: Mapping[str, pd.DataFrame] | None = None) -> None:
        self.runs, self.baseline, self.out_dir, self.options = runs, baseline, out_dir, options
        self.scores, self.expert_counts, self.coactivation = scores, expert_counts, coactivation
        # the aggregate's analysis tables by name (its other .parquet files' stems); a missing one skips its section
        self.analyses: dict[str, pd.DataFrame] = dict(analyses or {})
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
        return Section(REPORT_FIGURE[file], drawn=False, note=reason)

    def experts_vs_alpha(self) -> Section:
        file = "experts_vs_alpha.png"
        bh_runs = self.runs[self.runs["method"] == "bh"]
        if bh_runs.empty:
            return self._skip(file, NO_BH_RUNS)
        reference, label = baseline_experts(self.runs, self.baseline)
        cp.experts_vs_alpha(bh_runs, reference, path=self._path(file), baseline_label=label)
        return Section(REPORT_FIGURE[file], True)

    def quality_vs(self, file: str, x: str, x_label: str) -> Section:
        if x not in self.runs.columns or self.runs[x].isna().all():
            return self._skip(file, f"the runs have no {x}")
        cp.quality_vs_experts(self.runs, self.metrics, baseline=self.baseline, path=self._path(file), x=x,
                              x_label=x_label, intervals=self.quality_intervals())
        return Section(REPORT_FIGURE[file], True)

    def expert_bubbles(self) -> Section:
        file = "expert_bubbles.png"
        if self.expert_counts is None:
            return self._skip(file, NO_EXPERT_COUNTS)
        layer = self.expert_counts[self.expert_counts["layer"] == self.layer]
        if layer.empty:
            return self._skip(file, f"no expert counts for layer {self.layer}")
        weights = layer.pivot_table(index="routing", columns="expert", values="count", aggfunc="sum").sort_index()
        entropy = stats.usage_entropy(weights.to_numpy(), axis=1)
        cp.expert_bubble_heatmap(weights.to_numpy(), list(weights.index), entropy,
                                 title=f"layer {self.layer}, all datasets", path=self._path(file))
        return Section(REPORT_FIGURE[file], True)

    def entropy_vs_quality(self) -> Section:
        file = "entropy_vs_quality.png"
        if self.expert_counts is None:
            return self._skip(file, NO_EXPERT_COUNTS)
        entropy = run_entropy(self.expert_counts)
        table = entropy.merge(self.runs, on=["routing", "dataset"])
        cp.entropy_vs_quality(table, self.metrics, path=self._path(file))
        correlations = entropy_correlations(entropy, self.runs, self.metrics)
        self._write_csv("entropy_correlation.csv", correlations)
        return Section(REPORT_FIGURE[file], True, table_html=html_table(correlations, index=False))

    def rliable(self) -> list[Section]:
        files = ("rliable_intervals.png", "probability_of_improvement.png", "performance_profiles.png")
        if self.scores is None:
            return [self._skip(file, "no per-document scores in the aggregate (scores.parquet)") for file in files]
        relative = stats.relative_document_scores(self.scores, self.baseline, self.metrics)
        matrices, _, self.documents = stats.score_matrices(relative)
        options = self._bootstrap_options()
        log.info("rliable interval estimates of %d routings (%d documents x %d datasets)", len(matrices),
                 self.documents, len(relative))
        intervals = stats.interval_estimates(matrices, **options)
        self._write_csv("rliable_intervals.csv", intervals)
        cp.interval_estimates_plot(intervals, baseline=self.baseline, path=self._path(files[0]))
        sections = [Section(REPORT_FIGURE[files[0]], True, table_html=html_table(
            intervals.pivot(index="routing", columns="metric", values="estimate")[list(stats.AGGREGATE_METRICS)]))]
        if len(matrices) < 2:
            sections.append(self._skip(files[1], "only the baseline has scores: nothing to compare"))
        else:
            log.info("rliable probability of improvement over %s", self.baseline)
            improvement = stats.improvement_over_baseline(matrices, self.baseline, **options)
            self._write_csv("improvement.csv", improvement)
            cp.improvement_plot(improvement, self.baseline, path=self._path(files[1]))
            sections.append(Section(REPORT_FIGURE[files[1]], True))
        log.info("rliable performance profiles")
        profiles = stats.performance_profiles(matrices, stats.profile_thresholds(matrices), **options)
        self._write_csv("performance_profiles.csv", profiles)
        cp.performance_profile_plot(profiles, baseline=self.baseline, path=self._path(files[2]))
        sections.append(Section(REPORT_FIGURE[files[2]], True))
        return sections

    def efficiency(self) -> Section:
        file = "efficiency.png"
        table, axes = efficiency_table(self.runs, self.baseline, self.metrics)
        if len(axes) < 2:
            return self._skip(file, "fewer than two efficiency measures were recorded")
        cp.efficiency_parallel_coordinates(table, axes, baseline=self.baseline, path=self._path(file))
        return Section(REPORT_FIGURE[file], True)

    def router_diagnostics(self) -> Section:
        file = "router_diagnostics.png"
        table = self.analyses.get("router_diagnostics")
        if table is None or table.empty:
            return self._skip(file, "no sampled router decisions in the aggregate (router_diagnostics.parquet)")
        quantiles = pooled_quantiles(table, cp.DIAGNOSTIC_QUANTILES)
        self._write_csv("router_diagnostics.csv", quantiles)
        num_layers = int(table["layer"].max()) + 1
        spaced = np.linspace(0, num_layers - 1, min(num_layers, MAX_DIAGNOSTIC_LAYERS)).round().astype(int)
        layers = sorted({*spaced.tolist(), self.layer} & set(table["layer"].unique().tolist()))
        cp.router_diagnostics(quantiles, baseline=self.baseline, layers=layers, path=self._path(file))
        return Section(REPORT_FIGURE[file], True)

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
        return Section(REPORT_FIGURE[file], True)

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
        return Section(REPORT_FIGURE[file], True)

    def _analysis(self, name: str) -> pd.DataFrame | None:
        table = self.analyses.get(name)
        return None if table is None or table.empty else table

    def vocabulary_figure(self) -> Section:
        file = "vocabulary_specialisation.png"
        vocabulary = self._analysis("vocabulary")
        if vocabulary is None:
            return self._skip(file, "no vocabulary table in the aggregate (vocabulary.parquet)")
        af.vocabulary_specialisation(vocabulary, path=self._path(file))
        top = self._analysis("vocabulary_top_tokens")
        table = af.top_tokens_table(top, self.baseline, self.layer) if top is not None else None
        table_html = html_table(table, index=False) if table is not None and not table.empty else ""
        return Section(REPORT_FIGURE[file], True, table_html=table_html)

    def _table_figure(self, file: str, name: str, draw: Callable[..., object], missing: str) -> Section:
        """``draw(table, path=...)`` of the aggregate's analysis table ``name``, or a note ``missing``."""
        table = self._analysis(name)
        if table is None:
            return self._skip(file, missing)
        draw(table, path=self._path(file))
        return Section(REPORT_FIGURE[file], True)

    def cross_layer_figure(self) -> Section:
        return self._table_figure("cross_layer_predictability.png", "cross_layer", af.cross_layer_predictability,
                                  "no cross-layer table in the aggregate (cross_layer.parquet; one MoE layer?)")

    def locality_figure(self) -> Section:
        return self._table_figure("temporal_locality.png", "locality", af.temporal_locality,
                                  "no locality table in the aggregate (locality.parquet)")

    def baseline_agreement_figure(self) -> Section:
        file = "baseline_agreement.png"
        table = self._analysis("baseline_agreement")
        if table is None or (table["routing"] != self.baseline).sum() == 0:
            return self._skip(file, f"no config other than {self.baseline} has a baseline_agreement table")
        af.baseline_agreement(table, self.baseline, path=self._path(file))
        return Section(REPORT_FIGURE[file], True)

    def adaptive_k_figures(self) -> list[Section]:
        sections = []
        for file, name, draw in (("k_by_position.png", "k_by_position", af.k_by_position),
                                 ("k_by_frequency.png", "k_by_frequency", af.k_by_frequency)):
            table = self._analysis(name)
            if table is None:
                sections.append(self._skip(file, f"no {name} table in the aggregate ({name}.parquet)"))
            elif not af.adaptive_routings(table):
                sections.append(self._skip(file, "no routing config's number of experts varies"))
            else:
                draw(table, path=self._path(file))
                sections.append(Section(REPORT_FIGURE[file], True))
        return sections

    def sections(self, workers: int = 1) -> list[Section]:
        """Every figure's section, in page order. With ``workers`` >= 2 (and fork available) a forked
        child draws the figures after the rliable ones while this process draws the rest: the same
        files, in half the time on two cores. The rliable step stays here: it sets ``self.documents``."""
        steps: list[Callable[[], Section | list[Section]]] = [
            self.experts_vs_alpha,
            lambda: self.quality_vs("quality_vs_experts.png", "experts_mean", "experts per token and layer (mean)"),
            lambda: self.quality_vs("quality_vs_flops.png", "active_expert_flops_per_token",
                                    "active expert FLOPs per token"),
            self.expert_bubbles, self.entropy_vs_quality, self.rliable,
            # drawn by the child with workers >= 2: about as long as the steps above on the demo
            self.efficiency,
            self.router_diagnostics, self.domain_specialisation, self.coactivation_figure,
            self.vocabulary_figure, self.cross_layer_figure, self.locality_figure, self.baseline_agreement_figure,
            self.adaptive_k_figures,
        ]
        split = steps.index(self.efficiency)
        if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
            return _run_steps(steps)
        global _FORKED_STEPS
        _FORKED_STEPS = steps[split:]  # the child inherits them through fork: no pickling of the tables
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            child = pool.apply_async(_run_forked_steps)
            here = _run_steps(steps[:split])
            return here + child.get()


_FORKED_STEPS: list[Callable[[], Section | list[Section]]] = []


def _run_forked_steps() -> list[Section]:
    return _run_steps(_FORKED_STEPS)


def _run_steps(steps: list[Callable[[], Section | list[Section]]]) -> list[Section]:
    sections = []
    for step in steps:
        start = time.perf_counter()
        result = step()
        result = result if isinstance(result, list) else [result]
        log.info("%s: %.1f s", ", ".join(section.figure.file for section in result), time.perf_counter() - start)
        sections.extend(result)
    return sections


def write_report(runs: pd.DataFrame, out_dir: str | os.PathLike, experiment: str, baseline: str,
                 plots_root: str | os.PathLike, scores: pd.DataFrame | None = None,
                 expert_counts: pd.DataFrame | None = None, coactivation: pd.DataFrame | None = None,
                 options: ReportOptions | None = None, analyses: Mapping[str, pd.DataFrame] | None = None,
                 workers: int = 1) -> Path:
    """Write the comparison tables, statistics, figures and report.html into ``out_dir`` (each file
    atomically); returns the path of report.html. ``scores`` / ``expert_counts`` /
    ``coactivation`` are the aggregate stage's tables; without one, its sections say so. ``workers``:
    processes drawing the figures (at most 2 are used)."""
    out_dir = Path(out_dir)
    options = options or ReportOptions()
    if runs.empty:
        raise ValueError("runs is empty: nothing to compare")
    baseline_experts(runs, baseline)  # an unknown baseline fails before anything is written
    builder = ReportBuilder(runs, baseline, out_dir, options, scores, expert_counts, coactivation, analyses)
    intervals = builder.quality_intervals()
    found = findings(runs, scores, baseline, builder.metrics, options.tolerances, intervals,
                     **builder._bootstrap_options())
    write_text(out_dir / "findings.md", findings_markdown(found))
    write_text(out_dir / "findings.json", findings_json(found))
    comparison = comparison_table(runs, intervals)
    display = display_table(comparison, builder.metrics)
    write_text(out_dir / "comparison.csv", comparison.to_csv(index=False))
    write_text(out_dir / "comparison.md", display.to_markdown(index=False) + "\n")
    write_text(out_dir / "comparison.tex", latex_table(
        display, f"Routing comparison, experiment {experiment}; baseline {baseline}."))
    sections = builder.sections(workers)
    methods = METHODS_TEXT.format(repetitions=options.repetitions, confidence=options.confidence,
                                  seed=options.seed, documents=builder.documents or "all")
    links = per_run_links(runs, plots_root, out_dir)
    report = out_dir / "report.html"
    # the explorer's runs, one script each beside the page (aggregate/explorer.parquet, when present)
    explorer = write_explorer_files(builder.analyses.get("explorer"), out_dir)
    interactive = interactive_data(comparison, runs, builder.metrics, baseline, explorer)
    write_text(report, render_html(display, experiment, baseline, sections, links, methods, out_dir,
                                   builder.figures_dir, findings_html=findings_html(found), interactive=interactive))
    return report
