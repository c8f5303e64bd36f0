"""Experiment tracking: the files on disk, and what TensorBoard, MLflow, W&B and Aim read back after an export."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from routelab.tracking import (
    RunLogger,
    TrackingError,
    export_run,
    flatten_params,
    log_routing_run,
    read_run,
    system_snapshot,
)

REPO = Path(__file__).resolve().parents[1]


def write_run(directory, prefix=""):
    """A small run with every kind of record; the values are the reference the tests compare with."""
    with RunLogger(directory, prefix=prefix) as tracker:
        tracker.log_params({"lr": 0.003, "model": {"layers": 4, "experts": 64}, "alphas": [0.1, 0.2]})
        for step in range(3):
            tracker.log(step, loss=2.0 - 0.5 * step, lr=0.001 * (step + 1))
        # experts selected per token in one layer: k = 1 (5 tokens), 2 (3 tokens), 3 (2 tokens)
        tracker.log_histogram("experts_selected/layer_0", [0, 5, 3, 2], step=2)
        tracker.log_final(perplexity=12.5, experts_mean=1.7)
        tracker.log_system(tokens_per_s=1000.0)
        artifact = directory / "routing.parquet"
        artifact.write_bytes(b"x" * 123)
        tracker.log_artifact("routing", artifact)
    return tracker


def test_files_on_disk_hold_every_record(tmp_path):
    write_run(tmp_path, prefix="train_")
    assert json.loads((tmp_path / "train_hparams.json").read_text())["model"] == {"layers": 4, "experts": 64}
    rows = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 2.0, "lr": 0.001}, {"step": 1, "loss": 1.5, "lr": 0.002},
                    {"step": 2, "loss": 1.0, "lr": 0.003}]
    with open(tmp_path / "train_metrics.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [float(r["loss"]) for r in table] == [2.0, 1.5, 1.0] and list(table[0]) == ["step", "loss", "lr"]
    (hist,) = [json.loads(line) for line in (tmp_path / "train_histograms.jsonl").read_text().splitlines()]
    assert hist == {"name": "experts_selected/layer_0", "step": 2, "edges": [-0.5, 0.5, 1.5, 2.5, 3.5],
                    "counts": [0, 5, 3, 2]}
    assert json.loads((tmp_path / "train_final.json").read_text()) == {"perplexity": 12.5, "experts_mean": 1.7}
    system = [json.loads(line) for line in (tmp_path / "train_system.jsonl").read_text().splitlines()]
    assert len(system) == 2  # the explicit snapshot and the one close() adds
    assert system[0]["tokens_per_s"] == 1000.0 and system[0]["peak_rss_mb"] > 10 and system[0]["cpu_s"] > 0
    artifacts = json.loads((tmp_path / "train_artifacts.json").read_text())
    assert artifacts == [{"name": "routing", "path": str(tmp_path / "routing.parquet"), "bytes": 123}]


def test_read_run_round_trips_and_missing_run_is_named(tmp_path):
    write_run(tmp_path)
    run = read_run(tmp_path)
    assert [row["loss"] for row in run["metrics"]] == [2.0, 1.5, 1.0]
    assert run["final"]["perplexity"] == 12.5 and run["histograms"][0]["counts"] == [0, 5, 3, 2]
    with pytest.raises(FileNotFoundError, match="no tracking files with prefix 'nope_'"):
        read_run(tmp_path, prefix="nope_")


def test_bad_metric_and_histogram_are_refused_with_names(tmp_path):
    with RunLogger(tmp_path) as tracker:
        with pytest.raises(TypeError, match="metric 'loss': 'high' is not a number"):
            tracker.log(0, loss="high")
        with pytest.raises(ValueError, match="histogram 'h': edges must increase"):
            tracker.log_histogram("h", [1, 2], edges=[0.0, 1.0])
        tracker.log(1, loss=float("nan"))  # kept as null: a diverged step is still a row
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 1, "loss": None}


def test_values_histogram_matches_numpy(tmp_path):
    values = np.random.default_rng(0).normal(size=500)
    with RunLogger(tmp_path) as tracker:
        tracker.log_values_histogram("logits", values, bins=7)
    (hist,) = read_run(tmp_path)["histograms"]
    counts, edges = np.histogram(values, bins=7)
    assert hist["counts"] == counts.tolist() and np.allclose(hist["edges"], edges)


def test_system_snapshot_reads_this_process():
    snapshot = system_snapshot()
    assert snapshot["rss_mb"] > 10 and snapshot["peak_rss_mb"] >= snapshot["rss_mb"] * 0.5
    assert "wall_s" not in snapshot and snapshot["cuda_peak_mb"] is None or snapshot["cuda_peak_mb"] >= 0


def test_flatten_params():
    assert flatten_params({"a": {"b": 1, "c": {"d": "x"}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": "x", "e": "[1, 2]"}


def test_tensorboard_export_reads_back(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (routelab[tracking])")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from routelab.tracking import TensorBoardExporter

    write_run(tmp_path / "run")
    export_run(tmp_path / "run", [TensorBoardExporter(tmp_path / "tb")])
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("loss")
    assert [(e.step, e.value) for e in loss] == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert events.Scalars("final/perplexity")[0].value == 12.5
    assert events.Scalars("final/perplexity")[0].step == 2  # at the last training step
    assert events.Scalars("system/tokens_per_s")[0].value == 1000.0
    (hist,) = events.Histograms("experts_selected/layer_0")
    assert hist.step == 2
    # 5 tokens at k=1, 3 at k=2, 2 at k=3: num 10, sum 5 + 6 + 6 = 17, sum of squares 5 + 12 + 18 = 35
    assert (hist.histogram_value.num, hist.histogram_value.sum, hist.histogram_value.sum_squares) == (10, 17, 35)
    assert (hist.histogram_value.min, hist.histogram_value.max) == (1, 3)
    assert list(hist.histogram_value.bucket) == [0, 5, 3, 2]
    assert list(hist.histogram_value.bucket_limit) == [0.5, 1.5, 2.5, 3.5]
    tags = events.Tags()
    assert "hparams" in str(tags) and "artifacts/routing" in str(tags)


def test_mlflow_export_reads_back(tmp_path):
    pytest.importorskip("mlflow", reason="MLflow is not installed (routelab[tracking])")
    pytest.importorskip("sqlalchemy", reason="MLflow's SQL store needs SQLAlchemy (routelab[tracking])")
    from mlflow.tracking import MlflowClient

    from routelab.tracking import MlflowExporter

    write_run(tmp_path / "run")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exporter = MlflowExporter(uri, experiment="demo", run_name="route/bh/code", tags={"stage": "route"})
    export_run(tmp_path / "run", [exporter])
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(exporter.run_id)
    assert run.info.run_name == "route/bh/code" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.003", "model.layers": "4", "model.experts": "64", "alphas": "[0.1, 0.2]"}
    history = client.get_metric_history(exporter.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 2.0), (1, 1.5), (2, 1.0)]
    assert run.data.metrics["final/perplexity"] == 12.5
    assert run.data.tags["artifact.routing"] == str(tmp_path / "run" / "routing.parquet")
    assert run.data.tags["stage"] == "route"
    (artifact,) = client.list_artifacts(exporter.run_id, "histograms/experts_selected/layer_0")
    local = client.download_artifacts(exporter.run_id, artifact.path, str(tmp_path / "dl"))
    assert json.loads(open(local).read())["counts"] == [0, 5, 3, 2]
    assert (tmp_path / "mlflow-artifacts").is_dir(), "artifacts belong next to the SQLite store"
    assert math.isclose(client.get_metric_history(exporter.run_id, "system/tokens_per_s")[0].value, 1000.0)


def write_routing_run(run_dir, params=None):
    """A routing run's tracking files as log_routing_run lays them out: per-layer rows at steps 0 and 1, then
    histograms that go back to step 0 (the order a tracker that wants increasing steps must cope with).
    2 layers, max_k 3; layer 0: k = 1 x4, 2 x1; layer 1: k = 3 x5 (10 decisions, mean 2.1)."""
    k_hist = np.array([[0, 4, 1, 0, 0], [0, 0, 0, 5, 0]])
    summary = {"experts_mean": 2.1, "max_k": 3, "total_decisions": 10, "params": {"alpha": 0.1},
               "per_layer": [{"layer": 0, "experts_mean": 1.2, "router_entropy": 1.5, "top1_counts": [1, 2]},
                             {"layer": 1, "experts_mean": 3.0, "router_entropy": None}],
               "expert_counts": [[3, 3], [5, 5]]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text("{}")
    log_routing_run(run_dir / "tracking", params or {"seed": 0}, {"perplexity": 9.5, "routing": "bh"}, summary,
                    {"wall_time_s": 2.0, "device": "cpu"}, k_hist=k_hist,
                    artifacts={"metrics.json": run_dir / "metrics.json", "absent": run_dir / "nope"})
    return run_dir / "tracking"


def test_log_routing_run_lays_out_layers_histograms_and_finals(tmp_path):
    run = read_run(write_routing_run(tmp_path))
    assert run["params"] == {"seed": 0}
    assert run["metrics"] == [{"step": 0, "experts_mean": 1.2, "router_entropy": 1.5},
                              {"step": 1, "experts_mean": 3.0}]
    assert run["final"] == {"perplexity": 9.5, "experts_mean": 2.1, "max_k": 3, "total_decisions": 10}
    hists = {(h["name"], h["step"]): h["counts"] for h in run["histograms"]}
    assert hists == {("experts_selected/layer_0", 0): [0, 4, 1, 0], ("experts_selected/layer_1", 1): [0, 0, 0, 5],
                     ("expert_load/layer_0", 0): [3, 3], ("expert_load/layer_1", 1): [5, 5]}
    assert run["system"][0]["wall_time_s"] == 2.0 and "device" not in run["system"][0]
    assert [a["name"] for a in run["artifacts"]] == ["metrics.json"]  # files that exist only


# --- Weights & Biases: the offline run file read back by W&B's own reader (wandb leet inspect) ---


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of an offline run's .wandb file, as W&B's own reader prints them (one JSON per line)."""
    (log_file,) = run_dir.glob("run-*.wandb")
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log_file)],
                            capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def wandb_run(run_dir: Path) -> dict:
    """The run record, config, history rows by step (W&B's own keys left out), summary and artifacts."""
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    config = {}
    for record in records:
        if record["type"] == "config":
            config.update(record["config"]["update"])
    history = {r["history"]["step"].get("num", 0): {k: v for k, v in r["history"]["item"].items()
                                                    if not k.startswith("_")}
               for r in records if r["type"] == "history"}
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact"]
    return {"run": run, "config": config, "history": history, "summary": summary, "artifacts": artifacts}


def test_wandb_offline_export_reads_back(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (routelab[tracking])")
    from routelab.tracking import WandbExporter

    write_run(tmp_path / "run")
    exporter = WandbExporter(tmp_path / "wb", "routelab", "route/bh/code",
                             tags={"experiment": "demo", "stage": "route", "method": "bh", "config_hash": "f" * 64})
    export_run(tmp_path / "run", [exporter])
    assert exporter.run_dir.parent == tmp_path / "wb" / "wandb" and exporter.run_dir.name.startswith("offline-run-")
    found = wandb_run(exporter.run_dir)
    assert found["run"]["display_name"] == "route/bh/code" and found["run"]["project"] == "routelab"
    assert found["run"]["run_group"] == "demo" and found["run"]["job_type"] == "route"
    assert found["run"]["tags"] == ["experiment:demo", "stage:route", "method:bh"]  # the 76-char hash tag is not
    assert {k: v for k, v in found["config"].items() if k != "_wandb"} == {
        "lr": 0.003, "model": {"layers": 4, "experts": 64}, "alphas": [0.1, 0.2]}
    source = read_run(tmp_path / "run")
    expected = {row["step"]: {k: v for k, v in row.items() if k != "step"} for row in source["metrics"]}
    for row in source["system"]:  # both system snapshots are at the last step; the later one wins
        expected[row["step"]].update({f"system/{k}": v for k, v in row.items() if k != "step" and v is not None})
    expected[2].update({"experts_selected/layer_0._type": "histogram",
                        "experts_selected/layer_0.bins": [-0.5, 0.5, 1.5, 2.5, 3.5],
                        "experts_selected/layer_0.values": [0, 5, 3, 2]})
    assert found["history"] == expected  # JSON numbers: exact
    assert found["summary"]["final/perplexity"] == 12.5 and found["summary"]["final/experts_mean"] == 1.7
    (artifact,) = found["artifacts"]
    assert artifact["type"] == "run-files" and artifact["name"] == "route-bh-code-files"
    assert [(c["path"], c["ref"], int(c["size"])) for c in artifact["manifest"]["contents"]] == [
        ("routing", (tmp_path / "run" / "routing.parquet").as_uri(), 123)]


def test_wandb_export_logs_a_routing_runs_revisited_steps_in_order(tmp_path):
    """W&B drops a row whose step is below one already logged; the routing layout revisits layer 0."""
    pytest.importorskip("wandb", reason="wandb is not installed (routelab[tracking])")
    from routelab.tracking import WandbExporter

    exporter = WandbExporter(tmp_path / "wb", "routelab", "route/bh/code")
    export_run(write_routing_run(tmp_path / "run"), [exporter])
    history = wandb_run(exporter.run_dir)["history"]
    assert sorted(history) == [0, 1]
    assert history[0]["experts_mean"] == 1.2 and history[0]["router_entropy"] == 1.5
    assert history[0]["experts_selected/layer_0.values"] == [0, 4, 1, 0]
    assert history[0]["expert_load/layer_0.values"] == [3, 3]
    assert history[1]["experts_selected/layer_1.values"] == [0, 0, 0, 5] and "router_entropy" not in history[1]
    assert history[1]["system/wall_time_s"] == 2.0  # the run's system numbers, at the last layer
    summary = wandb_run(exporter.run_dir)["summary"]
    assert summary["final/perplexity"] == 9.5 and summary["final/experts_mean"] == 2.1
    assert summary["experts_mean"] == 3.0  # W&B's own summary of the history: the last layer's value


def test_wandb_mode_is_checked():
    pytest.importorskip("wandb", reason="wandb is not installed (routelab[tracking])")
    from routelab.tracking import WandbExporter

    with pytest.raises(TrackingError, match="tracking.wandb.mode: 'cloud' is not valid; use one of offline, online"):
        WandbExporter("unused", "routelab", "x", mode="cloud")


# --- Aim: the repository read back with Repo.query_metrics, as an aim + rliable notebook does ---


def test_aim_export_reads_back_with_the_notebooks_queries(tmp_path):
    pytest.importorskip("aim", reason="Aim is not installed (routelab[tracking])")
    import aim
    from aim.sdk.types import QueryReportMode

    from routelab.tracking import AimExporter

    write_run(tmp_path / "run")
    for dataset in ("code", "grammar"):
        exporter = AimExporter(tmp_path / "aim", "demo", f"route/bh/{dataset}",
                               tags={"experiment": "demo", "method": "bh", "dataset": dataset})
        export_run(tmp_path / "run", [exporter])
    repo = aim.Repo(str(tmp_path / "aim"))
    query = 'metric.name in ["loss", "final/perplexity", "system/tokens_per_s"]'
    by_dataset = {}
    for run_metrics in repo.query_metrics(query, report_mode=QueryReportMode.DISABLED).iter_runs():
        for metric in run_metrics:
            frame = metric.dataframe()
            dataset = next(t.split(":", 1)[1] for t in metric.run.props.tags if t.startswith("dataset:"))
            by_dataset.setdefault(dataset, {})[metric.name] = list(zip(frame["step"], frame["value"]))
            assert metric.run.experiment == "demo" and "routelab" in metric.run.props.tags
            assert metric.run["hparams"] == {"lr": 0.003, "model": {"layers": 4, "experts": 64}, "alphas": [0.1, 0.2]}
            assert metric.run["artifacts"] == {"routing": str(tmp_path / "run" / "routing.parquet")}
    expected = {"loss": [(0, 2.0), (1, 1.5), (2, 1.0)], "final/perplexity": [(2, 12.5)],
                "system/tokens_per_s": [(2, 1000.0)]}
    assert by_dataset == {"code": expected, "grammar": expected}
    grouped = repo.query_metrics('metric.name == "loss" and "dataset:grammar" in run.tags',
                                 report_mode=QueryReportMode.DISABLED)
    assert [metric.run.name for metric in grouped.iter()] == ["route/bh/grammar"]
    distributions = repo.query_distributions('distributions.name == "experts_selected/layer_0"',
                                             report_mode=QueryReportMode.DISABLED)
    for run_distributions in distributions.iter_runs():
        for distribution in run_distributions:
            steps, values = distribution.values.sparse_list()
            counts, edges = values[0].to_np_histogram()
            assert steps == [2] and counts.tolist() == [0, 5, 3, 2] and edges.tolist() == [-0.5, 0.5, 1.5, 2.5, 3.5]


def test_aim_refuses_unequal_bins(tmp_path):
    pytest.importorskip("aim", reason="Aim is not installed (routelab[tracking])")
    from routelab.tracking import AimExporter

    exporter = AimExporter(tmp_path / "aim", "demo", "x")
    with pytest.raises(TrackingError, match="histogram 'h': Aim distributions need equal bins"):
        exporter.histogram("h", 0, np.array([0.0, 1.0, 3.0]), np.array([1, 2]))
    exporter.close()


@pytest.mark.parametrize(("exporter", "module", "option"), [
    ("WandbExporter", "wandb", "tracking.wandb"), ("AimExporter", "aim", "tracking.aim"),
    ("MlflowExporter", "mlflow.tracking", "tracking.mlflow_uri"),
    ("TensorBoardExporter", "torch.utils.tensorboard", "tracking.tensorboard")])
def test_a_missing_tracker_package_names_the_extra(monkeypatch, exporter, module, option):
    import routelab.tracking

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    arguments = {"WandbExporter": ("d", "p", "n"), "AimExporter": ("d", "e", "n"), "MlflowExporter": ("u", "e", "n"),
                 "TensorBoardExporter": ("d",)}[exporter]
    with pytest.raises(TrackingError, match=rf"^{option} needs the '.+' package: pip install 'routelab\[tracking\]'"):
        getattr(routelab.tracking, exporter)(*arguments)


# --- the export_tracking stage, every tracker at once, run twice ---


def test_export_tracking_script_exports_every_run_once_per_tracker(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (routelab[tracking])")
    pytest.importorskip("aim", reason="Aim is not installed (routelab[tracking])")
    import aim
    from aim.sdk.types import QueryReportMode

    runs = []
    for routing, method in (("bh_a0.2", "bh"), ("topk8", "topk")):
        run_dir = tmp_path / "runs" / routing / "code"
        write_routing_run(run_dir, params={"routing": {"name": routing, "method": method}, "config_hash": routing * 3})
        runs.append(str(run_dir))
    (tmp_path / "runs" / "old" / "code").mkdir(parents=True)  # a run without tracking files: skipped
    command = [sys.executable, str(REPO / "workflow/scripts/export_tracking.py"), "--experiment", "demo",
               "--runs", *runs, str(tmp_path / "runs" / "old" / "code"), "--tensorboard-dir", "tb",
               "--wandb-dir", "tracking", "--aim-repo", "tracking/aim", "--rewrite-aim", "--out", "exported.json"]
    # Without WANDB_SERVICE: W&B runs of this process (the tests above) started a service that a child
    # would otherwise join, as W&B lets child processes do.
    env = {name: value for name, value in os.environ.items() if name != "WANDB_SERVICE"}
    for _ in range(2):  # a rerun replaces what the first export wrote
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr
    assert "has no tracking files" in result.stderr
    exported = json.loads((tmp_path / "exported.json").read_text())
    assert [run["name"] for run in exported["runs"]] == ["route/bh_a0.2/code", "route/topk8/code"]
    assert exported["runs"][0]["tags"] == {"experiment": "demo", "stage": "route", "routing": "bh_a0.2",
                                           "method": "bh", "dataset": "code", "config_hash": "bh_a0.2" * 3}
    wandb_runs = sorted((tmp_path / "tracking" / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2
    assert sorted(wandb_run(d)["run"]["display_name"] for d in wandb_runs) == ["route/bh_a0.2/code", "route/topk8/code"]
    repo = aim.Repo(str(tmp_path / "tracking" / "aim"))
    found = repo.query_metrics('metric.name == "final/perplexity" and "method:bh" in run.tags',
                               report_mode=QueryReportMode.DISABLED)
    assert [(m.run.name, m.dataframe()["value"].tolist()) for m in found.iter()] == [("route/bh_a0.2/code", [9.5])]
    assert len(list(repo.iter_runs())) == 2
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/export_tracking.py"), "--experiment", "demo",
                             "--runs", *runs, "--wandb-dir", "tracking", "--wandb-mode", "cloud", "--out", "x.json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "invalid choice: 'cloud'" in result.stderr


def test_demo_training_logs_expert_load_and_finals(tmp_path):
    from routelab.config import section_defaults
    from routelab.demo import model as demo_model

    settings = {**section_defaults("demo_model"), "layers": 2, "experts": 8, "top_k": 2, "hidden_size": 16,
                "expert_size": 8, "heads": 2, "vocab_size": 96, "max_positions": 32, "train_documents": 40,
                "train_steps": 3, "batch_size": 2, "seq_len": 16}
    demo_model.train(settings, tmp_path, seed=0, progress=False)
    run = read_run(tmp_path, prefix="train_")
    assert [row["step"] for row in run["metrics"]] == [0, 1, 2]
    assert set(run["final"]) == {"lm_loss", "aux_loss", "loss"}
    assert run["final"]["lm_loss"] == pytest.approx(run["metrics"][-1]["lm_loss"])
    loads = [h for h in run["histograms"] if h["name"] == "expert_load/layer_1"]
    # every token of the batch (2 x 16) picks top_k = 2 experts
    assert [h["step"] for h in loads] == [0, 1, 2] and all(sum(h["counts"]) == 2 * 16 * 2 for h in loads)
    assert len(loads[0]["counts"]) == 8
    assert len(run["system"]) >= 3 and all(row["peak_rss_mb"] > 0 for row in run["system"])
