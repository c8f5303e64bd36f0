"""Every figure the pipeline draws, each described once: its file, title, label and caption file.

The per-run figures (plot_run, one set per run) and the report's cross-run figures. The rules read
their outputs and Snakemake-report captions from here (``workflow/rules/plot.smk``, ``report.smk``),
``index.json`` and ``report.html`` their titles, and each caption is one ``.rst`` file in
``workflow/report/`` that both Snakemake's report and ``report.html`` show. Data only (no
matplotlib, no torch): the Snakefile imports it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

# Where the caption files live in a source checkout (the package is installed editable from it).
CAPTIONS = Path(__file__).resolve().parents[2] / "workflow" / "report"


@dataclass(frozen=True)
class Figure:
    """One figure: ``file`` (its PNG name; the rule output is named by its stem), ``title`` (shown
    above it), ``label`` (its short name in Snakemake's report) and its caption file in ``workflow/report/``."""

    file: str
    title: str
    label: str

    @property
    def name(self) -> str:
        return self.file.removesuffix(".png")

    @property
    def anchor(self) -> str:
        """Its id in report.html."""
        return self.name.replace("_", "-")

    @property
    def caption_file(self) -> str:
        return f"{self.name}.rst"

    @property
    def caption(self) -> str:
        """The caption text (its ``.rst`` file, line breaks as spaces)."""
        return caption_text(self.caption_file)


@functools.cache
def caption_text(file: str) -> str:
    """A caption file's text as one paragraph (reStructuredText ``code`` marks kept as written)."""
    return re.sub(r"\s+", " ", (CAPTIONS / file).read_text()).strip()


# The per-run figures, in display order.
RUN_FIGURES: tuple[Figure, ...] = (
    Figure("experts_histogram.png", "Experts selected per token and layer", "experts selected"),
    Figure("expert_heatmap.png", "Expert selection frequency by layer", "expert heatmap"),
    Figure("pvalue_distribution.png", "P-values against uniform [0, 1]", "p-value distribution"),
    Figure("logit_vs_pvalue.png", "Router logit against p-value", "logit vs p-value"),
    Figure("bh_decisions.png", "BH step-up on sampled tokens", "BH step-up samples"),
    Figure("bh_pass_rate.png", "BH pass rate by expert rank", "BH pass rate by rank"),
    Figure("routing_sequence.png", "Routing of a sample sequence", "sample sequence routing"),
    Figure("expert_utilisation.png", "Expert utilisation", "expert utilisation"),
    Figure("token_rarity.png", "Token rarity against experts selected", "token rarity vs experts"),
    Figure("layer_experts.png", "Experts selected per layer", "experts per layer"),
)

# The report's cross-run figures, in the order report.html shows them.
REPORT_FIGURES: tuple[Figure, ...] = (
    Figure("experts_vs_alpha.png", "Experts selected vs alpha", "experts vs alpha"),
    Figure("quality_vs_experts.png", "Quality vs experts selected", "quality vs experts"),
    Figure("quality_vs_flops.png", "Quality vs active expert FLOPs", "quality vs FLOPs"),
    Figure("expert_bubbles.png", "Expert activation per config", "expert activation"),
    Figure("entropy_vs_quality.png", "Expert-usage entropy vs quality", "entropy vs quality"),
    Figure("rliable_intervals.png", "Aggregate scores with stratified-bootstrap CIs", "rliable intervals"),
    Figure("probability_of_improvement.png", "Probability of improvement over the baseline",
           "probability of improvement"),
    Figure("performance_profiles.png", "Performance profiles", "performance profiles"),
    Figure("efficiency.png", "Efficiency: compute, memory, time and quality", "efficiency"),
    Figure("router_diagnostics.png", "Router entropy and top-1 margin by layer", "router diagnostics"),
    Figure("domain_specialisation.png", "Domain specialisation of experts", "domain specialisation"),
    Figure("coactivation.png", "Expert co-activation", "co-activation"),
    Figure("vocabulary_specialisation.png", "Vocabulary specialisation of experts", "vocabulary specialisation"),
    Figure("cross_layer_predictability.png", "Cross-layer predictability of the top-1 expert", "cross-layer"),
    Figure("temporal_locality.png", "Temporal locality: consecutive tokens sharing experts", "temporal locality"),
    Figure("baseline_agreement.png", "Agreement with the baseline's experts", "baseline agreement"),
    Figure("k_by_position.png", "Adaptive k by position in the sequence", "k by position"),
    Figure("k_by_frequency.png", "Adaptive k by token frequency", "k by token frequency"),
)

RUN_FIGURE = {figure.file: figure for figure in RUN_FIGURES}
REPORT_FIGURE = {figure.file: figure for figure in REPORT_FIGURES}

# The aggregate stage's analysis tables beyond the run, layer, score and count tables, each
# aggregate/{name}.parquet (the aggregate rule's outputs; the report reads every one it finds).
ANALYSIS_TABLES: tuple[str, ...] = (
    "vocabulary", "vocabulary_top_tokens", "cross_layer", "locality", "baseline_agreement", "k_by_position",
    "k_by_frequency", "router_diagnostics", "explorer",
)
