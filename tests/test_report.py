"""Run directories become tidy tables, and tables become the comparison report."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pyarrow as pa

from routelab.aggregate import (coactivation_counts, collect_coactivation, collect_expert_counts, collect_layers,
                                collect_runs, collect_scores)
from routelab.io import write_json, write_parquet
from routelab.report import (ReportOptions, comparison_table, display_table, efficiency_table, latex_table,
                             metric_by_dataset, write_report)

SCRIPTS = Path(__file__).resolve().parents[1] / "workflow" / "scripts"
TOPK = ("topk8", "topk", {"k": 8, "weights": "model"}, 8, 8)
BH = ("bh_a0.05_k8", "bh", {"alpha": 0.05, "min_k": 1, "max_k": 8, "temperature": 1.0, "weights": "model"}, 1, 8)
BH_LOOSE = ("bh_a0.2_k4", "bh", {"alpha": 0.2, "min_k": 2, "max_k": 4, "temperature": 1.0, "weights": "model"}, 2, 4)


def summary(routing: str, dataset: str, method: str, params: dict, min_k: int, max_k: int) -> dict:
    """A summary.json in the route stage's format: 2 layers, 4 experts."""
    k_per_layer = [{min_k: 60, max_k: 40}, {min_k: 80, max_k: 20}] if method == "bh" else [{8: 100}, {8: 100}]
    per_layer = []
    for layer, hist in enumerate(k_per_layer):
        ks, counts = np.array(list(hist)), np.array(list(hist.values()))
        mean = float((ks * counts).sum() / counts.sum())
        per_layer.append({"layer": layer, "decisions": 100, "experts_mean": mean, "experts_std": 1.0,
                          "experts_median": float(ks[0]), "experts_min": int(ks.min()),
                          "experts_max": int(ks.max()), "ceiling_hit_rate": float(hist.get(max_k, 0)),
                          "floor_hit_rate": float(hist.get(min_k, 0))})
    k_histogram = {}
    for hist in k_per_layer:
        for k, count in hist.items():
            k_histogram[str(k)] = k_histogram.get(str(k), 0) + count
    experts_mean = float(np.mean([layer["experts_mean"] for layer in per_layer]))
    is_bh = method == "bh"
    return {"routing": routing, "dataset": dataset, "method": method, "params": params,
            "num_layers": 2, "num_experts": 4, "model_top_k": 8, "total_decisions": 200,
            "experts_mean": experts_mean, "experts_std": 1.0, "experts_median": float(min_k),
            "experts_min": min_k, "experts_max": max_k, "min_k": min_k, "max_k": max_k,
            "ceiling_hit_rate": 30.0 if is_bh else 100.0, "floor_hit_rate": 70.0 if is_bh else 100.0,
            "pvalue_mean": 0.4 if is_bh else None, "pvalue_std": 0.3 if is_bh else None,
            "selected_pvalue_mean": 0.001 if is_bh else None, "per_layer": per_layer,
            "k_histogram": k_histogram, "expert_counts": [[50, 30, 20, 60], [40, 40, 10, 30]],
            "active_expert_flops_per_token": 1000.0 * experts_mean, "active_expert_flops_vs_topk": experts_mean / 8}


def metrics(routing: str, dataset: str, task: str, quality: float) -> dict:
    task_metrics = ({"acc": quality, "cloze_perplexity": 4.1} if task == "cloze" else
                    {"word_perplexity": 8.1, "byte_perplexity": 1.4, "bits_per_byte": 0.5})
    return {"routing": routing, "dataset": dataset, "task": task, "documents": 10, "tokens": 300,
            "nll_per_token": 1.2, "perplexity": quality if task == "perplexity" else 5.0, **task_metrics,
            "wall_time_s": 2.0, "tokens_per_s": 150.0, "device": "cpu"}


def routing_log(method: str, doc_ids: list[int]) -> pd.DataFrame:
    """A routing.parquet for 2 layers x 4 experts: each document has 3 tokens; layer 1 routes token 0
    to experts [0, 1], token 1 to [1, 2] (or [1] for BH) and token 2 to [0, 1, 3] (or [3])."""
    rows = []
    layer1 = ([[0, 1], [1, 2], [0, 1, 3]] if method != "bh" else [[0, 1], [1], [3]])
    for doc in doc_ids:
        for position, experts in enumerate(layer1):
            for layer, chosen in ((0, [position % 4]), (1, experts)):
                rows.append({"window_id": doc, "doc_id": doc, "position": position, "token_id": 5 + position,
                             "layer": layer, "k": len(chosen), "experts": chosen,
                             "weights": [1.0 / len(chosen)] * len(chosen)})
    table = pd.DataFrame(rows)
    schema = pa.schema([("window_id", pa.int32()), ("doc_id", pa.int32()), ("position", pa.int32()),
                        ("token_id", pa.int32()), ("layer", pa.int16()), ("k", pa.int16()),
                        ("experts", pa.list_(pa.int16())), ("weights", pa.list_(pa.float32()))])
    return pa.Table.from_pandas(table, schema=schema, preserve_index=False)


def document_scores(index: int, num_docs: int = 12) -> pd.DataFrame:
    """Per-document scores: the index-th routing loses 0.05 nats per token on every document."""
    tokens = np.arange(num_docs) + 10
    return pd.DataFrame({"doc_id": np.arange(num_docs), "loglik": -tokens * (1.0 + 0.05 * index),
                         "tokens": tokens, "correct": (np.arange(num_docs) + index) % 3 == 0,
                         "words": tokens, "bytes": 3 * tokens})


def write_runs(root: Path, routings=(TOPK, BH, BH_LOOSE),
               datasets=(("wiki", "perplexity"), ("lambada", "cloze"))) -> list[Path]:
    """Run directories root/runs/{routing}/{dataset} with summary.json, metrics.json, system.json,
    scores.parquet and routing.parquet."""
    run_dirs = []
    for index, (routing, method, params, min_k, max_k) in enumerate(routings):
        for dataset, task in datasets:
            run_dir = root / "runs" / routing / dataset
            write_json(run_dir / "summary.json", summary(routing, dataset, method, params, min_k, max_k))
            write_json(run_dir / "metrics.json", metrics(routing, dataset, task, 3.0 + index / 10))
            write_json(run_dir / "system.json", {"routing": routing, "dataset": dataset, "wall_time_s": 2.0 + index,
                                                 "tokens_per_s": 150.0 - 10 * index, "peak_rss_mb": 500.0 + index,
                                                 "peak_cuda_mb": None, "device": "cpu"})
            write_parquet(run_dir / "scores.parquet", document_scores(index))
            write_parquet(run_dir / "routing.parquet", routing_log(method, [0, 1]))
            run_dirs.append(run_dir)
    return run_dirs[::-1]  # not in sorted order


def aggregate(root: Path) -> dict[str, pd.DataFrame]:
    run_dirs = write_runs(root)
    return {"runs": collect_runs(run_dirs), "scores": collect_scores(run_dirs),
            "expert_counts": collect_expert_counts(run_dirs), "coactivation": collect_coactivation(run_dirs)}


def test_collect_runs_gives_one_flat_row_per_run(tmp_path):
    runs = collect_runs(write_runs(tmp_path))
    assert len(runs) == 6
    assert list(runs.columns[:13]) == ["routing", "dataset", "method", "k", "alpha", "min_k", "max_k",
                                       "temperature", "weights", "p", "alpha0", "null_model", "task"]
    assert list(zip(runs["routing"], runs["dataset"])) == sorted(zip(runs["routing"], runs["dataset"]))
    topk = runs[runs["routing"] == "topk8"].iloc[0]
    assert topk["k"] == 8 and pd.isna(topk["alpha"]) and pd.isna(topk["min_k"]) and pd.isna(topk["max_k"])
    bh = runs[(runs["routing"] == "bh_a0.2_k4") & (runs["dataset"] == "lambada")].iloc[0]
    assert (bh["alpha"], bh["min_k"], bh["max_k"], bh["task"]) == (0.2, 2, 4, "cloze")
    assert bh["acc"] == pytest.approx(3.2) and bh["ceiling_hit_rate"] == 30.0
    assert pd.isna(runs[runs["dataset"] == "lambada"]["bits_per_byte"]).all()
    assert {"tokens_per_s", "pvalue_mean", "total_decisions", "num_experts"} <= set(runs.columns)
    assert not {"per_layer", "k_histogram", "expert_counts", "params"} & set(runs.columns)


def test_collect_runs_names_the_missing_file(tmp_path):
    run_dirs = write_runs(tmp_path)
    (run_dirs[0] / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(run_dirs[0] / "metrics.json"))):
        collect_runs(run_dirs)
    with pytest.raises(ValueError, match="run_dirs is empty"):
        collect_runs([])


def test_collect_layers_gives_one_row_per_run_and_layer(tmp_path):
    layers = collect_layers(write_runs(tmp_path))
    assert len(layers) == 12
    assert list(layers.columns[:4]) == ["routing", "dataset", "method", "layer"]
    bh = layers[(layers["routing"] == "bh_a0.05_k8") & (layers["dataset"] == "wiki")]
    assert bh["layer"].tolist() == [0, 1]
    assert bh["experts_mean"].tolist() == pytest.approx([0.6 + 0.4 * 8, 0.8 + 0.2 * 8])
    assert bh["ceiling_hit_rate"].tolist() == [40.0, 20.0]


def test_collect_scores_gathers_every_runs_documents(tmp_path):
    scores = collect_scores(write_runs(tmp_path))
    assert len(scores) == 6 * 12
    assert list(scores.columns) == ["routing", "dataset", "doc_id", "loglik", "tokens", "correct", "words", "bytes"]
    bh = scores[(scores["routing"] == "bh_a0.05_k8") & (scores["dataset"] == "wiki")]
    assert bh["loglik"].to_numpy() == pytest.approx(document_scores(1)["loglik"].to_numpy())


def test_collect_expert_counts_unrolls_summary_counts(tmp_path):
    counts = collect_expert_counts(write_runs(tmp_path))
    assert len(counts) == 6 * 2 * 4
    run = counts[(counts["routing"] == "topk8") & (counts["dataset"] == "wiki")]
    assert run["count"].tolist() == [50, 30, 20, 60, 40, 40, 10, 30]
    assert run["layer"].tolist() == [0] * 4 + [1] * 4 and (run["decisions"] == 100).all()


def test_coactivation_counts_match_a_hand_count(tmp_path):
    path = tmp_path / "routing.parquet"
    write_parquet(path, routing_log("topk", [0, 1]))
    # layer 1, per document: {0, 1}, {1, 2}, {0, 1, 3}; two documents
    expected = 2 * np.array([[2, 2, 0, 1], [2, 3, 1, 1], [0, 1, 1, 0], [1, 1, 0, 1]])
    assert coactivation_counts(path, layer=1, num_experts=4).tolist() == expected.tolist()
    with pytest.raises(ValueError, match="no routing decisions in layer 7"):
        coactivation_counts(path, layer=7, num_experts=4)


def test_collect_coactivation_uses_the_middle_layer_by_default(tmp_path):
    run_dirs = write_runs(tmp_path)
    table = collect_coactivation(run_dirs)
    assert (table["layer"] == 1).all()  # 2 layers: the middle one is 2 // 2
    bh = table[(table["routing"] == "bh_a0.05_k8") & (table["dataset"] == "wiki")]
    # BH layer 1 per document: {0, 1}, {1}, {3}
    assert sorted(zip(bh["expert"], bh["other"], bh["count"])) == [
        (0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 4), (3, 3, 2)]
    assert (collect_coactivation(run_dirs, layer=0)["layer"] == 0).all()
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        collect_coactivation(run_dirs, layer=5)


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


def write_plot_index(plots_root: Path) -> None:
    """Per-run figures as plot_run leaves them: one run with index.json, one with PNGs only."""
    indexed = plots_root / "bh_a0.05_k8" / "wiki"
    write_json(indexed / "index.json", [
        {"file": "experts_histogram.png", "title": "Experts selected", "drawn": True},
        {"file": "bh_decisions.png", "title": "BH step-up", "drawn": True},
        {"file": "pvalue_distribution.png", "title": "P-values", "drawn": False, "reason": "n/a"}])
    globbed = plots_root / "topk8" / "wiki"
    globbed.mkdir(parents=True)
    for name in ("zz_extra.png", "expert_heatmap.png"):
        (globbed / name).write_bytes(b"\x89PNG")


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
    anchors = ["methods", "comparison", "experts-vs-alpha", "quality-vs-experts", "quality-vs-flops",
               "expert-bubbles", "entropy-vs-quality", "rliable-intervals", "probability-of-improvement",
               "performance-profiles", "efficiency", "domain-specialisation", "coactivation", "per-run-figures"]
    for anchor in anchors:
        assert f'href="#{anchor}"' in text and f'id="{anchor}"' in text, anchor
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 11 and text.count("<figcaption>") == 11
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


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result


def test_stage_scripts_chain_from_run_dirs_to_report(tmp_path):
    exp = tmp_path / "results" / "exp"
    run_dirs = write_runs(exp)
    run_script("aggregate.py", "--runs", *run_dirs, "--layer", "0", "--out-dir", exp / "aggregate")
    run_script("aggregate.py", "--runs", *run_dirs, "--layer", "None", "--out-dir", exp / "aggregate-middle")
    assert (pd.read_parquet(exp / "aggregate-middle" / "coactivation.parquet")["layer"] == 1).all()
    assert len(pd.read_parquet(exp / "aggregate" / "runs.parquet")) == 6
    assert len(pd.read_csv(exp / "aggregate" / "layers.csv")) == 12
    assert len(pd.read_parquet(exp / "aggregate" / "scores.parquet")) == 72
    assert len(pd.read_parquet(exp / "aggregate" / "expert_counts.parquet")) == 48
    assert (pd.read_parquet(exp / "aggregate" / "coactivation.parquet")["layer"] == 0).all()
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
                                          "seed": 0, "layer": None}
    repo = Path(__file__).resolve().parents[1]
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
