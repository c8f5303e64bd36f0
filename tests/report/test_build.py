"""The report: comparison tables, statistics files, figures and report.html, from hand-made runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from routelab.catalogue import ANALYSIS_TABLES, REPORT_FIGURES
from routelab.report.aggregate import (
    collect_runs,
)
from routelab.report.build import ReportOptions, write_report
from routelab.report.tables import comparison_table, display_table, efficiency_table, latex_table, metric_by_dataset
from tests.support import REPO
from tests.support.report_runs import (
    TOPK,
    aggregate,
    write_plot_index,
    write_runs,
)

SCRIPTS = REPO / "workflow" / "scripts"






















def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_comparison_table_lists_params_primary_metrics_with_cis_and_routing_stats(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    intervals = pd.DataFrame({"routing": ["topk8"], "dataset": ["wiki"], "metric": ["perplexity"],
                              "low": [2.9], "high": [3.1]})
    table = comparison_table(runs, intervals)
    assert list(table.columns) == ["routing", "dataset", "method", "params", "acc", "acc_ci_low", "acc_ci_high",
                                   "perplexity", "perplexity_ci_low", "perplexity_ci_high", "experts_mean",
                                   "experts_std", "ceiling_hit_rate", "floor_hit_rate",
                                   "active_expert_flops_vs_topk", "tokens_per_s", "peak_memory_mb"]
    params = dict(zip(table["routing"], table["params"]))
    assert params["topk8"] == "k=8, weights=model"
    assert params["bh_a0.05_k8"] == "alpha=0.05, min_k=1, max_k=8, temperature=1, weights=model"
    wiki = table[table["dataset"] == "wiki"].set_index("routing")
    assert wiki["perplexity"].notna().all() and wiki["acc"].isna().all()
    assert wiki.loc["topk8", ["perplexity_ci_low", "perplexity_ci_high"]].tolist() == [2.9, 3.1]
    assert wiki["perplexity_ci_low"].isna().sum() == 2
    assert wiki.loc["bh_a0.2_k4", "peak_memory_mb"] == 502.0  # no GPU: process memory


def test_display_and_latex_tables_show_quality_with_its_interval(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    intervals = pd.DataFrame({"routing": ["topk8"], "dataset": ["wiki"], "metric": ["perplexity"],
                              "low": [2.9], "high": [3.1]})
    display = display_table(comparison_table(runs, intervals), metric_by_dataset(runs))
    topk = display[(display["routing"] == "topk8") & (display["dataset"] == "wiki")].iloc[0]
    assert topk["quality [CI]"] == "3 [2.9, 3.1]" and topk["metric"] == "perplexity (↓)"
    latex = latex_table(display, "caption")
    assert "\\toprule" in latex and "\\midrule" in latex and "\\bottomrule" in latex
    assert "bh\\_a0.05\\_k8" in latex and "3 [2.9, 3.1]" in latex
    assert latex.count("\\\\") == len(display) + 1  # header + one line per run


def test_two_workers_write_the_same_report_byte_for_byte(tmp_path):
    """A forked child draws half the figures: every file, the page included, equals one process's."""
    tables = aggregate(tmp_path / "results" / "exp")
    plots_root = tmp_path / "results" / "exp" / "plots"
    write_plot_index(plots_root)
    outs = [tmp_path / "results" / "exp" / f"report{workers}" for workers in (1, 2)]
    for workers, out_dir in zip((1, 2), outs):
        write_report(tables["runs"], out_dir, experiment="exp", baseline="topk8", plots_root=plots_root,
                     options=ReportOptions(repetitions=50), workers=workers,
                     **{name: table for name, table in tables.items() if name != "runs"})
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".png"]) >= 15
    for name in files:
        # the page links the per-run plots by a path relative to the report directory: the same for both
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_write_report_writes_tables_statistics_figures_and_html(tmp_path):
    tables = aggregate(tmp_path / "results" / "exp")
    plots_root = tmp_path / "results" / "exp" / "plots"
    write_plot_index(plots_root)
    out_dir = tmp_path / "results" / "exp" / "report"
    report = write_report(tables.pop("runs"), out_dir, experiment="exp <1>", baseline="topk8",
                          plots_root=plots_root, options=ReportOptions(repetitions=200), **tables)

    assert report == out_dir / "report.html"
    comparison = pd.read_csv(out_dir / "comparison.csv")
    assert comparison["routing"].nunique() == 3
    wiki = comparison[comparison["dataset"] == "wiki"].set_index("routing")
    # every document of the i-th routing has log-likelihood -(1 + 0.05 i) per token: a zero-width CI
    for i, routing in enumerate(["topk8", "bh_a0.05_k8", "bh_a0.2_k4"]):
        assert wiki.loc[routing, ["perplexity_ci_low", "perplexity_ci_high"]].tolist() == pytest.approx(
            [np.exp(1 + 0.05 * i)] * 2)
    assert (out_dir / "comparison.md").read_text().startswith("| routing")
    assert "\\toprule" in (out_dir / "comparison.tex").read_text()
    for name in ("quality_ci.csv", "entropy_correlation.csv", "rliable_intervals.csv", "improvement.csv",
                 "performance_profiles.csv"):
        assert len(pd.read_csv(out_dir / name)) > 0, name
    improvement = pd.read_csv(out_dir / "improvement.csv").set_index("routing")
    # every document is worse than the baseline under both BH configs (document_scores)
    assert improvement["probability"].tolist() == [0.0, 0.0]

    text = report.read_text()
    assert "exp &lt;1&gt;" in text and "exp <1>" not in text
    anchors = ["methods", "comparison", *(figure.anchor for figure in REPORT_FIGURES), "per-run-figures"]
    assert {"router-diagnostics", "vocabulary-specialisation", "baseline-agreement", "k-by-frequency"} <= set(anchors)
    for anchor in anchors:
        assert f'href="#{anchor}"' in text and f'id="{anchor}"' in text, anchor
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == len(REPORT_FIGURES) and text.count("<figcaption>") == len(REPORT_FIGURES)
    for image in images:
        assert not os.path.isabs(image) and (out_dir / image).read_bytes()[:4] == b"\x89PNG"
    assert "Skipped" not in text

    links = [link for link in re.findall(r'href="([^"#]+)"', text) if not link.startswith("comparison.")]
    assert links == ["../plots/bh_a0.05_k8/wiki/experts_histogram.png", "../plots/bh_a0.05_k8/wiki/bh_decisions.png",
                     "../plots/topk8/wiki/expert_heatmap.png", "../plots/topk8/wiki/zz_extra.png"]
    assert ">BH step-up</a>" in text and "pvalue_distribution" not in text
    assert text.count("no figures found") == 4


def test_report_without_bh_runs_or_scores_says_what_it_skipped(tmp_path):
    runs = collect_runs(write_runs(tmp_path, routings=(TOPK,)))
    report = write_report(runs, tmp_path / "report", "exp", "topk8", tmp_path / "plots")
    text = report.read_text()
    assert (tmp_path / "report" / "figures" / "experts_vs_alpha.png").exists()
    assert "Skipped: no BH runs in this experiment." in text
    assert "Skipped: no per-document scores in the aggregate" in text
    assert text.count("<figcaption>") == 3  # quality vs experts / FLOPs and efficiency need no extra tables


def test_report_rejects_unknown_baseline(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    with pytest.raises(ValueError, match="'topk2'.*bh_a0.05_k8"):
        write_report(runs, tmp_path / "report", "exp", "topk2", tmp_path / "plots")
    assert not (tmp_path / "report").exists()


def test_stage_scripts_chain_from_run_dirs_to_report(tmp_path):
    exp = tmp_path / "results" / "exp"
    run_dirs = write_runs(exp)
    run_script("aggregate.py", "--runs", *run_dirs, "--baseline", "topk8", "--layer", "0",
               "--out-dir", exp / "aggregate")
    run_script("aggregate.py", "--runs", *run_dirs, "--baseline", "topk8", "--layer", "None",
               "--out-dir", exp / "aggregate-middle")
    assert (pd.read_parquet(exp / "aggregate-middle" / "coactivation.parquet")["layer"] == 1).all()
    assert len(pd.read_parquet(exp / "aggregate" / "runs.parquet")) == 6
    assert len(pd.read_csv(exp / "aggregate" / "layers.csv")) == 12
    assert len(pd.read_parquet(exp / "aggregate" / "scores.parquet")) == 72
    assert len(pd.read_parquet(exp / "aggregate" / "expert_counts.parquet")) == 48
    assert (pd.read_parquet(exp / "aggregate" / "coactivation.parquet")["layer"] == 0).all()
    for name in ANALYSIS_TABLES:  # every run's layers; the explorer: 2 documents x 3 tokens x 2 layers per run
        assert len(pd.read_parquet(exp / "aggregate" / f"{name}.parquet")) > 0, name
    assert len(pd.read_parquet(exp / "aggregate" / "explorer.parquet")) == 6 * 2 * 3 * 2
    result = run_script("report.py", "--runs", exp / "aggregate" / "runs.parquet", "--plots-root",
                        exp / "plots", "--experiment", "exp", "--baseline", "topk8", "--repetitions", "100",
                        "--confidence", "0.9", "--seed", "3", "--layer", "None", "--out-dir", exp / "report")
    assert result.stdout.strip() == str((exp / "report" / "report.html").resolve())
    assert "INFO report:" in result.stderr
    assert "layer 0, all datasets" not in result.stderr  # figure titles are not logged
    assert pd.read_csv(exp / "report" / "quality_ci.csv")["low"].notna().all()


@pytest.mark.parametrize("name", ["aggregate.py", "report.py"])
def test_stage_scripts_explain_themselves(name):
    assert "--out-dir" in run_script(name, "--help").stdout


def test_efficiency_table_averages_over_datasets_and_orients_quality(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    table, axes = efficiency_table(runs, "topk8", metric_by_dataset(runs))
    assert [column for column, _ in axes] == ["active_expert_flops_per_token", "peak_memory_mb",
                                              "ms_per_1k_tokens", "quality_vs_baseline"]
    row = table.set_index("routing").loc["bh_a0.05_k8"]  # index 1: perplexity 3.1 and acc 3.1 vs 3.0
    assert row["quality_vs_baseline"] == pytest.approx((3.0 / 3.1 + 3.1 / 3.0) / 2)
    assert row["ms_per_1k_tokens"] == pytest.approx(1e6 / 140) and row["peak_memory_mb"] == 501.0
    assert table.set_index("routing").loc["topk8", "quality_vs_baseline"] == pytest.approx(1.0)
    runs.loc[(runs["routing"] == "topk8") & (runs["dataset"] == "lambada"), "acc"] = 0.0
    table, _ = efficiency_table(runs, "topk8", metric_by_dataset(runs))  # no ratio to a zero accuracy
    assert table.set_index("routing").loc["bh_a0.05_k8", "quality_vs_baseline"] == pytest.approx(3.0 / 3.1)


def test_config_schema_fills_report_defaults_and_rejects_a_missing_layer(tmp_path):
    import yaml

    from routelab.config import ConfigError, load_config, section_defaults

    assert section_defaults("report") == {"baseline": None, "bootstrap_repetitions": 2000, "confidence": 0.95,
                                          "seed": 0, "layer": None, "tolerances": [0.005, 0.01, 0.02, 0.05],
                                          "explorer_tokens": 128}
    repo = REPO
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    config["report"]["layer"] = 9
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"report.layer: 9 does not exist; the demo model has layers 0..3"):
        load_config(path, base_dir=repo)
    config["report"]["bootstrap_repetitions"] = 10
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="bootstrap_repetitions"):
        load_config(path, base_dir=repo)
