"""Config validation: a bad config stops with one message naming the key, the value and what is valid.

Unit tests go through ``load_config`` on files written into ``tmp_path`` (the shipped config, then one
change each); the last few run ``snakemake -n --configfile BAD.yaml`` from the repository root, the path
a user takes, and check that the same message comes out before any job is scheduled.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from routelab.config import ConfigError, load_config, routing_configs, routing_methods

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config" / "config.yaml"

SHIPPED_RUNS = ["topk8", "topk4", "topk8_skip1", "topp0.4", "hc_k16", "minp0.2", "ratio_median", "entropy",
                "layerk_b24", "seqtopk8",
                "bh_a0.2_k16", "bh_a0.5_k16"]
LAST = len(SHIPPED_RUNS) - 2  # the index of an entry appended to the shipped routing list (the grid adds 2)


@pytest.fixture(scope="module")
def shipped() -> dict:
    with open(SHIPPED_CONFIG) as fh:
        return yaml.safe_load(fh)


@pytest.fixture
def config(shipped) -> dict:
    """A fresh, modifiable copy of config/config.yaml."""
    return copy.deepcopy(shipped)


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load(tmp_path: Path, config: dict) -> dict:
    tasks = tmp_path / "config" / "tasks"  # the shipped demo's lm-eval task YAMLs, where its include_path says
    if not tasks.exists():
        tasks.parent.mkdir(parents=True, exist_ok=True)
        tasks.symlink_to(REPO / "config" / "tasks")
    return load_config(write_config(tmp_path, config), base_dir=tmp_path)


def config_error(tmp_path: Path, config: dict) -> str:
    """The message of the ConfigError that loading ``config`` raises; it must be a single line."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path, config)
    message = str(info.value)
    assert "\n" not in message, f"expected one line, got:\n{message}"
    return message


def assert_names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} missing from: {message}"


# --- the shipped config and defaults -------------------------------------------------------------


def test_shipped_config_validates_and_expands_to_named_runs():
    loaded = load_config(SHIPPED_CONFIG, base_dir=REPO)
    assert list(routing_configs(loaded)) == SHIPPED_RUNS


def test_grid_is_the_cartesian_product_of_its_list_values(tmp_path, config):
    config["routing_grid"][0]["max_k"] = [8, 16]  # the shipped grid sweeps alpha only
    runs = routing_configs(load(tmp_path, config))
    for alpha in (0.2, 0.5):
        for max_k in (8, 16):
            run = runs[f"bh_a{alpha}_k{max_k}"]
            assert (run["method"], run["alpha"], run["max_k"], run["min_k"]) == ("bh", alpha, max_k, 1)
    assert runs["topk4"] == {"name": "topk4", "method": "topk", "k": 4, "skip_top": 0, "weights": "model"}


def test_defaults_are_filled_from_the_schema(tmp_path, config):
    del config["evaluation"], config["calibration"], config["seed"]
    del config["model"]["dtype"], config["model"]["device"]
    assert "task" not in config["datasets"]["arithmetic"]
    loaded = load(tmp_path, config)
    assert loaded["seed"] == 0
    assert loaded["evaluation"] == {"window": None, "add_bos_token": None, "batch_size": 16,
                                    "checkpoint_every": 100, "decision_sample_every": 100, "explorer_documents": 3,
                                    "route_jobs": "per_run"}
    assert loaded["datasets"]["arithmetic"]["shards"] == 1
    assert loaded["calibration"] == {"grid_size": 2048, "max_logits_per_layer": 1000000}
    assert loaded["model"]["dtype"] == "float32" and loaded["model"]["device"] == "auto"
    assert loaded["datasets"]["arithmetic"]["task"] == "perplexity"
    assert loaded["datasets"]["cloze"]["task"] == "cloze"  # a set value is kept
    assert loaded["report"]["baseline"] == "topk8"


def test_trackers_are_off_unless_named_and_get_their_defaults(tmp_path, config):
    loaded = load(tmp_path, config)
    assert "wandb" not in loaded["tracking"] and "aim" not in loaded["tracking"]
    config["tracking"] = {"wandb": {}, "aim": {}}
    loaded = load(tmp_path, config)
    assert loaded["tracking"]["wandb"] == {"project": "routelab", "entity": None, "mode": "offline"}
    assert loaded["tracking"]["aim"] == {"repo": None}


@pytest.mark.parametrize(("tracking", "message"), [
    ({"wandb": {"mode": "cloud"}}, r"tracking\.wandb\.mode: 'cloud' is not valid; choose one of \"offline\", \"on"),
    ({"wandb": {"projekt": "x"}}, r"tracking\.wandb: unknown key 'projekt'; valid keys: entity, mode, project"),
    ({"aim": {"repo": 3}}, r"tracking\.aim\.repo: 3 has the wrong type; expected \['string', 'null'\]"),
])
def test_bad_tracker_settings_name_the_key(tmp_path, config, tracking, message):
    config["tracking"] = tracking
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, config)


def test_bh_run_gets_the_method_defaults(tmp_path, config):
    config["routing"].append({"name": "bh_plain", "method": "bh"})
    runs = routing_configs(load(tmp_path, config))
    assert runs["bh_plain"] == {"name": "bh_plain", "method": "bh", "alpha": 0.05, "min_k": 1,
                                "max_k": None, "temperature": 1.0, "null_model": "kde", "weights": "model"}
    grid_run = runs["bh_a0.5_k16"]
    assert grid_run["temperature"] == 1.0 and grid_run["weights"] == "model" and grid_run["null_model"] == "kde"


def test_topp_and_hc_runs_get_their_defaults(tmp_path, config):
    config["routing"] += [{"name": "tp", "method": "topp"}, {"name": "hc", "method": "hc", "null_model": "gaussian"}]
    runs = routing_configs(load(tmp_path, config))
    assert runs["tp"] == {"name": "tp", "method": "topp", "p": 0.4, "min_k": 1, "max_k": None, "weights": "model"}
    assert runs["hc"]["null_model"] == "gaussian" and runs["hc"]["alpha0"] == 0.5


def test_topp_p_outside_unit_interval_names_the_key(tmp_path, config):
    config["routing"].append({"name": "tp", "method": "topp", "p": 1.5})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].p", "1.5", "<= 1")


def test_unknown_null_model_names_the_valid_ones(tmp_path, config):
    config["routing"].append({"name": "b", "method": "bh", "null_model": "student"})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].null_model", "'student'", "kde", "student_t",
                 "per_expert", "gaussian")


def test_alpha_one_is_accepted(tmp_path, config):
    config["routing"].append({"name": "bh_all", "method": "bh", "alpha": 1})
    config["routing_grid"][0]["alpha"] = [0.5, 1.0]
    runs = routing_configs(load(tmp_path, config))
    assert runs["bh_all"]["alpha"] == 1
    assert runs["bh_a1.0_k16"]["alpha"] == 1.0


def test_local_dataset_with_existing_file_is_accepted(tmp_path, config):
    (tmp_path / "mine.txt").write_text("some text\n")
    config["datasets"]["mine"] = {"source": "local", "files": ["mine.txt"]}
    loaded = load(tmp_path, config)
    assert loaded["datasets"]["mine"]["files"] == ["mine.txt"]


# --- bad configs: one message with the key, the value and what is valid --------------------------


def test_unknown_routing_method(tmp_path, config):
    config["routing"][0]["method"] = "magic"
    assert_names(config_error(tmp_path, config), "routing[0].method", "'magic'", "topk", "bh")


@pytest.mark.parametrize("alpha", [0, 1.5, -0.1])
def test_alpha_outside_zero_one_in_routing(tmp_path, config, alpha):
    config["routing"].append({"name": "bh_bad", "method": "bh", "alpha": alpha})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].alpha", repr(alpha), "> 0", "<= 1")


@pytest.mark.parametrize("alpha", [0, 1.5, -0.1])
def test_alpha_outside_zero_one_in_grid_list(tmp_path, config, alpha):
    config["routing_grid"][0]["alpha"] = [0.1, alpha]
    assert_names(config_error(tmp_path, config), "routing_grid[0].alpha[1]", repr(alpha), "> 0", "<= 1")


def test_alpha_outside_zero_one_as_grid_scalar(tmp_path, config):
    config["routing_grid"][0]["alpha"] = 1.5
    assert_names(config_error(tmp_path, config), "routing_grid[0].alpha", "1.5", "> 0", "<= 1")


def test_min_k_greater_than_max_k(tmp_path, config):
    config["routing"].append({"name": "bh_bad", "method": "bh", "min_k": 8, "max_k": 4})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].min_k", "8", "max_k = 4", "min_k <= max_k")


def test_min_k_greater_than_a_swept_max_k(tmp_path, config):
    config["routing_grid"][0]["max_k"] = [8, 16]
    config["routing_grid"][0]["min_k"] = 12  # fine for max_k 16, not for max_k 8
    assert_names(config_error(tmp_path, config), "routing_grid[0].min_k", "12", "max_k = 8", "min_k <= max_k")


def test_min_k_zero(tmp_path, config):
    config["routing"].append({"name": "bh_bad", "method": "bh", "min_k": 0})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].min_k", "0", ">= 1")


def test_unknown_dataset_source(tmp_path, config):
    config["datasets"]["mine"] = {"source": "ftp"}
    assert_names(config_error(tmp_path, config), "datasets.mine.source", "'ftp'", "demo", "hub", "local")


def test_local_dataset_with_missing_file(tmp_path, config):
    (tmp_path / "present.txt").write_text("some text\n")
    config["datasets"]["mine"] = {"source": "local", "files": ["present.txt", "absent.txt"]}
    assert_names(config_error(tmp_path, config), "datasets.mine.files[1]", "'absent.txt'", "does not exist",
                 str(tmp_path.resolve()))


def test_demo_dataset_without_domain(tmp_path, config):
    config["datasets"]["mine"] = {"source": "demo"}
    assert_names(config_error(tmp_path, config), "datasets.mine.domain", "missing",
                 "arithmetic, grammar, code, cloze")


def test_hub_dataset_without_path(tmp_path, config):
    config["datasets"]["mine"] = {"source": "hub", "split": "test"}
    assert_names(config_error(tmp_path, config), "datasets.mine.path", "missing", "dataset id")


def test_unknown_top_level_key(tmp_path, config):
    config["routnig"] = []
    assert_names(config_error(tmp_path, config), "unknown key 'routnig'", "routing", "routing_grid", "datasets")


def test_unknown_key_in_routing_entry(tmp_path, config):
    config["routing"][1]["beta"] = 0.1  # routing[1] is a topk config
    assert_names(config_error(tmp_path, config), "routing[1].beta", "0.1", "not a parameter of method 'topk'",
                 "valid: k, skip_top, weights")
    config["routing"][1].pop("beta")
    config["routing"][3]["beta"] = 0.1  # a topp config: its own parameters are named
    assert_names(config_error(tmp_path, config), "routing[3].beta", "method 'topp'", "min_k", "max_k", "p")


def test_duplicate_routing_names(tmp_path, config):
    config["routing"].append({"name": "topk8", "method": "topk", "k": 2})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].name", "'topk8'", "used twice", "unique")


def test_grid_name_clashing_with_an_explicit_one(tmp_path, config):
    config["routing"].append({"name": "bh_a0.5_k16", "method": "bh"})
    assert_names(config_error(tmp_path, config), "routing_grid[0].name", "'bh_a0.5_k16'", "used twice", "unique")


def test_grid_name_template_missing_a_swept_key_gives_duplicate_names(tmp_path, config):
    config["routing_grid"][0]["max_k"] = [8, 16]
    config["routing_grid"][0]["name"] = "bh_a{alpha}"  # max_k is swept but not in the name
    assert_names(config_error(tmp_path, config), "routing_grid[0].name", "'bh_a0.2'", "used twice", "unique")


def test_empty_grid_list(tmp_path, config):
    config["routing_grid"][0]["alpha"] = []
    assert_names(config_error(tmp_path, config), "routing_grid[0].alpha", "[]", "empty")


def test_grid_name_template_with_a_key_not_swept(tmp_path, config):
    config["routing_grid"][0]["name"] = "bh_a{alpha}_t{temperature}"
    assert_names(config_error(tmp_path, config), "routing_grid[0].name", "'bh_a{alpha}_t{temperature}'",
                 "temperature", "{alpha}", "{max_k}", "{min_k}")


def test_report_baseline_naming_a_missing_config(tmp_path, config):
    config["report"]["baseline"] = "topk2"
    assert_names(config_error(tmp_path, config), "report.baseline", "'topk2'", "topk8", "topk4", "bh_a0.2_k16")


def test_bh_parameter_on_a_topk_entry(tmp_path, config):
    config["routing"][1]["alpha"] = 0.1
    assert_names(config_error(tmp_path, config), "routing[1].alpha", "'topk'", "valid: k, skip_top, weights")


def test_experiment_name_with_a_slash(tmp_path, config):
    config["experiment"] = "demo/v2"
    assert_names(config_error(tmp_path, config), "experiment", "'demo/v2'", "letters, digits and _ . + -")


def test_invalid_model_dtype(tmp_path, config):
    config["model"]["dtype"] = "float64"
    assert_names(config_error(tmp_path, config), "model.dtype", "'float64'", "float32", "bfloat16", "float16")


# --- expert counts against the model, before any job ----------------------------------------------


@pytest.mark.parametrize(("entry", "expected"), [
    ({"name": "b", "method": "bh", "max_k": 65},
     ["routing b.max_k: 65", "64 experts a token may choose from (demo_model.experts)", "need max_k <= 64"]),
    ({"name": "t", "method": "topk", "k": 80}, ["routing t.k: 80", "need k <= 64"]),
    ({"name": "e", "method": "entropy", "ks": [2, 4, 80]}, ["routing e.ks: [2, 4, 80]", "need each value <= 64"]),
    ({"name": "l", "method": "layerk", "ks": [8, 8, 8, 65]}, ["routing l.ks: [8, 8, 8, 65]", "64 experts"]),
    ({"name": "s", "method": "seqtopk", "budget": 64.5}, ["routing s.budget: 64.5", "need budget <= 64"]),
    ({"name": "m", "method": "minp", "min_k": 9}, ["routing m.min_k: 9 is greater than the model's top-k 8",
                                                   "need min_k <= max_k"]),
])
def test_expert_counts_are_checked_against_the_demo_model(tmp_path, config, entry, expected):
    config["routing"].append(entry)
    assert_names(config_error(tmp_path, config), *expected)


def test_expert_counts_at_the_limit_pass(tmp_path, config):
    config["routing"] += [{"name": "t64", "method": "topk", "k": 64},
                          {"name": "b64", "method": "bh", "min_k": 8, "max_k": 64}]
    assert {"t64", "b64"} <= set(routing_configs(load(tmp_path, config)))


def model_config(directory: Path, fields: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(fields))
    return directory


def local_model_config(config: dict, model: str) -> dict:
    config["model"]["id"] = model
    config["routing"], config["routing_grid"] = [{"name": "topk9", "method": "topk", "k": 9}], []
    config["report"]["baseline"] = None
    return config


def test_expert_counts_are_checked_against_a_local_models_config_json(tmp_path, config):
    model_config(tmp_path / "mixtral", {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert_names(config_error(tmp_path, local_model_config(config, "mixtral")),
                 "routing topk9.k: 9 exceeds the 8 experts a token may choose from", "mixtral/config.json",
                 "need k <= 8")


def test_a_multimodal_models_text_config_holds_the_expert_count(tmp_path, config):
    model_config(tmp_path / "vl", {"model_type": "qwen3_vl_moe",
                                   "text_config": {"num_experts": 4, "num_experts_per_tok": 2}})
    assert_names(config_error(tmp_path, local_model_config(config, "vl")), "routing topk9.k: 9", "4 experts")


def test_a_downloaded_hub_models_config_json_is_read_and_a_missing_one_is_not_needed(tmp_path, config):
    config = local_model_config(config, "someone/tiny-moe")
    assert "topk9" in routing_configs(load(tmp_path, config))  # not downloaded yet: the route job checks
    model_config(tmp_path / "resources" / "models" / "someone" / "tiny-moe", {"n_routed_experts": 6})
    assert_names(config_error(tmp_path, config), "routing topk9.k: 9 exceeds the 6 experts a token may choose from",
                 "resources/models/someone/tiny-moe/config.json")


def test_a_group_limited_models_candidate_experts_bound_the_counts(tmp_path, config):
    model_config(tmp_path / "v3", {"model_type": "deepseek_v3", "n_routed_experts": 16, "n_group": 4, "topk_group": 2,
                                   "num_experts_per_tok": 4})
    config = local_model_config(config, "v3")
    config["routing"] = [{"name": "bh9", "method": "bh", "min_k": 1, "max_k": 9}]
    assert_names(config_error(tmp_path, config), "routing bh9.max_k: 9 exceeds the 8 experts a token may choose from",
                 "16 experts in 4 groups, each token choosing within its best 2", "need max_k <= 8")
    config["routing"] = [{"name": "bh8", "method": "bh", "min_k": 1, "max_k": 8}]
    assert "bh8" in routing_configs(load(tmp_path, config))


def test_memory_limits_without_a_device_map_are_refused_naming_the_key(tmp_path, config):
    config["model"]["max_memory"] = {"cpu": "10GiB"}
    assert_names(config_error(tmp_path, config), "model.max_memory", "without model.device_map")


def test_a_device_map_and_its_memory_limits_are_accepted(tmp_path, config):
    config["model"].update(device_map="auto", max_memory={0: "70GiB", "cpu": "200GiB"}, gpus=2)
    assert routing_configs(load(tmp_path, config))
    config["model"]["device_map"] = "everywhere"
    assert_names(config_error(tmp_path, config), "everywhere")


# --- the user path: snakemake -n --configfile BAD.yaml ---------------------------------------------

# --configfile replaces config/config.yaml: each file is the demo config with one bad section
# (replacing that key). The experiment name is unique so a stray results/ folder would be noticed.
EXPERIMENT = "config_validation_test"
SNAKEMAKE_CASES = {
    "unknown_method": (
        {"routing": [{"name": "x", "method": "magic"}]},
        ["routing[0].method", "'magic'", ", ".join(f'"{method}"' for method in routing_methods())],
    ),
    "alpha_in_grid": (
        {"routing_grid": [{"name": "bh_a{alpha}", "method": "bh", "alpha": [0.1, 1.5]}]},
        ["routing_grid[0].alpha[1]", "1.5", "> 0 and <= 1"],
    ),
    "max_k_over_the_demos_experts": (
        {"routing": [{"name": "bh65", "method": "bh", "max_k": 65}]},
        ["routing bh65.max_k", "65", "the 64 experts a token may choose from (demo_model.experts)", "need max_k <= 64"],
    ),
    "missing_local_file": (
        {"datasets": {"mine": {"source": "local", "files": ["no_such_file_for_config_test.txt"]}}},
        ["datasets.mine.files[0]", "'no_such_file_for_config_test.txt'", "does not exist"],
    ),
}


@pytest.mark.parametrize("case", list(SNAKEMAKE_CASES))
def test_snakemake_dry_run_stops_on_bad_config(tmp_path, case):
    section, expected = SNAKEMAKE_CASES[case]
    bad = tmp_path / "bad.yaml"
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    bad.write_text(yaml.safe_dump({**demo, "experiment": EXPERIMENT, **section}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["snakemake", "-n", "--configfile", str(bad)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    lines = [line for line in output.splitlines() if expected[0] in line]
    assert len(lines) == 1, f"expected the message once, got:\n{output}"
    assert_names(lines[0], *expected)
    assert "rule route" not in output and "Job stats" not in output, output
    assert not (REPO / "results" / EXPERIMENT).exists()


def test_names_with_regex_characters_plan_every_job(tmp_path):
    # The schema allows "." and "+" in names; unescaped in the wildcard constraints, "+" matched nothing
    # (snakemake -n failed: missing input for rule all).
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["experiment"] = "demo+regex.test"
    config["routing"] = [{**spec, "name": spec["name"].replace("topk4", "top+k4")} for spec in config["routing"]]
    config["datasets"] = {("gram+mar" if name == "grammar" else name): spec
                          for name, spec in config["datasets"].items()}
    path = tmp_path / "plus.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["snakemake", "-n", "--configfile", str(path), "--directory", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "results/demo+regex.test/runs/top+k4/gram+mar/routing.parquet" in output
    assert "results/demo+regex.test/report/report.html" in output


# --- list parameters, alternatives and calibration ------------------------------------------------------


def test_a_grid_sweeps_a_list_parameter_with_a_list_of_lists(tmp_path, config):
    config["routing_grid"].append({"name": "ent{thresholds}", "method": "entropy", "ks": [1, 4],
                                   "thresholds": [[1.0], [2.0]]})
    config["routing_grid"].append({"name": "lk", "method": "layerk", "ks": [1, 2, 4, 8]})  # one value, not a sweep
    runs = routing_configs(load(tmp_path, config))
    assert runs["ent1.0"]["thresholds"] == [1.0] and runs["ent2.0"]["thresholds"] == [2.0]
    assert runs["ent1.0"]["ks"] == [1, 4] and runs["lk"]["ks"] == [1, 2, 4, 8]


def test_alternative_parameters_given_together_are_refused_naming_both(tmp_path, config):
    config["routing"].append({"name": "r", "method": "ratio", "beta": 0.4, "calibrate": "median"})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}]", "beta=0.4", "calibrate='median'", "only one")


def test_ratio_without_beta_calibrates_with_the_median(tmp_path, config):
    runs = routing_configs(load(tmp_path, config))
    assert runs["ratio_median"]["calibrate"] == "median" and runs["ratio_median"]["beta"] is None
    config["routing"].append({"name": "r", "method": "ratio"})
    assert routing_configs(load(tmp_path, config))["r"]["calibrate"] == "median"


def test_layerk_needs_ks_or_budget_and_one_k_per_demo_layer(tmp_path, config):
    config["routing"].append({"name": "lk", "method": "layerk"})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}]", "none of ks, budget given")
    config["routing"][-1]["ks"] = [2, 4, 8]
    assert_names(config_error(tmp_path, config), "routing lk.ks", "[2, 4, 8]", "3 values", "4 MoE layers",
                 "demo_model.layers")


@pytest.mark.parametrize("entry,key,valid", [
    ({"method": "entropy", "ks": [1, 0]}, "ks[1]", ">= 1"),
    ({"method": "entropy", "quantiles": [1.5]}, "quantiles[0]", "<= 1"),
    ({"method": "minp", "m": -0.1}, "m", ">= 0"),
    ({"method": "seqtopk", "budget": 0}, "budget", "> 0"),
    ({"method": "ratio", "calibrate": "mean"}, "calibrate", "median"),
])
def test_new_rules_bad_values_name_key_value_and_range(tmp_path, config, entry, key, valid):
    config["routing"].append({"name": "bad", **entry})
    assert_names(config_error(tmp_path, config), f"routing[{LAST}].{key}", valid)


def test_lm_eval_task_yamls_say_whether_a_task_generates_and_needs_a_download(tmp_path):
    from routelab.config import task_data_is_local, task_generates

    (tmp_path / "base.yaml").write_text("output_type: generate_until\ndataset_path: gsm8k\n")
    (tmp_path / "mine.yaml").write_text("task: mine\ninclude: base.yaml\n")
    (tmp_path / "local.yaml").write_text("task: local\noutput_type: multiple_choice\n"
                                         "custom_dataset: !function utils.build\n")
    (tmp_path / "files.yaml").write_text("task: files\ndataset_path: json\n")
    spec = {"source": "lm_eval", "include_path": str(tmp_path)}
    assert task_generates({**spec, "task": "mine"}) and not task_data_is_local({**spec, "task": "mine"})
    assert not task_generates({**spec, "task": "local"}) and task_data_is_local({**spec, "task": "local"})
    assert task_data_is_local({**spec, "task": "files"})
    assert not task_generates({"source": "lm_eval", "task": "gsm8k"})  # lm-eval's own: unknown here
    assert task_generates({"source": "lm_eval", "task": "gsm8k", "generates": True})
    assert not task_data_is_local({"source": "lm_eval", "task": "arc_easy"})


def test_skip_top_that_leaves_no_expert_is_refused_before_any_job(tmp_path, config):
    config["routing"][1]["skip_top"] = 4  # routing[1] is topk4
    assert_names(config_error(tmp_path, config), "routing[1].skip_top", "4", "k = 4", "skip_top < k")
