# Config validation, wildcard constraints and the small input/param helpers the rules use.

import json
import os

from snakemake.exceptions import WorkflowError

from routelab.config import (
    CALIBRATED_NULLS,
    DEMO_MODEL_ID,
    ConfigError,
    baseline_name,
    check_config,
    validate_schema,
)

try:
    validate_schema(config, schema=workflow.source_path("../schemas/config.schema.yaml"))
    ROUTING = check_config(config, base_dir=workflow.basedir)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

EXPERIMENT = config["experiment"]
DATASETS = list(config["datasets"])
IS_DEMO = config["model"]["id"] == DEMO_MODEL_ID
BASELINE = baseline_name(config)


wildcard_constraints:
    experiment=EXPERIMENT,
    dataset="|".join(DATASETS),
    routing="|".join(ROUTING),
    null="|".join(CALIBRATED_NULLS),


def as_json(value):
    """Compact, key-sorted JSON: the same config always gives the same params string."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def model_dir(wildcards):
    """The demo model's directory (an input), or nothing for a hub/local model."""
    return [f"results/{wildcards.experiment}/model"] if IS_DEMO else []


def model_ref(wildcards):
    """What --model gets: the demo model's directory or the configured hub id / path."""
    return f"results/{wildcards.experiment}/model" if IS_DEMO else config["model"]["id"]


def dataset_spec(wildcards):
    return as_json(config["datasets"][wildcards.dataset])


def routing_spec(wildcards):
    return as_json(ROUTING[wildcards.routing])


def null_input(wildcards):
    """The calibrated null a p-value router uses; other runs do not depend on (or rerun for) any null."""
    null = ROUTING[wildcards.routing].get("null_model")
    if null not in CALIBRATED_NULLS:
        return []
    return f"results/{wildcards.experiment}/calibration/{null}/null.npz"


def null_arg(wildcards, input):
    """--null: the calibrated null's file, the name of a null that needs no calibration, or nothing."""
    if input.get("null"):
        return f"--null {input.null}"
    null = ROUTING[wildcards.routing].get("null_model")
    return f"--null {null}" if null else ""


def model_options():
    """Loading options shared by every rule that runs the model."""
    model = config["model"]
    options = f"--dtype {model['dtype']} --device {model['device']}"
    if model["experts_implementation"]:
        options += f" --experts-implementation {model['experts_implementation']}"
    return options


def run_dirs(wildcards):
    return expand(
        "results/{experiment}/runs/{routing}/{dataset}",
        experiment=wildcards.experiment,
        routing=ROUTING,
        dataset=DATASETS,
    )


def run_summaries(wildcards):
    return [f"{d}/{name}" for d in run_dirs(wildcards) for name in ("summary.json", "metrics.json", "system.json")]


def run_plots(wildcards):
    return expand(
        "results/{experiment}/plots/{routing}/{dataset}/{figure}.png",
        experiment=wildcards.experiment,
        routing=ROUTING,
        dataset=DATASETS,
        figure=["experts_histogram", "expert_heatmap"],
    )


def get_final_output():
    return [f"results/{EXPERIMENT}/report/report.html"]


onsuccess:
    report_html = f"results/{EXPERIMENT}/report/report.html"
    if os.path.exists(report_html):
        print(f"\nrouting report: {os.path.abspath(report_html)}\n")
