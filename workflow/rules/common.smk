# Config validation, wildcard constraints and the small input/param helpers the rules use.

import json
import shlex
import os
import re

from snakemake.exceptions import WorkflowError

from routelab.catalogue import ANALYSIS_TABLES, REPORT_FIGURES, RUN_FIGURES
from routelab.config import (
    DEMO_MODEL_ID,
    ConfigError,
    baseline_name,
    calibrated_nulls,
    check_config,
    routed_datasets,
    task_data_is_local,
    uses_calibration,
    validate_schema,
)
from routelab.download import dataset_dir as resource_dataset_dir
from routelab.download import is_hub_model
from routelab.download import model_dir as resource_model_dir
from routelab.run.shards import shard_name

try:
    # The schema file itself, not Snakemake's cached copy: its routing part is in routing.schema.yaml beside it.
    validate_schema(config, schema=os.path.join(workflow.basedir, "workflow", "schemas", "config.schema.yaml"))
    ROUTING = check_config(config, base_dir=workflow.basedir)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

EXPERIMENT = config["experiment"]
DATASETS = list(config["datasets"])
IS_DEMO = config["model"]["id"] == DEMO_MODEL_ID
BASELINE = baseline_name(config)
# The datasets each routing config runs on: all, but a teacher-forced rule skips lm-eval tasks that generate.
RUN_DATASETS = routed_datasets(config, ROUTING, base_dir=workflow.basedir)
RUNS = [(routing, dataset) for routing, datasets in RUN_DATASETS.items() for dataset in datasets]
# The two sets of datasets a routing config can have (every dataset, or those without generation): the
# per-routing jobs (route_datasets, plot_run) are one rule per set, since a rule's outputs are fixed.
FULL_ROUTINGS = [name for name, datasets in RUN_DATASETS.items() if datasets == DATASETS]
CAUSAL_ONLY_DATASETS = [d for d in DATASETS if all(d in datasets for datasets in RUN_DATASETS.values())]
PARTIAL_ROUTINGS = [name for name in ROUTING if name not in FULL_ROUTINGS]


def share_of_cores(most):
    """Threads of a multi-threaded CPU job: half the cores Snakemake was given, at least 1 and at most
    ``most``. A job that needs every free core waits behind each one-core job that can start first, and
    one thread on two cores is what the demo's calibration and aggregate run fastest with anyway (and
    one thread makes CPU float sums the same on every machine). Under a cluster executor (no --cores:
    each job gets a node) ``most``."""
    try:
        cores = workflow.cores
    except WorkflowError:
        return most
    return max(1, min(most, cores // 2))


def one_of(names):
    """A wildcard constraint matching exactly these names (or nothing, for an empty list); names may hold
    regex characters (the schema allows ``.`` and ``+``), so each is escaped."""
    return "|".join(re.escape(name) for name in names) if names else "(?!)"


wildcard_constraints:
    experiment=one_of([EXPERIMENT]),
    dataset=one_of(DATASETS),
    routing=one_of(ROUTING),
    null=one_of(calibrated_nulls()),


def as_json(value):
    """Compact, key-sorted JSON: the same config always gives the same params string."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# Hub models and datasets are fetched by the local `download` rules into resources/ (download.smk);
# every job that runs the model reads those copies, so compute nodes need no internet.
HUB_MODEL = not IS_DEMO and is_hub_model(config["model"]["id"])
MODEL_RESOURCE = str(resource_model_dir(config["model"]["id"])) if HUB_MODEL else None
HUB_DATASETS = [name for name in DATASETS if config["datasets"][name]["source"] == "hub"]
# lm-eval tasks whose data is on the hub: it goes into lm-eval's cache under resources/lm_eval/, which the
# route jobs read offline (a task that builds its documents locally, as the demo's, needs no download)
TASK_DATASETS = [name for name in DATASETS if config["datasets"][name]["source"] == "lm_eval"
                 and not task_data_is_local(config["datasets"][name], workflow.basedir)]


def model_dir(wildcards):
    """The model directory a job reads (an input): the demo model, the downloaded hub model, or
    nothing for a local directory named in the config."""
    if IS_DEMO:
        return [f"results/{wildcards.experiment}/model"]
    return [MODEL_RESOURCE] if HUB_MODEL else []


def model_ref(wildcards):
    """What --model gets: the demo model's directory, the hub model's local copy, or the local path."""
    if IS_DEMO:
        return f"results/{wildcards.experiment}/model"
    return MODEL_RESOURCE if HUB_MODEL else config["model"]["id"]


def dataset_download(wildcards):
    """The local copy of a hub dataset (an input of prepare_dataset), or nothing for demo/local data."""
    if wildcards.dataset in TASK_DATASETS:
        return [f"resources/lm_eval/{wildcards.dataset}.json"]
    return [str(resource_dataset_dir(wildcards.dataset))] if wildcards.dataset in HUB_DATASETS else []


def download_targets():
    """Everything the `download` rule fetches (the hub model, every hub dataset and lm-eval task)."""
    return (([MODEL_RESOURCE] if HUB_MODEL else []) + [str(resource_dataset_dir(name)) for name in HUB_DATASETS]
            + [f"resources/lm_eval/{name}.json" for name in TASK_DATASETS])


def dataset_spec(wildcards):
    # `shards` says how route jobs split the data, not what the data is: leaving it out keeps
    # prepare_dataset (and everything downstream) from rerunning when it changes.
    spec = {k: v for k, v in config["datasets"][wildcards.dataset].items() if k != "shards"}
    if wildcards.dataset in HUB_DATASETS:  # read the downloaded copy, not the hub
        spec["download_dir"] = str(resource_dataset_dir(wildcards.dataset))
    return as_json(spec)


# Datasets routed in more than one job (route_shard + gather_shards); the others keep one route job.
SHARDS = {name: spec["shards"] for name, spec in config["datasets"].items()}
SHARDED = [name for name in DATASETS if SHARDS[name] > 1]
# Unsharded datasets routed by one route job per run, or all in the one route_datasets job of each routing config.
UNSHARDED = [name for name in DATASETS if name not in SHARDED]
ROUTED_TOGETHER = UNSHARDED if config["evaluation"]["route_jobs"] == "per_routing" else []
ROUTED_ALONE = [name for name in UNSHARDED if name not in ROUTED_TOGETHER]


def together_data(name, datasets=DATASETS):
    """route_datasets: ``name`` in each of its datasets' prepared directories (those of ``datasets`` it routes)."""
    return [f"results/{{experiment}}/data/{dataset}/{name}" for dataset in ROUTED_TOGETHER if dataset in datasets]


def data_dirs(wildcards, input):
    """route.py's --data: the prepared directory of each dataset the job reads (one, or route_datasets' all)."""
    windows = [input.windows] if isinstance(input.windows, str) else list(input.windows)
    return [os.path.dirname(path) for path in windows]


def together_runs(name, datasets=DATASETS):
    """route_datasets: ``name`` in each of its runs' directories (the directories for "")."""
    return [f"results/{{experiment}}/runs/{{routing}}/{dataset}/{name}".rstrip("/") for dataset in ROUTED_TOGETHER
            if dataset in datasets]


def shard_dirs(wildcards):
    """The output directories of one sharded run's shards, in order (1-of-N ... N-of-N)."""
    count = SHARDS[wildcards.dataset]
    return [
        f"results/{wildcards.experiment}/shards/{wildcards.routing}/{wildcards.dataset}/{shard_name(i, count)}"
        for i in range(1, count + 1)
    ]


def shard_parts(wildcards):
    return [f"{d}/{name}" for d in shard_dirs(wildcards) for name in SHARD_FILES]


SHARD_FILES = ("routing.parquet", "decisions.parquet", "explorer.parquet", "scores.parquet", "accumulators.npz", "part.json")


def route_batch_size(wildcards):
    """Windows per forward pass as configured; route.py halves it for a retry only on out-of-memory evidence."""
    return config["evaluation"]["batch_size"]


def route_attempt(wildcards, attempt):
    """The attempt number, for route.py (a retry after a non-memory error fails at once)."""
    return attempt


def routing_spec(wildcards):
    return as_json(ROUTING[wildcards.routing])


def null_input(wildcards):
    """The calibrated null a p-value router uses; other runs do not depend on (or rerun for) any null."""
    null = ROUTING[wildcards.routing].get("null_model")
    if null not in calibrated_nulls():
        return []
    return f"results/{wildcards.experiment}/calibration/{null}/null.npz"


def null_arg(wildcards, input):
    """--null: the calibrated null's file, the name of a null that needs no calibration, or nothing."""
    if input.get("null"):
        return f"--null {input.null}"
    null = ROUTING[wildcards.routing].get("null_model")
    return f"--null {null}" if null else ""


def calibration_input(wildcards):
    """The calibration split's router logits, for a rule that fits itself to them (ratio calibrate, entropy
    quantiles, layerk budget); other runs do not depend on them."""
    if not uses_calibration(ROUTING[wildcards.routing]):
        return []
    return f"results/{wildcards.experiment}/calibration/router_logits.npz"


def calibration_arg(wildcards, input):
    return f"--calibration-logits {input.calibration}" if input.get("calibration") else ""


def model_options():
    """Loading options shared by every rule that runs the model."""
    model = config["model"]
    options = f"--dtype {model['dtype']} --device {model['device']} --gpus {model['gpus']}"
    if model["experts_implementation"]:
        options += f" --experts-implementation {model['experts_implementation']}"
    if model["device_map"] is not None:
        device_map = model["device_map"]
        options += f" --device-map {shlex.quote(device_map if isinstance(device_map, str) else json.dumps(device_map))}"
    if model["max_memory"] is not None:
        options += f" --max-memory {shlex.quote(json.dumps(model['max_memory']))}"
    if model["offload_folder"] is not None:
        options += f" --offload-folder {shlex.quote(model['offload_folder'])}"
    return options


def run_dirs(wildcards):
    """Every run's directory (a routing config on a dataset it runs on)."""
    return [f"results/{wildcards.experiment}/runs/{routing}/{dataset}" for routing, dataset in RUNS]


def run_files(wildcards, names):
    """``names`` in every run's directory."""
    return [f"{d}/{name}" for d in run_dirs(wildcards) for name in names]


def run_summaries(wildcards):
    return run_files(wildcards, ("summary.json", "metrics.json", "system.json"))


def aggregate_inputs(wildcards):
    """Everything the aggregate reads from each run."""
    return run_files(wildcards, ("summary.json", "metrics.json", "system.json", "scores.parquet", "routing.parquet",
                                 "decisions.parquet", "explorer.parquet"))


def config_runs(wildcards):
    """The run directories of one routing config, one per dataset it runs on (the plot_run job draws them all)."""
    return [f"results/{wildcards.experiment}/runs/{wildcards.routing}/{dataset}"
            for dataset in RUN_DATASETS[wildcards.routing]]


def config_run_files(wildcards):
    """What plot_run reads of each run of one routing config."""
    return [f"{run}/{name}" for run in config_runs(wildcards)
            for name in ("summary.json", "routing.parquet", "decisions.parquet")]


def config_plot_dirs(wildcards):
    return [f"results/{wildcards.experiment}/plots/{wildcards.routing}/{dataset}"
            for dataset in RUN_DATASETS[wildcards.routing]]


def run_figure_outputs(datasets=DATASETS):
    """plot_run's outputs for one routing config: each run (on ``datasets``) gets every per-run figure of the
    catalogue (shown in Snakemake's report) and index.json."""
    outputs = {}
    for dataset in datasets:
        for figure in RUN_FIGURES:
            outputs[f"{dataset}/{figure.name}"] = report(
                f"results/{{experiment}}/plots/{{routing}}/{dataset}/{figure.file}",
                caption=f"../report/{figure.caption_file}",
                category="Per-run figures",
                subcategory="{routing}",
                labels={"routing": "{routing}", "dataset": dataset, "figure": figure.label},
            )
        outputs[f"{dataset}/index"] = f"results/{{experiment}}/plots/{{routing}}/{dataset}/index.json"
    return outputs


def report_figure_outputs():
    """The report's cross-run figures, from the catalogue."""
    return {
        figure.name: report(
            f"results/{{experiment}}/report/figures/{figure.file}",
            caption=f"../report/{figure.caption_file}",
            category="Comparison",
        )
        for figure in REPORT_FIGURES
    }


def run_plots(wildcards):
    """Every run's figure index: plot_run writes it with all of the run's figures, and the report links
    the per-run figures from it."""
    return [f"results/{wildcards.experiment}/plots/{routing}/{dataset}/index.json" for routing, dataset in RUNS]


def revision_option():
    """``--revision REV`` for download.py when the config pins the hub model's revision, else nothing."""
    revision = config["model"]["revision"]
    return f"--revision {shlex.quote(revision)}" if revision else ""


def tracking_options(wildcards):
    """export_tracking.py's options for the trackers the config switches on (and the demo model's runs)."""
    tracking, experiment = config["tracking"], wildcards.experiment
    options = [f"--model-dir results/{experiment}/model"] if IS_DEMO else []
    if tracking["tensorboard"]:
        options.append(f"--tensorboard-dir results/{experiment}/tracking/tensorboard")
    if tracking["mlflow_uri"]:
        options.append(f"--mlflow-uri {shlex.quote(tracking['mlflow_uri'])}")
    if "wandb" in tracking:
        wandb = tracking["wandb"]
        options.append(f"--wandb-dir results/{experiment}/tracking --wandb-project {shlex.quote(wandb['project'])}"
                       f" --wandb-mode {wandb['mode']}")
        if wandb["entity"]:
            options.append(f"--wandb-entity {shlex.quote(wandb['entity'])}")
    if "aim" in tracking and tracking["aim"]["repo"]:  # the user's repository: add runs to it
        options.append(f"--aim-repo {shlex.quote(tracking['aim']['repo'])}")
    elif "aim" in tracking:  # the pipeline's own: rewritten, as the TensorBoard folder
        options.append(f"--aim-repo results/{experiment}/tracking/aim --rewrite-aim")
    return " ".join(options)


def tracking_enabled():
    tracking = config["tracking"]
    return bool(tracking["tensorboard"] or tracking["mlflow_uri"] or "wandb" in tracking or "aim" in tracking)


def get_final_output():
    outputs = [f"results/{EXPERIMENT}/report/report.html"]
    if tracking_enabled():
        outputs.append(f"results/{EXPERIMENT}/tracking/exported.json")
    return outputs


onsuccess:
    report_html = f"results/{EXPERIMENT}/report/report.html"
    if os.path.exists(report_html):
        print(f"\nrouting report: {os.path.abspath(report_html)}\n")
