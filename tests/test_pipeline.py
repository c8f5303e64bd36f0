"""End to end: the whole Snakemake pipeline on a reduced demo config, in a temporary directory.

One pipeline run (about a minute on 2 cores) is shared by the tests of this module; they check the
artifact tree, the report, that a rerun does nothing and that changing one alpha reruns exactly that
config's jobs plus aggregation and report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from routelab.catalogue import REPORT_FIGURES
from tests.support import faults

pytestmark = pytest.mark.pipeline

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).parent / "support" / "pipeline_config.yaml"
RUNS = ["topk4", "bh_main", "bh_a0.5"]
DATASETS = ["arithmetic", "cloze"]
PER_RUN_FIGURES = ["experts_histogram.png", "expert_heatmap.png", "pvalue_distribution.png", "logit_vs_pvalue.png",
                   "bh_decisions.png", "bh_pass_rate.png", "routing_sequence.png", "expert_utilisation.png",
                   "token_rarity.png", "layer_experts.png"]
PVALUE_FIGURES = {"pvalue_distribution.png", "logit_vs_pvalue.png", "bh_decisions.png", "bh_pass_rate.png"}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config.yaml", "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


def planned_jobs(output: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job in a ``snakemake -n`` listing."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not match:
            continue
        wildcards = re.search(r"wildcards: (.*)", block)
        pairs = dict(p.split("=", 1) for p in wildcards.group(1).split(", ")) if wildcards else {}
        jobs.append((match.group(1), pairs))
    return jobs


def run_pipeline(workdir: Path, config: Path) -> Path:
    """Run the pipeline with ``config`` in a checkout of the workflow at ``workdir``, as a user has it (the
    pipeline runs from the repository root); fail the test if it fails."""
    shutil.copy(REPO / "Snakefile", workdir)
    for folder in ("workflow", "config", "profiles", "envs"):
        shutil.copytree(REPO / folder, workdir / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(config, workdir / "config.yaml")
    result = snakemake(workdir)
    if result.returncode != 0:
        pytest.fail(f"pipeline failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    workdir.joinpath("first_run.log").write_text(result.stdout + result.stderr)
    return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return run_pipeline(tmp_path_factory.mktemp("pipeline"), CONFIG)


def test_pipeline_writes_the_artifact_tree(workdir):
    root = workdir / "results" / "mini"
    for dataset in DATASETS:
        for name in ("documents.parquet", "windows.parquet", "calibration.parquet", "info.json"):
            assert (root / "data" / dataset / name).is_file(), name
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_metrics.csv", "train_hparams.json"):
        assert (root / "model" / name).is_file(), name
    assert (root / "calibration" / "kde" / "null.npz").is_file()
    for run in RUNS:
        for dataset in DATASETS:
            run_dir = root / "runs" / run / dataset
            for name in ("metrics.json", "summary.json", "routing.parquet", "scores.parquet", "provenance.json",
                         "decisions.parquet", "system.json"):
                assert (run_dir / name).is_file(), run_dir / name
            plot_dir = root / "plots" / run / dataset
            for name in PER_RUN_FIGURES:
                assert (plot_dir / name).stat().st_size > 1000, plot_dir / name
            index = json.loads((plot_dir / "index.json").read_text())
            assert [entry["file"] for entry in index] == PER_RUN_FIGURES
            not_drawn = {entry["file"] for entry in index if not entry["drawn"]}
            # top-k computes no p-values: its p-value and BH figures say so instead of faking them
            assert not_drawn == (PVALUE_FIGURES if run.startswith("topk") else set()), (run, not_drawn)
    for name in ("runs.csv", "runs.parquet", "layers.csv", "scores.parquet", "expert_counts.parquet",
                 "coactivation.parquet"):
        assert (root / "aggregate" / name).is_file()
    for name in ("comparison.csv", "comparison.md", "comparison.tex", "quality_ci.csv", "rliable_intervals.csv",
                 "report.html", *(f"figures/{figure.file}" for figure in REPORT_FIGURES)):
        assert (root / "report" / name).is_file(), name
    assert not list(root.rglob("*.tmp")), "a temporary file was left behind"
    assert (workdir / "logs" / "mini" / "train_demo_model.log").stat().st_size > 0


def test_training_log_records_every_step(workdir):
    log = pd.read_csv(workdir / "results/mini/model/train_metrics.csv")
    assert list(log["step"]) == list(range(15))
    assert {"loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"} <= set(log.columns)
    assert log["lm_loss"].iloc[-3:].mean() < log["lm_loss"].iloc[:3].mean()  # it learns


def test_runs_record_every_token_and_layer(workdir):
    root = workdir / "results/mini"
    for run in RUNS:
        for dataset in DATASETS:
            run_dir = root / "runs" / run / dataset
            summary = json.loads((run_dir / "summary.json").read_text())
            table = pq.read_table(run_dir / "routing.parquet").to_pandas()
            windows = pd.read_parquet(root / "data" / dataset / "windows.parquet")
            tokens = int(windows["input_ids"].map(len).sum())
            assert len(table) == summary["total_decisions"] == tokens * summary["num_layers"]
            assert (table["experts"].map(len) == table["k"]).all()
            assert table["k"].between(summary["min_k"], summary["max_k"]).all()
            assert summary["experts_mean"] == pytest.approx(table["k"].mean())
            # The sampled detail is every 7th token's full record, consistent with the complete log.
            detail = pq.read_table(run_dir / "decisions.parquet").to_pandas()
            assert len(detail) == -(-tokens // 7) * summary["num_layers"]
            keys = ["window_id", "position", "layer"]
            joined = detail.merge(table, on=keys, suffixes=("", "_full"))
            assert len(joined) == len(detail) and (joined["k"] == joined["k_full"]).all()
            metrics = json.loads((run_dir / "metrics.json").read_text())
            assert metrics["perplexity"] > 1 and metrics["tokens"] > 0
            if dataset == "cloze":
                assert 0 <= metrics["acc"] <= 1


def test_documents_longer_than_the_window_span_several_windows_and_score_every_token_once(workdir):
    data = workdir / "results/mini/data/arithmetic"
    windows, documents = pd.read_parquet(data / "windows.parquet"), pd.read_parquet(data / "documents.parquet")
    per_document = windows.groupby("doc_id").size()
    assert (per_document > 1).any() and set(per_document.index) == set(documents["doc_id"])
    scores = pd.read_parquet(workdir / "results/mini/runs/topk4/arithmetic/scores.parquet")
    scored = windows["labels"].map(lambda labels: int((labels != -100).sum())).groupby(windows["doc_id"]).sum()
    assert scores.set_index("doc_id")["tokens"].equals(scored.rename("tokens"))


def test_topk_with_the_models_k_matches_the_unrouted_model(workdir):
    """The topk4 run (the model's own k) scores exactly what the native model scores."""
    import torch

    from routelab.model.loading import load_model
    from routelab.run.evaluate import document_scores, score_windows

    root = workdir / "results/mini"
    model = load_model(root / "model")
    windows = pd.read_parquet(root / "data/arithmetic/windows.parquet")
    documents = pd.read_parquet(root / "data/arithmetic/documents.parquet")
    with torch.no_grad():
        native = document_scores(score_windows(model, windows, 8, 0, progress=False), documents)
    routed = pd.read_parquet(root / "runs/topk4/arithmetic/scores.parquet")
    assert routed["loglik"].to_numpy() == pytest.approx(native["loglik"].to_numpy(), abs=1e-4)


def test_report_shows_table_and_figures(workdir):
    report = workdir / "results/mini/report"
    html = (report / "report.html").read_text()
    for run in RUNS:
        assert run in html
    assert "<table" in html and "Skipped" not in html  # every cross-run figure is drawn
    for figure in REPORT_FIGURES:
        assert f'<img src="figures/{figure.file}"' in html and f'id="{figure.anchor}"' in html, figure.file
    assert 'href="../plots/bh_main/cloze/experts_histogram.png"' in html  # per-run figures linked
    comparison = pd.read_csv(report / "comparison.csv")
    assert len(comparison) == len(RUNS) * len(DATASETS)
    assert (comparison["perplexity_ci_low"].dropna() <= comparison["perplexity_ci_high"].dropna()).all()
    assert comparison["acc_ci_high"].notna().sum() == len(RUNS)
    assert "\\toprule" in (report / "comparison.tex").read_text()
    improvement = pd.read_csv(report / "improvement.csv")
    assert sorted(improvement["routing"]) == ["bh_a0.5", "bh_main"]  # each against the baseline topk4 only
    assert f"routing report: {report / 'report.html'}" in (workdir / "first_run.log").read_text()


def test_rerun_with_nothing_changed_does_nothing(workdir):
    result = snakemake(workdir, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_after(workdir: Path, change) -> list[tuple[str, dict[str, str]]]:
    """The jobs ``snakemake -n`` plans after ``change(config)`` edits the config (restored afterwards)."""
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    change(config)
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    try:
        result = snakemake(workdir, "-n")
    finally:
        shutil.copy(CONFIG, workdir / "config.yaml")
    assert result.returncode == 0, result.stderr
    return planned_jobs(result.stdout)


def test_changing_one_alpha_reruns_only_that_config(workdir):
    jobs = planned_after(workdir, lambda config: config["routing"][1].update(alpha=0.4))
    counts = Counter(rule for rule, _ in jobs)
    # cloze is sharded (tests/support/pipeline_config.yaml): two route_shard jobs and their gather
    # one plot_run job per routing config draws its runs on every dataset
    assert counts == {"route": 1, "route_shard": 2, "gather_shards": 1, "plot_run": 1, "aggregate": 1, "report": 1,
                      "all": 1}, counts
    rerouted = {(w["routing"], w["dataset"]) for rule, w in jobs if rule in ("route", "route_shard", "gather_shards")}
    assert rerouted == {("bh_main", "arithmetic"), ("bh_main", "cloze")}
    assert [w["routing"] for rule, w in jobs if rule == "plot_run"] == ["bh_main"]
    assert {w["shard"] for rule, w in jobs if rule == "route_shard"} == {"1-of-2", "2-of-2"}


def test_changing_a_report_setting_reruns_only_the_report(workdir):
    jobs = planned_after(workdir, lambda config: config["report"].update(bootstrap_repetitions=500))
    assert Counter(rule for rule, _ in jobs) == {"report": 1, "all": 1}


def test_another_null_model_is_fitted_from_the_saved_logits_without_running_the_model_again(workdir):
    jobs = planned_after(workdir, lambda config: config["routing"][1].update(null_model="empirical"))
    counts = Counter(rule for rule, _ in jobs)
    assert "collect_router_logits" not in counts and "train_demo_model" not in counts
    assert [w["null"] for rule, w in jobs if rule == "calibrate_null"] == ["empirical"]
    assert {w["routing"] for rule, w in jobs if rule in ("route", "route_shard", "gather_shards")} == {"bh_main"}


def test_decisions_export_to_json_logs(workdir, tmp_path):
    run_dir = workdir / "results/mini/runs/bh_main/cloze"
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/export_decisions.py"), "--run-dir",
                             str(run_dir), "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    detailed = json.loads((tmp_path / "decisions_detailed.json").read_text())
    summary = json.loads((tmp_path / "decisions_summary.json").read_text())
    assert detailed["config"]["method"] == "bh" and detailed["entries"]
    assert summary["total_decisions"] == json.loads((run_dir / "summary.json").read_text())["total_decisions"]
    entry = detailed["entries"][0]
    assert entry["bh_results"]["num_selected"] == len(entry["bh_results"]["selected_experts"])


def test_active_expert_flops_follow_the_expert_shapes(workdir):
    """OLMoE experts are gated: 2 x (2*I*H + H*I) FLOPs per token per selected expert."""
    hidden, expert = 32, 16  # tests/support/pipeline_config.yaml
    for run in RUNS:
        summary = json.loads((workdir / f"results/mini/runs/{run}/arithmetic/summary.json").read_text())
        expected = 2 * 3 * hidden * expert * summary["experts_mean"] * summary["num_layers"]
        assert summary["active_expert_flops_per_token"] == pytest.approx(expected)
        assert summary["active_expert_flops_vs_topk"] == pytest.approx(summary["experts_mean"] / 4)
    system = json.loads((workdir / "results/mini/runs/topk4/arithmetic/system.json").read_text())
    assert system["tokens_per_s"] > 0 and system["peak_rss_mb"] > 10 and system["device"] == "cpu"


def route_again(workdir: Path, run_dir: Path, dataset: str | list[str], out: Path | list[Path]) -> None:
    """Run route.py by hand, whole datasets in one process, with the routing spec of ``run_dir``, into ``out``
    (one output directory per dataset)."""
    spec = json.loads((run_dir / "provenance.json").read_text())["routing"]
    datasets, outs = ([dataset], [out]) if isinstance(dataset, str) else (dataset, out)
    result = subprocess.run(
        [sys.executable, "workflow/scripts/route.py", "--model", "results/mini/model", "--data",
         *[f"results/mini/data/{name}" for name in datasets], "--null", "results/mini/calibration/kde/null.npz",
         "--routing", json.dumps(spec), "--batch-size", "8", "--sample-every", "7", "--out", *map(str, outs)],
        cwd=workdir, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def assert_same_run(run_dir: Path, again: Path) -> None:
    for name in ("metrics.json", "summary.json"):
        assert json.loads((again / name).read_text()) == json.loads((run_dir / name).read_text()), name
    for name in ("routing.parquet", "decisions.parquet", "scores.parquet"):
        assert pq.read_table(again / name).equals(pq.read_table(run_dir / name)), name


def test_the_same_run_twice_gives_identical_results(workdir, tmp_path):
    """Determinism on CPU: rerunning one route job reproduces metrics, summary and the routing log."""
    run_dir = workdir / "results/mini/runs/bh_main/arithmetic"
    route_again(workdir, run_dir, "arithmetic", tmp_path)
    assert_same_run(run_dir, tmp_path)
    first, second = (json.loads((d / "provenance.json").read_text()) for d in (run_dir, tmp_path))
    assert first["config_hash"] == second["config_hash"]


def test_one_process_for_several_datasets_gives_each_runs_own_files(workdir, tmp_path):
    """route.py with two --data (as route_datasets runs it): the run after another in the same process equals
    the pipeline's run in a process of its own, byte for byte; the first equals the gathered cloze run."""
    run_dir = workdir / "results/mini/runs/bh_main/arithmetic"
    route_again(workdir, run_dir, ["cloze", "arithmetic"], [tmp_path / "cloze", tmp_path / "arithmetic"])
    assert_same_run(run_dir, tmp_path / "arithmetic")
    gathered = workdir / "results/mini/runs/bh_main/cloze"
    assert pq.read_table(tmp_path / "cloze" / "routing.parquet").column("experts").equals(
        pq.read_table(gathered / "routing.parquet").column("experts"))
    assert json.loads((tmp_path / "cloze" / "metrics.json").read_text())["acc"] == json.loads(
        (gathered / "metrics.json").read_text())["acc"]


def test_switching_to_one_route_job_per_routing_config(workdir):
    """``route_jobs: per_routing``: one route_datasets job per config covers every unsharded dataset (the
    same run files, so only their params differ); the sharded cloze keeps its route_shard jobs."""
    jobs = planned_after(workdir, lambda config: config["evaluation"].update(route_jobs="per_routing"))
    counts = Counter(rule for rule, _ in jobs)
    assert counts == {"route_datasets": 3, "plot_run": 3, "aggregate": 1, "report": 1, "all": 1}, counts
    assert sorted(w["routing"] for rule, w in jobs if rule == "route_datasets") == sorted(RUNS)
    assert all("dataset" not in w for rule, w in jobs if rule == "route_datasets")


# --- sharded, interrupted and retried route jobs (tests/test_shards.py and test_resume.py test the parts) ---

# The interruption test reroutes one config on both datasets: one route job and two route_shard jobs.
KILLED_RUN = "bh_main"


def run_targets() -> list[str]:
    return [f"results/mini/runs/{KILLED_RUN}/{dataset}/metrics.json" for dataset in DATASETS]


def copy_without_runs(workdir: Path, copy: Path) -> Path:
    """The finished pipeline with its run outputs and route logs deleted (model, data and nulls kept)."""
    shutil.copytree(workdir, copy, symlinks=True)
    for folder in ("results/mini/runs", "results/mini/shards", "logs/mini/route"):
        shutil.rmtree(copy / folder, ignore_errors=True)
    return copy


def test_sharded_run_equals_an_unsharded_route(workdir, tmp_path):
    """The gathered two-shard cloze run against route.py on the whole dataset: the same decisions, the same
    counts; floats equal up to float32 rounding of other batch shapes (see tests/test_shards.py)."""
    run_dir = workdir / "results/mini/runs/bh_main/cloze"
    route_again(workdir, run_dir, "cloze", tmp_path)
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert [s["shard"] for s in provenance["shards"]] == ["1-of-2", "2-of-2"]
    for name in ("routing.parquet", "decisions.parquet"):
        whole, gathered = pq.read_table(tmp_path / name).to_pandas(), pq.read_table(run_dir / name).to_pandas()
        for column in ("window_id", "doc_id", "position", "token_id", "layer", "k"):
            assert whole[column].equals(gathered[column]), (name, column)
    whole = pq.read_table(tmp_path / "routing.parquet").to_pandas()
    gathered = pq.read_table(run_dir / "routing.parquet").to_pandas()
    assert whole["experts"].map(list).equals(gathered["experts"].map(list))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key, value in json.loads((tmp_path / "metrics.json").read_text()).items():
        assert metrics[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    summary = json.loads((run_dir / "summary.json").read_text())
    reference = json.loads((tmp_path / "summary.json").read_text())
    for key in ("total_decisions", "experts_mean", "experts_std", "k_histogram", "expert_counts", "top1_counts"):
        assert summary[key] == reference[key], key
    assert summary["router_entropy"] == pytest.approx(reference["router_entropy"], rel=1e-6)
    shards = workdir / "results/mini/shards"
    assert not [p for p in shards.rglob("*") if p.is_file()]  # the shards' parts are temp(): gone once gathered


def test_killed_pipeline_resumes_and_equals_the_uninterrupted_run(workdir, tmp_path):
    """A real interruption: SIGKILL the whole Snakemake process group while route jobs run, rerun."""
    import signal
    import time

    copy = copy_without_runs(workdir, tmp_path / "killed")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config.yaml", "--cores", "2", *run_targets()]
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    root = copy / "results/mini"
    deadline = time.monotonic() + 300

    def saved_part() -> bool:  # a route job has saved part of its work
        try:
            return any(root.glob("**/*.partial/*/chunk-*"))
        except FileNotFoundError:  # a temporary directory renamed into place while the glob walked it
            return False

    while not saved_part():
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no route job started"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # Whatever exists is complete: outputs appear whole or not at all.
    for path in root.glob("runs/*/*/*.parquet"):
        pq.read_table(path)
    for path in root.glob("runs/*/*/*.json"):
        json.loads(path.read_text())

    assert snakemake(copy, "--unlock").returncode == 0  # the killed Snakemake left its lock behind
    result = snakemake(copy, "--rerun-incomplete", *run_targets())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    logs = [p.read_text() for p in (copy / "logs/mini/route").rglob("*.log")]
    assert any("resuming from the checkpoint" in text for text in logs), "no route job resumed"
    for dataset in DATASETS:
        clean, rerun = (d / f"runs/{KILLED_RUN}/{dataset}" for d in (workdir / "results/mini", root))
        for name in ("routing.parquet", "decisions.parquet", "scores.parquet"):
            assert pq.read_table(rerun / name).equals(pq.read_table(clean / name)), (dataset, name)
        for name in ("metrics.json", "summary.json"):
            assert json.loads((rerun / name).read_text()) == json.loads((clean / name).read_text()), (dataset, name)
    assert not list(root.rglob("*.partial")) and not list(root.rglob("*.tmp"))


def test_a_killed_route_process_is_retried_and_equals_the_uninterrupted_run_byte_for_byte(workdir, tmp_path):
    """SIGKILL of one route job's python process alone (as the kernel's OOM killer, a scheduler's preemption
    or `kill -9` sends), Snakemake alive: Snakemake retries, the retry resumes from the checkpoint at the
    same batch size (no out-of-memory evidence), and every output file equals an uninterrupted run's."""
    import signal
    import time

    copy = copy_without_runs(workdir, tmp_path / "killed_alone")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           faults.FAULT_ENV: json.dumps({"kind": "slow", "after_batches": 1, "seconds": 3}),
           "PYTHONPATH": str(faults.SITE)}
    run = f"results/mini/runs/{KILLED_RUN}/arithmetic"
    cmd = [sys.executable, "-m", "snakemake", "--configfile", "config.yaml", "--cores", "1", f"{run}/metrics.json"]
    with open(tmp_path / "snakemake.log", "w") as log:
        process = subprocess.Popen(cmd, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
    partial, deadline = copy / f"{run}.partial", time.monotonic() + 300

    def saved_chunk() -> bool:
        try:
            return any(partial.glob("*/chunk-*")) and (partial / "attempt.json").is_file()
        except FileNotFoundError:  # a temporary file renamed into place while the glob walked past it
            return False

    while not saved_chunk():
        assert process.poll() is None, (tmp_path / "snakemake.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the route job saved no chunk"
        time.sleep(0.01)
    os.kill(json.loads((partial / "attempt.json").read_text())["pid"], signal.SIGKILL)  # the job's python only
    assert process.wait(timeout=600) == 0, (tmp_path / "snakemake.log").read_text()[-5000:]

    clean = workdir / run
    for name in ("metrics.json", "summary.json", "routing.parquet", "decisions.parquet", "scores.parquet",
                 "provenance.json"):
        assert (copy / run / name).read_bytes() == (clean / name).read_bytes(), name
    logs = copy / f"logs/mini/route/{KILLED_RUN}"
    first, retry = (logs / "arithmetic.log.attempt1").read_text(), (logs / "arithmetic.log").read_text()
    assert "attempt 1: batch size 8" in first and (logs / "arithmetic.log.attempt2").read_text() == retry
    assert ("attempt 1 (batch size 8) killed by signal 9 (SIGKILL); no out-of-memory evidence; attempt 2 resumes "
            "with the saved chunks' batch size 8") in retry
    assert "resuming from the checkpoint" in retry and (logs / "arithmetic.log.exit").read_text().strip() == "0"


def test_route_retries_out_of_memory_with_half_the_batch_and_stops_after_other_errors(workdir, tmp_path):
    copy = copy_without_runs(workdir, tmp_path / "retry")
    target = "results/mini/runs/topk4/arithmetic/metrics.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run_with(fault: dict) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "snakemake", "--configfile", "config.yaml", "--cores", "1", target]
        injected = {faults.FAULT_ENV: json.dumps(fault), "PYTHONPATH": str(faults.SITE)}
        return subprocess.run(cmd, cwd=copy, env={**env, **injected}, capture_output=True, text=True, timeout=600)

    # Out of memory at batch size 8: attempt 2 runs with 4 and succeeds.
    result = run_with({"kind": "oom", "after_batches": 1, "min_batch_size": 8})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "attempt=2" in output
    log = copy / "logs/mini/route/topk4/arithmetic.log"
    assert "out of memory at batch size 8" in Path(f"{log}.attempt1").read_text()
    assert ("exit status 75 (out of memory); out of memory: it ran out of memory; attempt 2 runs with batch size 4"
            in log.read_text())
    run_dir = copy / "results/mini/runs/topk4/arithmetic"
    assert json.loads((run_dir / "provenance.json").read_text())["batch_size"] == 4
    clean = json.loads((workdir / "results/mini/runs/topk4/arithmetic/metrics.json").read_text())
    assert json.loads((run_dir / "metrics.json").read_text())["perplexity"] == pytest.approx(clean["perplexity"],
                                                                                               rel=1e-6)

    # Any other error: Snakemake retries, but the retries stop at once and the log path is shown.
    (run_dir / "metrics.json").unlink()
    result = run_with({"kind": "error", "after_batches": 0})
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "logs/mini/route/topk4/arithmetic.log" in output
    last_attempt = (copy / "logs/mini/route/topk4/arithmetic.log").read_text()
    assert "not retrying" in last_attempt and "RuntimeError: injected failure" in last_attempt
    assert "loaded results/mini/model" not in last_attempt  # the retry did not load the model again
