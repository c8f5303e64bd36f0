"""lm-evaluation-harness tasks as datasets (``source: lm_eval``): finding a task, reading its data offline.

A dataset entry names a task or group (``task``), optionally a folder of the user's own task YAMLs
(``include_path``), and how lm-eval runs it (``num_fewshot``, ``limit``, ``fewshot_seed``, ``options``
for ``simple_evaluate``). lm-eval itself builds the requests and scores them in the route job
(:mod:`routelab.run.tasks`); preparing such a dataset checks, before any model runs, that lm-eval knows
the task and that its data loads from the local copies (``resources/lm_eval/``, filled by
``snakemake download``), and writes one row per evaluated document.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from routelab.download import RESOURCES

log = logging.getLogger(__name__)

TASK_CACHE = RESOURCES / "lm_eval"
# What a `source: lm_eval` entry means when it leaves a key out (the schema fills these for configs).
TASK_DEFAULTS = {"include_path": None, "num_fewshot": None, "limit": None, "fewshot_seed": 1234, "options": {},
                 "generates": None, "add_bos_token": None}
# simple_evaluate's keyword arguments a dataset entry may set under `options` (the rest are routelab's:
# the model, the tasks, the request cache, which routelab never shares between routing configs).
SIMPLE_EVALUATE_OPTIONS = ("system_instruction", "apply_chat_template", "fewshot_as_multiturn", "gen_kwargs",
                           "bootstrap_iters", "confirm_run_unsafe_code", "metadata")
HOW_TO_FETCH_TASK = ("run `snakemake download` (with the same --configfile) on a machine with internet access; "
                     f"it caches the task's data under {TASK_CACHE}/")


class TaskError(ValueError):
    """An lm-eval task that cannot be run as configured."""


def task_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with the defaults of a ``source: lm_eval`` entry and only its keys (the schema's defaults
    for text datasets do not apply), its ``options`` checked."""
    spec = {key: value for key, value in {**TASK_DEFAULTS, **spec}.items() if key in (*TASK_DEFAULTS, "source", "task")}
    unknown = sorted(set(spec["options"]) - set(SIMPLE_EVALUATE_OPTIONS))
    if unknown:
        raise TaskError(f"options: {', '.join(unknown)} not valid for an lm-eval task; routelab passes "
                        f"these options to lm-eval's simple_evaluate: {', '.join(SIMPLE_EVALUATE_OPTIONS)}")
    return spec


@contextlib.contextmanager
def task_data(cache: str | os.PathLike = TASK_CACHE, offline: bool = True) -> Iterator[Path]:
    """Inside the block, the hub and ``datasets`` read (and, online, write) task data under ``cache``
    and, ``offline``, never reach the network. The libraries read these settings at import, so both
    the environment and their module constants are set, then restored."""
    import datasets
    import huggingface_hub.constants as hub

    cache = Path(cache).resolve()
    env = {"HF_DATASETS_CACHE": str(cache / "datasets"), "HF_HUB_CACHE": str(cache / "hub")}
    constants = [(datasets.config, "HF_DATASETS_CACHE", cache / "datasets"), (hub, "HF_HUB_CACHE", str(cache / "hub"))]
    if offline:
        env |= {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        constants += [(datasets.config, "HF_DATASETS_OFFLINE", True), (datasets.config, "HF_HUB_OFFLINE", True),
                      (hub, "HF_HUB_OFFLINE", True)]
    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.dict(os.environ, env))
        for module, name, value in constants:
            patches.enter_context(mock.patch.object(module, name, value))
        yield cache


def task_manager(spec: dict[str, Any]):
    """lm-eval's ``TaskManager`` for ``spec``: the tasks of ``include_path`` alone when the task is
    among them (indexing lm-eval's own ~15k task files takes ~10 s), else those and lm-eval's; with the
    entry's ``options.metadata`` (e.g. a task's ``max_seq_lengths``, or the demo tasks' ``documents``)."""
    from lm_eval.tasks import TaskManager

    include = spec.get("include_path")
    # lm-eval merges metadata into the task configs where the TaskManager loads them (simple_evaluate's own
    # metadata argument is ignored when it is given a TaskManager)
    metadata = spec.get("options", {}).get("metadata")
    if include is not None:
        if not Path(include).is_dir():
            raise TaskError(f"include_path: {include} is not a folder of lm-eval task YAMLs")
        local = TaskManager(include_path=str(include), include_defaults=False, metadata=metadata)
        if spec["task"] in local.all_tasks:
            return local
    manager = TaskManager(include_path=None if include is None else str(include), metadata=metadata)
    if spec["task"] not in manager.all_tasks:
        where = "lm-eval's tasks" + ("" if include is None else f" or the task YAMLs of {include}")
        raise TaskError(f"task: {spec['task']!r} is not among {where}; `lm-eval ls tasks` lists lm-eval's "
                        "(a task YAML of your own goes into a folder given as include_path)")
    return manager


def load_tasks(spec: dict[str, Any], manager=None) -> dict[str, Any]:
    """``{task name: lm-eval Task}`` of every task ``spec``'s task or group runs, their data loaded from
    the local copies (inside :func:`task_data`); a task whose data is not there raises :class:`TaskError`
    naming it and how to fetch it."""
    manager = manager or task_manager(spec)
    try:
        return dict(manager.load([spec["task"]])["tasks"])
    except Exception as exc:  # datasets / the hub raise many types; all mean "could not read the data"
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TaskError(f"task: the data of lm-eval task {spec['task']!r} is not available offline ({first_line}); "
                        f"{HOW_TO_FETCH_TASK}") from None


def task_documents(tasks: dict[str, Any], limit: int | float | None) -> list[dict[str, Any]]:
    """One row per document lm-eval evaluates (``limit``: the first n, or a fraction, as lm-eval takes
    them): ``task, doc_id, text`` (the document's prompt without few-shot examples)."""
    from lm_eval.evaluator_utils import get_sample_size

    rows = []
    for name, task in sorted(tasks.items()):
        docs = list(task.eval_docs)
        count = get_sample_size(task, limit)
        for doc_id, doc in enumerate(docs[:count] if count is not None else docs):
            text = task.doc_to_text(doc)
            rows.append({"task": name, "doc_id": doc_id, "text": text if isinstance(text, str) else str(text)})
    return rows


def task_info(spec: dict[str, Any], tasks: dict[str, Any], documents: list[dict[str, Any]]) -> dict[str, Any]:
    """What info.json says of an lm-eval dataset: per task its output type, metrics with their direction,
    and documents; whether any task generates (a teacher-forced routing rule cannot run those)."""
    per_task = {}
    for name, task in sorted(tasks.items()):
        per_task[name] = {"output_type": task.OUTPUT_TYPE,
                          "higher_is_better": {m: bool(v) for m, v in task.higher_is_better().items()},
                          "documents": sum(row["task"] == name for row in documents),
                          "version": task.VERSION}
    return {"spec": spec, "task": "lm_eval", "lm_eval_task": spec["task"], "tasks": per_task,
            "generates": any(t["output_type"] == "generate_until" for t in per_task.values()),
            "documents": len(documents)}


def prepare_task(spec: dict[str, Any], out: str | os.PathLike, cache: str | os.PathLike = TASK_CACHE) -> dict[str, Any]:
    """Prepare an lm-eval dataset into ``out``: ``documents.parquet`` (``doc_id`` over all its tasks, ``task``,
    ``task_doc_id``: lm-eval's doc id, ``text``), empty ``windows.parquet`` / ``calibration.parquet`` (lm-eval
    makes the requests in the route job) and ``info.json``; returns info.json's content."""
    import pandas as pd

    from routelab.io.files import write_json, write_parquet

    spec = task_spec(spec)
    with task_data(cache):
        tasks = load_tasks(spec)
        rows = task_documents(tasks, spec["limit"])
    documents = pd.DataFrame([{"doc_id": i, "task": row["task"], "task_doc_id": row["doc_id"], "text": row["text"]}
                              for i, row in enumerate(rows)], columns=["doc_id", "task", "task_doc_id", "text"])
    empty = pd.DataFrame({"window_id": pd.Series(dtype="int64"), "doc_id": pd.Series(dtype="int64"),
                          "input_ids": pd.Series(dtype=object), "labels": pd.Series(dtype=object)})
    out = Path(out)
    write_parquet(out / "documents.parquet", documents)
    write_parquet(out / "windows.parquet", empty)
    write_parquet(out / "calibration.parquet", empty)
    info = task_info(spec, tasks, rows)
    write_json(out / "info.json", info)
    log.info("lm-eval task %s: %s", spec["task"], {name: t["documents"] for name, t in info["tasks"].items()})
    return info


def download_task(spec: dict[str, Any], marker: str | os.PathLike, cache: str | os.PathLike = TASK_CACHE) -> Path:
    """Fetch the data of every task ``spec``'s task or group runs into ``cache`` (lm-eval loads it, through
    ``datasets``, with the network allowed), then write ``marker``: the tasks and their documents. The
    route jobs read the copies with the network off (:func:`task_data`)."""
    from routelab.io.files import write_json

    spec = task_spec(spec)
    with task_data(cache, offline=False):
        tasks = load_tasks(spec)
        documents = task_documents(tasks, spec["limit"])
    write_json(marker, {"spec": spec, "cache": str(cache),
                        "tasks": {name: sum(row["task"] == name for row in documents) for name in sorted(tasks)}})
    return Path(marker)
