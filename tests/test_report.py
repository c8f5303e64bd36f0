"""Run directories become tidy tables, and tables become the comparison report."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from routelab.aggregate import collect_layers, collect_runs
from routelab.io import write_json
from routelab.report import comparison_table, write_report

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
            "k_histogram": k_histogram, "expert_counts": [[50, 30, 20, 60], [40, 40, 10, 30]]}


def metrics(routing: str, dataset: str, task: str, quality: float) -> dict:
    task_metrics = ({"acc": quality, "cloze_perplexity": 4.1} if task == "cloze" else
                    {"word_perplexity": 8.1, "byte_perplexity": 1.4, "bits_per_byte": 0.5})
    return {"routing": routing, "dataset": dataset, "task": task, "documents": 10, "tokens": 300,
            "nll_per_token": 1.2, "perplexity": quality if task == "perplexity" else 5.0, **task_metrics,
            "wall_time_s": 2.0, "tokens_per_s": 150.0, "device": "cpu"}


def write_runs(root: Path, routings=(TOPK, BH, BH_LOOSE),
               datasets=(("wiki", "perplexity"), ("lambada", "cloze"))) -> list[Path]:
    """Run directories root/runs/{routing}/{dataset} with summary.json and metrics.json."""
    run_dirs = []
    for index, (routing, method, params, min_k, max_k) in enumerate(routings):
        for dataset, task in datasets:
            run_dir = root / "runs" / routing / dataset
            write_json(run_dir / "summary.json", summary(routing, dataset, method, params, min_k, max_k))
            write_json(run_dir / "metrics.json", metrics(routing, dataset, task, 3.0 + index / 10))
            run_dirs.append(run_dir)
    return run_dirs[::-1]  # not in sorted order


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


def test_comparison_table_lists_params_primary_metrics_and_routing_stats(tmp_path):
    table = comparison_table(collect_runs(write_runs(tmp_path)))
    assert list(table.columns) == ["routing", "dataset", "method", "params", "acc", "perplexity",
                                   "experts_mean", "experts_std", "ceiling_hit_rate", "floor_hit_rate",
                                   "tokens_per_s"]
    params = dict(zip(table["routing"], table["params"]))
    assert params["topk8"] == "k=8, weights=model"
    assert params["bh_a0.05_k8"] == "alpha=0.05, min_k=1, max_k=8, temperature=1, weights=model"
    wiki = table[table["dataset"] == "wiki"]
    assert wiki["perplexity"].notna().all() and wiki["acc"].isna().all()


def test_write_report_writes_tables_figures_and_self_contained_html(tmp_path):
    runs = collect_runs(write_runs(tmp_path / "results" / "exp"))
    plots_root = tmp_path / "results" / "exp" / "plots"
    out_dir = tmp_path / "results" / "exp" / "report"
    report = write_report(runs, out_dir, experiment="exp <1>", baseline="topk8", plots_root=plots_root)

    assert report == out_dir / "report.html"
    assert pd.read_csv(out_dir / "comparison.csv")["routing"].nunique() == 3
    assert (out_dir / "comparison.md").read_text().startswith("| routing")
    for name in ("experts_vs_alpha.png", "quality_vs_experts.png"):
        assert (out_dir / "figures" / name).read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert "exp &lt;1&gt;" in text and "exp <1>" not in text
    for anchor in ("comparison", "experts-vs-alpha", "quality-vs-experts", "per-run-figures"):
        assert f'href="#{anchor}"' in text and f'id="{anchor}"' in text
    assert "<table" in text and "bh_a0.2_k4" in text
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', text)) == 2
    assert "<figcaption>" in text
    links = re.findall(r'href="([^"#]+)"', text)
    assert len(links) == 12
    for link in links:
        assert not os.path.isabs(link)
        assert (out_dir / link).resolve().parent.parent.parent == plots_root.resolve()
    assert "../plots/bh_a0.05_k8/wiki/experts_histogram.png" in links


def test_report_without_bh_runs_writes_placeholder_and_says_so(tmp_path):
    runs = collect_runs(write_runs(tmp_path, routings=(TOPK,)))
    report = write_report(runs, tmp_path / "report", "exp", "topk8", tmp_path / "plots")
    text = report.read_text()
    assert (tmp_path / "report" / "figures" / "experts_vs_alpha.png").exists()
    assert "no BH runs" in text
    assert text.count("data:image/png;base64,") == 1


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
    for run_dir in run_dirs[:1]:
        plot_dir = exp / "plots" / run_dir.relative_to(exp / "runs")
        run_script("plot_run.py", "--run-dir", run_dir, "--out-dir", plot_dir)
        assert {p.name for p in plot_dir.iterdir()} == {"experts_histogram.png", "expert_heatmap.png"}
    run_script("aggregate.py", "--runs", *run_dirs, "--out-dir", exp / "aggregate")
    assert len(pd.read_parquet(exp / "aggregate" / "runs.parquet")) == 6
    assert len(pd.read_csv(exp / "aggregate" / "layers.csv")) == 12
    result = run_script("report.py", "--runs", exp / "aggregate" / "runs.parquet", "--plots-root",
                        exp / "plots", "--experiment", "exp", "--baseline", "topk8", "--out-dir",
                        exp / "report")
    assert result.stdout.strip() == str((exp / "report" / "report.html").resolve())
    assert "INFO report:" in result.stderr


@pytest.mark.parametrize("name", ["plot_run.py", "aggregate.py", "report.py"])
def test_stage_scripts_explain_themselves(name):
    assert "--out-dir" in run_script(name, "--help").stdout
