"""The example model configs (config/models/*.yaml, each given after config/olmoe.yaml): valid against
the schema and against their models' published expert counts, so a grid that asks for more experts
than a model has is caught here rather than on a GPU node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from routelab.config import ConfigError, load_config, routing_configs
from routelab.model.families import FAMILIES
from tests.support import REPO

MODELS = REPO / "config" / "models"

# The routing fields of each model's config.json on the hub, as published (copied by hand: the hub is
# not reachable from the test machine).
PUBLISHED = {
    "Qwen/Qwen3-30B-A3B-Base": {"model_type": "qwen3_moe", "num_experts": 128, "num_experts_per_tok": 8,
                                "norm_topk_prob": True, "max_position_embeddings": 32768},
    "deepseek-ai/DeepSeek-V2-Lite": {"model_type": "deepseek_v2", "n_routed_experts": 64, "num_experts_per_tok": 6,
                                     "n_group": 1, "topk_group": 1, "topk_method": "greedy",
                                     "max_position_embeddings": 163840},
    "mistralai/Mixtral-8x7B-v0.1": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2,
                                    "max_position_embeddings": 32768},
    "zai-org/GLM-4.5-Air-Base": {"model_type": "glm4_moe", "n_routed_experts": 128, "num_experts_per_tok": 8,
                                 "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                                 "max_position_embeddings": 131072},
}


def merged(overlay: Path) -> dict:
    """What ``snakemake --configfile config/olmoe.yaml OVERLAY`` sees (Snakemake's own merge)."""
    config = yaml.safe_load((REPO / "config" / "olmoe.yaml").read_text())
    update_config(config, yaml.safe_load(overlay.read_text()))
    return config


def load_with_published_config(tmp_path: Path, config: dict) -> dict:
    """Load ``config`` as the pipeline does once the model is downloaded: resources/ holds its config.json."""
    model = config["model"]["id"]
    folder = tmp_path / "resources" / "models" / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(PUBLISHED[model]))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path, base_dir=tmp_path)


OVERLAYS = sorted(MODELS.glob("*.yaml"))


def test_every_example_has_its_models_published_facts():
    ids = {yaml.safe_load(path.read_text())["model"]["id"] for path in OVERLAYS}
    assert ids == set(PUBLISHED)
    assert all(fields["model_type"] in FAMILIES for fields in PUBLISHED.values())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda path: path.stem)
def test_an_example_is_valid_for_its_model(tmp_path, overlay):
    config = merged(overlay)
    runs = routing_configs(load_with_published_config(tmp_path, config))
    facts = PUBLISHED[config["model"]["id"]]
    top_k = facts["num_experts_per_tok"]
    assert runs[config["report"]["baseline"]] == {**runs[config["report"]["baseline"]], "method": "topk", "k": top_k}
    assert config["evaluation"]["window"] <= facts["max_position_embeddings"]
    assert config["experiment"] == overlay.stem


def test_the_olmoe_grid_on_mixtral_is_refused_naming_the_run_and_the_bound(tmp_path):
    config = merged(MODELS / "mixtral_8x7b.yaml")
    config["routing_grid"] = yaml.safe_load((REPO / "config" / "olmoe.yaml").read_text())["routing_grid"]
    with pytest.raises(ConfigError, match=r"routing bh_a0.01_k16.max_k: 16 exceeds the 8 experts a token may choose "
                                          r"from \(.*Mixtral-8x7B-v0.1/config.json\); need max_k <= 8"):
        load_with_published_config(tmp_path, config)


def test_a_two_gpu_example_asks_snakemake_for_two_gpus_per_model_job(tmp_path):
    for folder in ("workflow", "config"):
        subprocess.run(["cp", "-r", str(REPO / folder), str(tmp_path / folder)], check=True)
    subprocess.run(["cp", str(REPO / "Snakefile"), str(tmp_path)], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1",
         "results/mixtral_8x7b/runs/bh_a0.05_k4/wikitext/summary.json",
         "--configfile", "config/olmoe.yaml", "config/models/mixtral_8x7b.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    blocks = result.stdout.split("\nrule ")
    route = [block for block in blocks if block.startswith(("route:", "collect_router_logits:"))]
    assert len(route) == 2 and all("gpu=2" in block for block in route), route
