"""Local copies of hub models and datasets (resources/): download, read back, clear errors when absent.

The hub cannot be reached from the test machines. The dataset path runs for real: ``datasets.load_dataset``
reads a local folder of split files through the same ``download_dataset`` call a hub id takes. For the
model only the network call itself (``huggingface_hub.snapshot_download``) is replaced, by a stand-in
that writes a saved tiny model into the target directory as the hub client would; everything around it
(atomic directory, marker, loading the copy with the Auto classes) is the real code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from routelab import download as resources
from routelab.data.loading import DatasetError, load_texts
from routelab.download import (
    DownloadError,
    ResourceMissingError,
    dataset_dir,
    dataset_splits,
    download_dataset,
    download_model,
    model_dir,
)
from routelab.model.loading import load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
OLMOE = "allenai/OLMoE-1B-7B-0924"


def test_resource_paths():
    assert model_dir(OLMOE) == Path("resources/models/allenai/OLMoE-1B-7B-0924")
    assert model_dir("gpt2", root="/x") == Path("/x/models/gpt2")
    assert dataset_dir("wikitext") == Path("resources/datasets/wikitext")
    for bad in ("../etc", "a/b/c", "", "a/../b"):
        with pytest.raises(ValueError, match="model.id: .* is not a Hugging Face hub id"):
            model_dir(bad)
    assert dataset_splits({"split": "test", "calibration_split": "validation"}) == ["test", "validation"]
    assert dataset_splits({"split": "test", "calibration_split": None}) == ["test"]
    assert dataset_splits({"split": "test", "calibration_split": "test"}) == ["test"]


# --- datasets: real `datasets` code on local split files ------------------------------------------

TEST_TEXTS = ["The first test document.", "A second one, longer than the first.", "Third."]
VALIDATION_TEXTS = ["Validation one.", "Validation two."]


@pytest.fixture
def hub_like_dataset(tmp_path):
    """A folder that `datasets.load_dataset(folder, split=...)` reads like a hub repository of splits."""
    folder = tmp_path / "hub_dataset"
    folder.mkdir()
    pd.DataFrame({"page": TEST_TEXTS}).to_json(folder / "test.jsonl", orient="records", lines=True)
    pd.DataFrame({"page": VALIDATION_TEXTS}).to_json(folder / "validation.jsonl", orient="records", lines=True)
    return {"source": "hub", "path": str(folder), "name": None, "split": "test", "calibration_split": "validation",
            "text_column": "page"}


def test_dataset_download_then_load_offline(hub_like_dataset, tmp_path):
    dest = tmp_path / "resources" / "datasets" / "wiki"
    download_dataset(hub_like_dataset, dest)
    marker = json.loads((dest / "download.json").read_text())
    assert marker == {"kind": "dataset", "path": hub_like_dataset["path"], "name": None,
                      "rows": {"test": 3, "validation": 2}}
    assert not list(dest.parent.glob(".*.tmp")), "no temporary directory left behind"
    # The source disappears (as the hub does on an offline node): the copy alone must serve both splits.
    shutil.rmtree(hub_like_dataset["path"])
    spec = {**hub_like_dataset, "download_dir": str(dest)}
    assert load_texts(spec, 3) == TEST_TEXTS
    assert load_texts({**spec, "split": "validation"}, 2) == VALIDATION_TEXTS


def test_missing_dataset_copy_names_what_to_fetch(hub_like_dataset, tmp_path):
    spec = {**hub_like_dataset, "path": "EleutherAI/lambada_openai", "name": "default",
            "download_dir": str(tmp_path / "resources/datasets/lambada")}
    with pytest.raises(ResourceMissingError) as info:
        load_texts(spec, 3)
    message = str(info.value)
    assert "dataset 'EleutherAI/lambada_openai' (config 'default', split 'test') is not in" in message
    assert "resources/datasets/lambada/" in message and "snakemake download" in message


def test_dataset_copy_of_another_dataset_or_split_is_refused(hub_like_dataset, tmp_path):
    dest = tmp_path / "copy"
    download_dataset({**hub_like_dataset, "calibration_split": None}, dest)
    with pytest.raises(ResourceMissingError, match="has the splits test only"):
        load_texts({**hub_like_dataset, "split": "validation", "download_dir": str(dest)}, 1)
    with pytest.raises(ResourceMissingError, match="holds dataset .* not dataset 'other/data'"):
        load_texts({**hub_like_dataset, "path": "other/data", "download_dir": str(dest)}, 1)


def test_failed_dataset_download_is_one_clear_line(tmp_path):
    spec = {"source": "hub", "path": str(tmp_path / "does_not_exist"), "name": None, "split": "test"}
    with pytest.raises(DownloadError, match=r"dataset '.*does_not_exist' \(config None, split 'test'\)"):
        download_dataset(spec, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_hub_dataset_without_copy_offline_gives_dataset_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True, raising=False)
    spec = {"source": "hub", "path": "routelab-tests/no-such-dataset", "name": None, "split": "test"}
    with pytest.raises(DatasetError, match="could not load hub dataset 'routelab-tests/no-such-dataset'.*snakemake "
                                           "download"):
        load_texts(spec, 1)


# --- models: the hub call replaced, the rest real -------------------------------------------------

def fake_snapshot_download(source_dir, calls):
    """Stands in for huggingface_hub.snapshot_download: copies the files a pattern allows into local_dir."""
    from fnmatch import fnmatch

    def snapshot_download(repo_id, *, revision=None, local_dir=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": allow_patterns})
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for path in Path(source_dir).iterdir():
            if any(fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, Path(local_dir) / path.name)
        (Path(local_dir) / ".cache").mkdir(exist_ok=True)  # the client's bookkeeping
        return str(local_dir)

    return snapshot_download


@pytest.fixture
def tiny_repo(tiny_olmoe_dir, tmp_path):
    """The tiny model plus a tokenizer, laid out like a hub repository."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    repo = tmp_path / "repo"
    shutil.copytree(tiny_olmoe_dir, repo)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1},
                                                                                     unk_token="<unk>")))
    tokenizer.save_pretrained(repo)
    (repo / "flax_model.msgpack").write_bytes(b"not wanted")
    return repo


def test_model_download_saves_a_loadable_copy(tiny_repo, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download(tiny_repo, calls))
    dest = tmp_path / "resources" / "models" / "owner" / "tiny"
    download_model("owner/tiny", dest, revision="v1")
    assert calls == [{"repo_id": "owner/tiny", "revision": "v1", "allow_patterns": resources.MODEL_FILES}]
    marker = json.loads((dest / "download.json").read_text())
    assert marker["id"] == "owner/tiny" and marker["revision"] == "v1"
    assert "model.safetensors" in marker["files"] and "config.json" in marker["files"]
    assert not (dest / "flax_model.msgpack").exists() and not (dest / ".cache").exists()
    model = load_model(dest, device="cpu")
    assert model.config.model_type == "olmoe"
    assert load_tokenizer(dest).convert_tokens_to_ids("a") == 0


def test_failed_model_download_leaves_nothing(tmp_path, monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    dest = tmp_path / "resources" / "models" / "allenai" / "OLMoE-1B-7B-0924"
    with pytest.raises(DownloadError, match="model 'allenai/OLMoE-1B-7B-0924' is not in the local cache and the hub "
                                            "cannot be reached.*HF_HUB_OFFLINE=0"):
        download_model(OLMOE, dest)
    assert not dest.exists() and not list(dest.parent.iterdir())


def test_missing_model_copy_names_what_to_fetch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ResourceMissingError, match=r"model directory resources/models/allenai/OLMoE-1B-7B-0924/ "
                                                   r"does not exist: run `snakemake download`"):
        load_model(str(model_dir(OLMOE)), device="cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(ResourceMissingError, match="half/ has no config.json"):
        load_tokenizer("half")


def test_hub_model_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    # The real transformers code path with the hub switched off: no network call is made.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    code = ("from routelab.model.loading import load_model\n"
            "load_model('routelab-tests/no-such-model', device='cpu')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("routelab.download.ResourceMissingError: model 'routelab-tests/no-such-model' could "
                           "not be loaded from the hub or its local cache"), last
    assert "resources/models/routelab-tests/no-such-model/" in last and "snakemake download" in last
    assert "HF_HUB_OFFLINE=0" in last
    # one traceback (ours), not a chain of hub ones
    assert result.stderr.count("Traceback") == 1


# --- the workflow: downloads come first, the demo is untouched -----------------------------------

def dry_run(workdir: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("checkout")
    shutil.copy(REPO / "Snakefile", workdir)
    for folder in ("workflow", "config"):
        shutil.copytree(REPO / folder, workdir / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return workdir


def jobs(output: str) -> list[tuple[str, str, str]]:
    """(rule, input, output) of each job of a dry-run listing, in the order Snakemake would run them."""
    found = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", output):
        match = re.match(r"(?:local)?rule (\w+):", block.strip())
        if match:
            inputs = re.search(r"input: (.*)", block)
            outputs = re.search(r"output: (.*)", block)
            found.append((match.group(1), inputs.group(1) if inputs else "", outputs.group(1) if outputs else ""))
    return found


def test_olmoe_config_downloads_before_model_jobs(checkout):
    listing = jobs(dry_run(checkout, "--configfile", "config/olmoe.yaml"))
    rules = [rule for rule, _, _ in listing]
    model = "resources/models/allenai/OLMoE-1B-7B-0924"
    assert rules.count("download_model") == 1 and rules.count("download_dataset") == 2
    last_download = max(i for i, rule in enumerate(rules) if rule.startswith("download_"))
    model_jobs = ("prepare_dataset", "collect_router_logits", "route")
    first_model_job = min(i for i, rule in enumerate(rules) if rule in model_jobs)
    assert last_download < first_model_job
    for rule, inputs, _ in listing:
        if rule in ("prepare_dataset", "collect_router_logits", "route"):
            assert model in inputs, (rule, inputs)
        if rule == "prepare_dataset":
            assert re.search(r"resources/datasets/(wikitext|lambada)", inputs), inputs
    # `snakemake download` fetches exactly the resources and nothing else
    only = [rule for rule, _, _ in jobs(dry_run(checkout, "download", "--configfile", "config/olmoe.yaml"))]
    assert sorted(only) == ["download", "download_dataset", "download_dataset", "download_model"]


def test_demo_needs_no_download(checkout):
    rules = {rule for rule, _, _ in jobs(dry_run(checkout))}
    assert "train_demo_model" in rules and not any(rule.startswith("download") for rule in rules)
