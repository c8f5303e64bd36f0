"""The pipeline through a real SLURM: a private single-node cluster on this machine, profiles/slurm unchanged.

``scripts/local_slurm.py`` installs (when missing) and starts munged, slurmctld and slurmd as root;
the module fixture stops exactly those daemons afterwards, whether the tests pass or fail. A reduced
demo (one dataset, a top-k and a BH config) runs through ``--executor slurm`` (from the profile) with
``--slurm-status-command squeue`` (no accounting database) and, at the same time, locally; the
tests check that every job went through SLURM in the partitions and with the GPUs the profile asks
for, and that the results are the same as the local run's.

Skipped, with the reason, where the cluster cannot be started: not root, SLURM missing and no
apt-get to install it, or the executor plugin not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).parent / "support" / "pipeline_config.yaml"
RUNS = ["topk4", "bh_main"]
DATASET = "arithmetic"
# SLURM jobs of the reduced demo: train, prepare, router logits, calibrate, 2 route, 2 plot, aggregate, report.
EXPECTED_JOBS = {"train_demo_model": 1, "prepare_dataset": 1, "collect_router_logits": 1, "calibrate_null": 1,
                 "route": 2, "plot_run": 2,
                 "aggregate": 1, "report": 1}
GPU_RULES = {"route", "collect_router_logits"}
MEASURED_COLUMNS = {"wall_time_s", "tokens_per_s", "peak_rss_mb", "peak_cuda_mb", "peak_memory_mb"}


def load_local_slurm():
    spec = importlib.util.spec_from_file_location("local_slurm", REPO / "scripts" / "local_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


local_slurm = load_local_slurm()


def reduced_config() -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    config["datasets"] = {DATASET: config["datasets"][DATASET]}
    config["routing"] = [r for r in config["routing"] if r["name"] in RUNS]
    config.pop("routing_grid", None)
    return config


def checkout(root: Path) -> Path:
    """A copy of the workflow with the reduced config, as a user's checkout (run from its root)."""
    root.mkdir()
    shutil.copy(REPO / "Snakefile", root)
    for folder in ("workflow", "config", "profiles", "envs"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "config.yaml").write_text(yaml.safe_dump(reduced_config()))
    return root


def snakemake_cmd(*args: str) -> list[str]:
    # One thread for the two multi-threaded model jobs on both sides: CPU float sums depend on the
    # thread count, a SLURM allocation may grant another CPU count than the local run has, and this
    # comparison is about the executor, not about threads.
    return [sys.executable, "-m", "snakemake", "--configfile", "config.yaml",
            "--set-threads", "train_demo_model=1", "collect_router_logits=1", *args]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running private SLURM cluster (4 fake GPUs); the environment its clients need."""
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="the SLURM executor plugin is not installed "
                        "(pip install -e '.[test]' or '.[slurm]')")
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd needs root")
    if not local_slurm.have_binaries() and shutil.which("apt-get") is None:
        pytest.skip("SLURM (slurm-wlm, munge) is not installed and apt-get is not available to install it")
    state = tmp_path_factory.mktemp("slurm")
    try:
        env = local_slurm.start(state, gpus=4)
        # Jobs run `python`: this interpreter's, as the test's own snakemake does.
        yield {**os.environ, **env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    finally:
        local_slurm.stop(state)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """The reduced demo run through SLURM and, concurrently, locally: (slurm checkout, local checkout, log)."""
    base = tmp_path_factory.mktemp("runs")
    through_slurm, local = checkout(base / "slurm"), checkout(base / "local")
    local_run = subprocess.Popen(snakemake_cmd(), cwd=local,
                                 env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        result = subprocess.run(
            snakemake_cmd("--profile", "profiles/slurm", "--slurm-no-account", "--slurm-status-command", "squeue",
                          "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"),
            cwd=through_slurm, env=cluster, capture_output=True, text=True, timeout=900)
        local_output = local_run.communicate(timeout=900)[0]
    finally:
        if local_run.poll() is None:
            local_run.kill()
    log = result.stdout + result.stderr
    if result.returncode != 0:
        pytest.fail(f"pipeline through SLURM failed:\n{log[-8000:]}")
    if local_run.returncode != 0:
        pytest.fail(f"local reference run failed:\n{local_output[-8000:]}")
    return through_slurm, local, log


def slurm_jobs(env) -> list[dict[str, str]]:
    """Every job the cluster knows (finished ones stay listed for MinJobAge = 300 s)."""
    fields = "JobID:20|,Comment:300|,Partition:50|,tres-per-job:100|,MinMemory:20|,TimeLimit:20|,State:30"
    out = subprocess.run(["squeue", "--noheader", "--states=all", "-O", fields], env=env,
                         capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        jobid, comment, partition, tres, memory, time_limit, state = (field.strip() for field in line.split("|"))
        jobs.append({"id": jobid, "rule": comment.split("_wildcards_")[0].removeprefix("rule_"),
                     "partition": partition, "tres": tres, "memory": memory, "time_limit": time_limit,
                     "state": state})
    return jobs


def profile_request(rule: str) -> tuple[str, str]:
    """(memory, time limit) as squeue shows them for a first attempt, from profiles/slurm/config.yaml."""
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    resources = {**profile["default-resources"], **profile["set-resources"].get(rule, {})}
    mem_mb, minutes = (eval(str(resources[key]), {"attempt": 1}) for key in ("mem_mb", "runtime"))
    hours, minutes = divmod(minutes, 60)
    return f"{mem_mb}M", f"{hours}:{minutes:02d}:00" if hours else f"{minutes}:00"


@pytest.mark.slurm
def test_every_job_ran_through_slurm_with_the_profiles_resources(runs, cluster):
    _, _, log = runs
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", log)
    jobs = [job for job in slurm_jobs(cluster) if job["id"] in submitted]
    assert len(jobs) == len(submitted) == sum(EXPECTED_JOBS.values()), log[-3000:]
    assert all(job["state"] == "COMPLETED" for job in jobs), jobs
    counts = {}
    for job in jobs:
        counts[job["rule"]] = counts.get(job["rule"], 0) + 1
        if job["rule"] in GPU_RULES:  # profiles/slurm: the GPU partition and one GPU
            assert job["partition"] == "gpu" and job["tres"] == "gres:gpu:1", job
        else:
            assert job["partition"] == "cpu" and "gpu" not in job["tres"], job
        assert (job["memory"], job["time_limit"]) == profile_request(job["rule"]), job
    assert counts == EXPECTED_JOBS


@pytest.mark.slurm
def test_slurm_results_equal_the_local_run(runs):
    through_slurm, local, _ = runs
    for run in RUNS:
        slurm_dir = through_slurm / "results/mini/runs" / run / DATASET
        local_dir = local / "results/mini/runs" / run / DATASET
        for name in ("metrics.json", "summary.json"):
            assert json.loads((slurm_dir / name).read_text()) == json.loads((local_dir / name).read_text()), name
        for name in ("routing.parquet", "scores.parquet"):
            assert pq.read_table(slurm_dir / name).equals(pq.read_table(local_dir / name)), name
    for path in ("aggregate/runs.csv", "report/comparison.csv"):
        slurm_table, local_table = (pd.read_csv(root / "results/mini" / path) for root in (through_slurm, local))
        assert list(slurm_table.columns) == list(local_table.columns) and len(slurm_table) == len(local_table)
        # Wall time, throughput and memory are measurements of the machine at the time, not results.
        results = [c for c in slurm_table.columns if c not in MEASURED_COLUMNS]
        pd.testing.assert_frame_equal(slurm_table[results], local_table[results], check_exact=True)
    assert (through_slurm / "results/mini/report/report.html").is_file()


def test_stop_never_signals_a_recycled_pid(tmp_path):
    """A pid recorded for a daemon that now runs another program (the daemon died, the pid was reused)."""
    other = subprocess.Popen(["sleep", "30"])
    try:
        local_slurm.write_pids(tmp_path, {"slurmd": other.pid})
        local_slurm.stop(tmp_path, grace=1)
        assert other.poll() is None, "stop() killed a process that is not the recorded daemon"
        assert not (tmp_path / "pids.json").exists()
    finally:
        other.kill()
        other.wait()


def test_stop_ends_the_recorded_daemon_by_pid(tmp_path):
    """A stand-in named like a daemon (argv[0] = munged) is ended by stop(), and nothing else is touched."""
    daemon = subprocess.Popen(["bash", "-c", "exec -a munged sleep 30"])
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        for _ in range(50):  # until exec -a has renamed it
            if local_slurm.runs_daemon(daemon.pid, "munged"):
                break
            time.sleep(0.1)
        local_slurm.write_pids(tmp_path, {"munged": daemon.pid})
        local_slurm.stop(tmp_path, grace=5)
        assert daemon.wait(timeout=10) == -signal.SIGTERM
        assert bystander.poll() is None
    finally:
        for proc in (daemon, bystander):
            proc.kill()
            proc.wait()


def test_generated_config_names_this_host_and_the_profiles_partitions(tmp_path):
    conf = local_slurm.slurm_conf(tmp_path, "node1", cpus=4, memory_mb=64000, gpus=2)
    assert "SlurmctldHost=node1(127.0.0.1)" in conf
    assert "AccountingStorageType=accounting_storage/none" in conf
    assert "NodeName=node1 NodeAddr=127.0.0.1 CPUs=4 RealMemory=64000 Gres=gpu:2" in conf
    partitions = re.findall(r"^PartitionName=(\w+) ", conf, flags=re.M)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    assert {spec["slurm_partition"] for spec in profile["set-resources"].values() if "slurm_partition" in spec} \
        <= set(partitions) == {"cpu", "gpu"}
