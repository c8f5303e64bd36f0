"""Local copies of hub models and datasets under ``resources/``, so GPU jobs need no internet.

The ``download`` rules (``workflow/rules/download.smk``, local jobs) fetch, before any job that runs
the model:

- the configured hub model (weights, config, tokenizer) with ``huggingface_hub.snapshot_download``
  into ``resources/models/<hub id>/`` (a ``save_pretrained``-style directory that
  ``AutoModelForCausalLM`` / ``AutoTokenizer`` load from disk);
- every hub dataset, each split the config uses (``split`` and ``calibration_split``), loaded with
  ``datasets.load_dataset(path, name, split=...)`` and saved with ``save_to_disk`` into
  ``resources/datasets/<dataset name>/<split>/``.

Each directory carries ``download.json`` (what was fetched, from where) and appears atomically.
Later stages read only these directories; a missing one gives a :class:`ResourceMissingError` that
says what to fetch and how, instead of a stack of hub tracebacks.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from routelab.io.files import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

RESOURCES = Path("resources")
MARKER = "download.json"
# Weights, configs and tokenizer files; not other frameworks' weights (flax, tf, onnx, gguf) or originals.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "tokenizer*", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")

HOW_TO_FETCH = ("run `snakemake download` (with the same --configfile) on a machine with internet access; "
                "it saves models to resources/models/ and datasets to resources/datasets/")


class ResourceMissingError(FileNotFoundError):
    """A model or dataset the run needs is not available locally (and cannot be fetched here)."""


class DownloadError(RuntimeError):
    """Fetching from the hub failed."""


def check_hub_id(model_id: str) -> str:
    """``model_id`` if it looks like a hub repository id (``name`` or ``owner/name``), else a ValueError."""
    if not isinstance(model_id, str) or not _HUB_ID.match(model_id) or ".." in model_id:
        raise ValueError(f"model.id: {model_id!r} is not a Hugging Face hub id ('owner/name'), 'demo', or an "
                         "existing local directory")
    return model_id


def is_hub_model(model_id: str) -> bool:
    """True for a hub id; False for ``demo`` and for an existing local directory."""
    return model_id != "demo" and not Path(model_id).is_dir()


def model_dir(model_id: str, root: str | os.PathLike = RESOURCES) -> Path:
    """Where the local copy of hub model ``model_id`` lives: ``root/models/<owner>/<name>``."""
    return Path(root) / "models" / check_hub_id(model_id)


def dataset_dir(name: str, root: str | os.PathLike = RESOURCES) -> Path:
    """Where the local copy of the config's dataset ``name`` lives: ``root/datasets/<name>``."""
    return Path(root) / "datasets" / name


def dataset_splits(spec: dict[str, Any]) -> list[str]:
    """The splits of a hub dataset the pipeline reads: ``split`` (default test) and ``calibration_split``."""
    splits = [spec.get("split") or "test"]
    if spec.get("calibration_split") and spec["calibration_split"] not in splits:
        splits.append(spec["calibration_split"])
    return splits


def _hub_failure(what: str, exc: BaseException) -> str:
    """One line on why the hub could not deliver ``what``, without its traceback."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, (OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return (f"{what} is not in the local cache and the hub cannot be reached (offline mode is on or there is "
                "no network): download it on a machine with internet access, or set HF_HUB_OFFLINE=0")
    if isinstance(exc, GatedRepoError):
        return f"{what} is gated: accept its terms on huggingface.co and log in (`hf auth login`)"
    if isinstance(exc, RepositoryNotFoundError):
        return f"{what} does not exist on the hub (or is private): check the id"
    if isinstance(exc, RevisionNotFoundError):
        return f"{what}: the revision does not exist: check model.revision"
    return f"{what} could not be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def download_model(model_id: str, dest: str | os.PathLike, revision: str | None = None) -> Path:
    """Fetch hub model ``model_id`` (weights, config, tokenizer) into ``dest``, atomically."""
    from huggingface_hub import snapshot_download

    check_hub_id(model_id)
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        try:
            snapshot_download(model_id, revision=revision, local_dir=tmp, allow_patterns=MODEL_FILES)
            if not any(tmp.glob("*.safetensors")):  # an older repository with PyTorch pickles only
                snapshot_download(model_id, revision=revision, local_dir=tmp, allow_patterns=["*.bin"])
        except Exception as exc:  # the hub raises many types; _hub_failure names the cause
            raise DownloadError(_hub_failure(f"model {model_id!r}", exc)) from exc
        if not (tmp / "config.json").is_file():
            raise DownloadError(f"model {model_id!r}: the download has no config.json; is it a transformers model?")
        # snapshot_download's own bookkeeping (.cache/) is not part of the model
        for cache in tmp.glob(".cache"):
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        write_json(tmp / MARKER, {"kind": "model", "id": model_id, "revision": revision,
                                  "files": sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())})
    log.info("model %s saved to %s", model_id, dest)
    return dest


def download_dataset(spec: dict[str, Any], dest: str | os.PathLike) -> Path:
    """Fetch each split :func:`dataset_splits` lists of the hub dataset ``spec`` into ``dest/<split>/``
    (``save_to_disk``), atomically. ``spec``: the config's dataset entry (``path``, ``name``, ``split``,
    ``calibration_split``)."""
    import datasets

    if spec.get("source") != "hub" or not spec.get("path"):
        raise ValueError(f"download_dataset: {spec!r} is not a hub dataset (source: hub with a path)")
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        rows = {}
        for split in dataset_splits(spec):
            what = f"dataset {spec['path']!r} (config {spec.get('name')!r}, split {split!r})"
            try:
                dataset = datasets.load_dataset(spec["path"], spec.get("name"), split=split)
            except Exception as exc:  # the hub raises many types; _hub_failure names the cause
                raise DownloadError(_hub_failure(what, exc)) from exc
            dataset.save_to_disk(str(tmp / split))
            rows[split] = dataset.num_rows
        write_json(tmp / MARKER, {"kind": "dataset", "path": spec["path"], "name": spec.get("name"), "rows": rows})
    log.info("dataset %s (%s) saved to %s: %s", spec["path"], spec.get("name"), dest, rows)
    return dest


def load_dataset_copy(spec: dict[str, Any], directory: str | os.PathLike, split: str) -> Any:
    """The split ``split`` of the local copy of hub dataset ``spec`` in ``directory`` (a ``datasets.Dataset``).

    Raises :class:`ResourceMissingError` naming the dataset, the split and how to fetch it when the copy
    is absent, holds another dataset, or lacks the split.
    """
    import datasets

    directory = Path(directory)
    what = f"dataset {spec.get('path')!r} (config {spec.get('name')!r}, split {split!r})"
    marker = directory / MARKER
    if not marker.is_file():
        raise ResourceMissingError(f"{what} is not in {directory}/: {HOW_TO_FETCH}")
    saved = read_json(marker)
    if (saved.get("path"), saved.get("name")) != (spec.get("path"), spec.get("name")):
        raise ResourceMissingError(f"{directory}/ holds dataset {saved.get('path')!r} (config {saved.get('name')!r}), "
                                   f"not {what}: {HOW_TO_FETCH}")
    if not (directory / split).is_dir():
        raise ResourceMissingError(f"{what}: {directory}/ has the splits {', '.join(saved.get('rows', {}))} only: "
                                   f"{HOW_TO_FETCH}")
    return datasets.load_from_disk(str(directory / split))


def check_model_path(path: str | os.PathLike) -> str:
    """``path`` as text when it is a model directory or a hub id; a :class:`ResourceMissingError` for a
    path (``resources/...``, absolute, relative with ``./``) that does not exist or lacks ``config.json``."""
    text = str(path)
    if Path(text).is_dir():
        if not (Path(text) / "config.json").is_file():
            raise ResourceMissingError(f"model directory {text}/ has no config.json (an interrupted copy?): "
                                       f"{HOW_TO_FETCH}")
        return text
    if text.startswith((f"{RESOURCES}/", "/", "./", "../")) or not _HUB_ID.match(text):
        raise ResourceMissingError(f"model directory {text}/ does not exist: {HOW_TO_FETCH}")
    return text


def model_not_available(model_id: str, exc: BaseException) -> ResourceMissingError:
    """The error for hub model ``model_id`` failing to load (not cached, hub unreachable, unknown id)."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ResourceMissingError(
        f"model {model_id!r} could not be loaded from the hub or its local cache ({first_line}). For a local "
        f"copy in {model_dir(model_id)}/, {HOW_TO_FETCH}; or fill the hub cache on a machine with internet "
        "(`hf download " + model_id + "`), or set HF_HUB_OFFLINE=0 if this machine has internet access")
