"""End to end with lm-eval tasks: a multiple-choice and a generative demo task run through the pipeline
beside a text dataset; the teacher-forced rule skips the generative task; the report compares each task
on its own metric."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.test_pipeline import REPO, run_pipeline, snakemake

pytestmark = pytest.mark.pipeline

CONFIG = REPO / "tests" / "support" / "pipeline_tasks_config.yaml"
RUNS = {"topk4": ["grammar", "choice", "brackets"], "topp": ["grammar", "choice", "brackets"],
        "seq": ["grammar", "choice"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("pipeline_tasks"), CONFIG)


def run_dir(workdir, routing, dataset):
    return workdir / "results" / "tasks" / "runs" / routing / dataset


def test_every_routing_config_runs_each_task_but_seqtopk_skips_generation(workdir):
    for routing, datasets in RUNS.items():
        for dataset in datasets:
            for name in ("metrics.json", "summary.json", "routing.parquet", "decisions.parquet", "scores.parquet",
                         "system.json", "provenance.json"):
                assert (run_dir(workdir, routing, dataset) / name).is_file(), (routing, dataset, name)
    assert not run_dir(workdir, "seq", "brackets").exists()
    assert not (workdir / "results" / "tasks" / "plots" / "seq" / "brackets").exists()
    assert not (workdir / "resources").exists()  # the demo tasks build their documents: nothing to download


def test_task_runs_hold_lm_eval_metrics_and_per_sample_scores(workdir):
    for routing in RUNS:
        metrics = json.loads((run_dir(workdir, routing, "choice") / "metrics.json").read_text())
        assert metrics["primary_metric"] == "acc" and metrics["primary_higher_is_better"] is True
        assert metrics["acc"] == metrics["lm_eval"]["results"]["demo_cloze_choice"]["acc,none"]
        scores = pd.read_parquet(run_dir(workdir, routing, "choice") / "scores.parquet")
        assert scores["doc_id"].tolist() == list(range(5))
        assert scores["acc"].mean() == pytest.approx(metrics["acc"])
    generated = json.loads((run_dir(workdir, "topp", "brackets") / "metrics.json").read_text())
    assert generated["primary_metric"] == "exact_match"


def test_generation_records_decode_steps_and_their_throughput(workdir):
    rows = pq.read_table(run_dir(workdir, "topp", "brackets") / "routing.parquet").to_pandas()
    phases = rows["phase"].astype(str).value_counts()
    assert phases["prefill"] > 0 and phases["decode"] > 0
    system = json.loads((run_dir(workdir, "topp", "brackets") / "system.json").read_text())
    assert system["decode_tokens"] * 2 == phases["decode"]  # two MoE layers
    assert system["decode_tokens_per_s"] > 0 and system["prefill_tokens_per_s"] > 0
    teacher_forced = json.loads((run_dir(workdir, "topp", "choice") / "system.json").read_text())
    assert teacher_forced["decode_tokens"] == 0 and teacher_forced["decode_tokens_per_s"] is None


def test_report_compares_each_task_on_its_metric(workdir):
    comparison = pd.read_csv(workdir / "results" / "tasks" / "report" / "comparison.csv")
    pairs = {(row.routing, row.dataset) for row in comparison.itertuples()}
    assert pairs == {(routing, dataset) for routing, datasets in RUNS.items() for dataset in datasets}
    assert comparison.loc[comparison["dataset"] == "brackets", "exact_match"].notna().all()
    assert comparison.loc[comparison["dataset"] == "choice", "acc_ci_low"].notna().all()
    html = (workdir / "results" / "tasks" / "report" / "report.html").read_text()
    assert "brackets" in html and "choice" in html


def test_rerun_with_nothing_changed_does_nothing(workdir):
    result = snakemake(workdir, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Nothing to be done" in result.stdout + result.stderr
