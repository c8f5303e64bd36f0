"""Scale check: DAG build of a 100-config x 5-dataset sweep, and a no-op rerun of a finished pipeline.

    python benchmarks/dag_scale.py                 # both (the no-op part first runs the reduced demo, ~1-2 min)
    python benchmarks/dag_scale.py --skip-noop     # only the dry run of the sweep
    python benchmarks/dag_scale.py --profile       # also where the dry run's time goes (cProfile, top 20)

Targets (issue 6, 2 CPU cores): ``snakemake -n`` of the sweep (2,000+ jobs) in <= 10 s; ``snakemake``
on a finished pipeline (nothing to do) in <= 3 s. Both are wall times of the whole command, Python
start-up included, in a temporary copy of the workflow (the repository's results/ are not touched);
each is repeated and the median printed with the ratio to its target.
"""

from __future__ import annotations

import argparse
import copy
import os
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DAG_TARGET_S, NOOP_TARGET_S = 10.0, 3.0
CPU_TIMES: list[float] = []


def sweep_config() -> dict:
    """The demo config with 5 demo-source datasets and 100 routing configs (a grid and named ones)."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["experiment"] = "sweep"
    datasets = dict(config["datasets"])
    datasets["grammar_long"] = {**datasets["grammar"], "documents": 400}
    assert len(datasets) == 5, datasets
    config["datasets"] = datasets
    config["routing"] = (
        [{"name": f"topk{k}", "method": "topk", "k": k} for k in range(1, 9)]
        + [{"name": f"topp{p}", "method": "topp", "p": p, "min_k": 1, "max_k": 16}
           for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)]
        + [{"name": f"hc_{null}", "method": "hc", "min_k": 1, "max_k": 16, "null_model": null}
           for null in ("kde", "empirical")]
    )
    config["routing_grid"] = [{
        "name": "bh_a{alpha}_k{max_k}", "method": "bh", "min_k": 1, "null_model": "kde",
        "alpha": [round(0.05 * i, 2) for i in range(1, 21)],  # 20 levels
        "max_k": [4, 8, 12, 16],
    }]
    config["report"] = {"baseline": "topk8"}
    return config


def checkout(root: Path, config: dict) -> Path:
    shutil.copy(REPO / "Snakefile", root)
    for folder in ("workflow", "config", "profiles", "envs"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "bench.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def snakemake(root: Path, *args: str, python_args: tuple[str, ...] = ()) -> tuple[float, str]:
    """Wall time (s) and output of one snakemake command in ``root``; its CPU time goes to CPU_TIMES."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, *python_args, "-m", "snakemake", "--configfile", "bench.yaml", "--cores", "2", *args]
    start, cpu_start = time.perf_counter(), children_cpu_s()
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    elapsed = time.perf_counter() - start
    CPU_TIMES.append(children_cpu_s() - cpu_start)
    if result.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return elapsed, result.stdout + result.stderr


def job_count(output: str) -> int:
    """Total jobs from a dry run's job-stats table."""
    match = re.search(r"^total\s+(\d+)", output, flags=re.M)
    return int(match.group(1)) if match else -1


def median_time(root: Path, repeats: int, *args: str) -> tuple[float, list[float], str]:
    """Median wall time, all wall times and the last output; prints the median CPU time (user + sys)
    too, which a machine busy with other work inflates less than the wall time."""
    times, output = [], ""
    del CPU_TIMES[:]
    for _ in range(repeats):
        elapsed, output = snakemake(root, *args)
        times.append(elapsed)
    print(f"  (CPU time user + sys, median: {statistics.median(CPU_TIMES):.2f} s; "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    return statistics.median(times), times, output


def dag_build(repeats: int, profile: bool) -> None:
    config = sweep_config()
    with tempfile.TemporaryDirectory(prefix="dag_scale_") as tmp:
        root = checkout(Path(tmp), config)
        median, times, output = median_time(root, repeats, "-n", "--quiet", "rules")
        routes = len(config["routing"]) + 20 * 4
        print(f"dry run, {routes} routing configs x {len(config['datasets'])} datasets, {job_count(output)} jobs: "
              f"median {median:.2f} s of {', '.join(f'{t:.2f}' for t in times)} "
              f"-> {median / DAG_TARGET_S:.2f} x the {DAG_TARGET_S:.0f} s target")
        startup, _ = snakemake(root, "--version")
        print(f"  of which Python + snakemake start-up (snakemake --version): {startup:.2f} s")
        if profile:
            stats_file = root / "dag.prof"
            snakemake(root, "-n", "--quiet", "rules", python_args=("-m", "cProfile", "-o", str(stats_file)))
            stats = pstats.Stats(str(stats_file))
            print("  cProfile of the dry run: top 25 functions by own time")
            stats.sort_stats("tottime").print_stats(25)
            print("  the workflow's own code (rules/*.smk, routelab) by cumulative time")
            stats.sort_stats("cumulative").print_stats(r"\.smk|routelab", 15)


def noop_rerun(repeats: int) -> None:
    config = yaml.safe_load((REPO / "tests" / "data" / "pipeline_config.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="noop_rerun_") as tmp:
        root = checkout(Path(tmp), copy.deepcopy(config))
        first, _ = snakemake(root)
        print(f"reduced demo (tests/data/pipeline_config.yaml), first run: {first:.1f} s")
        median, times, output = median_time(root, repeats)
        assert "Nothing to be done" in output, output[-2000:]
        print(f"no-op rerun (`snakemake`, nothing to be done): median {median:.2f} s of "
              f"{', '.join(f'{t:.2f}' for t in times)} -> {median / NOOP_TARGET_S:.2f} x the "
              f"{NOOP_TARGET_S:.0f} s target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-noop", action="store_true", help="only time the sweep's dry run")
    parser.add_argument("--profile", action="store_true", help="cProfile the sweep's dry run")
    args = parser.parse_args()
    dag_build(args.repeats, args.profile)
    if not args.skip_noop:
        noop_rerun(args.repeats)


if __name__ == "__main__":
    main()
