"""lm-evaluation-harness tasks through a routed model: lm-eval builds the requests, runs them on the
patched model and scores them; routelab records every forward pass it makes.

:func:`evaluate_task` runs ``simple_evaluate`` with an HFLM wrapped around the already loaded (and
patched) model, without lm-eval's request cache (it does not know the router). :class:`RoutedLM`'s only
addition to HFLM names each forward's rows for the recording: the request (its ordinal among the run's
requests) and the document, and the real tokens of lm-eval's right-padded scoring batches.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import numpy as np
import pandas as pd
import torch

from routelab.data.tasks import TaskError, task_data, task_manager
from routelab.run.generation import ForwardLog

log = logging.getLogger(__name__)


@functools.cache
def routed_lm_class() -> type:
    """:class:`RoutedLM`, defined on first use: importing lm-eval's HFLM takes seconds, paid only by runs of
    lm-eval tasks."""
    from lm_eval.models.huggingface import HFLM

    class RoutedLM(HFLM):
        """HFLM on a loaded model whose forwards :class:`~routelab.run.generation.ForwardLog` records
        (``forwards``), each row named by its request."""

        def __init__(self, *args: Any, forwards: ForwardLog, doc_ids: dict[tuple[str, int], int] | None = None,
                     **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.forwards = forwards
            self.doc_ids = doc_ids  # (task, lm-eval doc id) -> the prepared dataset's doc_id; None: lm-eval's
            self.requests_before = 0  # requests of earlier request types: ids stay unique in a run
            self._owners: dict[tuple[int, ...], tuple[int, int]] = {}
            self._instances: list = []

        def _begin(self, requests: list) -> None:
            self._instances = list(requests)

        def _end(self) -> None:
            self.requests_before += len(self._instances)
            self._instances, self._owners = [], {}

        def _owner(self, index: int) -> tuple[int, int]:
            instance = self._instances[index]
            doc = int(instance.doc_id) if self.doc_ids is None else self.doc_ids[(instance.task_name, instance.doc_id)]
            return self.requests_before + index, doc

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._begin(requests)
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._end()

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise TaskError("lm-eval's loglikelihood_rolling tasks (perplexity on documents) are not run through "
                            "lm-eval: give the same data as a `source: hub` or `files` dataset, whose word / byte "
                            "perplexity routelab computes as lm-eval does")

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            # the inputs lm-eval will feed for each request (HFLM._loglikelihood_tokens' own truncation)
            for index, (_, context, continuation) in enumerate(requests):
                key = tuple((context + continuation)[-(self.max_length + 1):][:-1])
                self._owners.setdefault(key, self._owner(index))
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None):
            rows = [self._row_owner(row) for row in inps.tolist()]
            lengths = torch.tensor([length for length, _ in rows])
            mask = torch.arange(inps.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            self.forwards.rows([owner[0] for _, owner in rows], [owner[1] for _, owner in rows], mask.to(inps.device))
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _row_owner(self, row: list[int]) -> tuple[int, tuple[int, int]]:
            """``(real length, owner)`` of one right-padded row (lm-eval pads with 0, a real token id too)."""
            padding = len(row) - len(np.trim_zeros(np.asarray(row), "b"))
            for length in range(len(row), len(row) - padding - 1, -1):
                owner = self._owners.get(tuple(row[:length]))
                if owner is not None:
                    return length, owner
            raise AssertionError("a forward of lm-eval's whose input is none of the requests'")

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._begin(requests)
            contexts = [request.args[0] for request in requests]
            for index, context in enumerate(contexts):
                self._owners.setdefault(tuple(self.tok_encode(context)), self._owner(index))
            try:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            finally:
                self._end()

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
            mask = generation_kwargs.get("attention_mask")
            prompts = list(context) if mask is None else [row[real.bool()] for row, real in zip(context, mask)]
            owners = [self._prompt_owner(prompt) for prompt in prompts]
            self.forwards.rows([o[0] for o in owners], [o[1] for o in owners])
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

        def _prompt_owner(self, tokens: torch.Tensor) -> tuple[int, int]:
            key = tuple(tokens.tolist())
            if key in self._owners:
                return self._owners[key]
            # a prompt lm-eval left-truncated to leave room for the generation: the request it ends
            ends = [owner for full, owner in self._owners.items() if full[-len(key):] == key]
            assert ends, "a prompt of lm-eval's that is none of the requests'"
            return ends[0]

    return RoutedLM


def evaluate_task(model, tokenizer, spec: dict[str, Any], forwards: ForwardLog, batch_size: int,
                  seed: int = 0, documents: pd.DataFrame | None = None) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``spec``'s task on ``model`` (already patched), recording each
    forward into ``forwards``: lm-eval's results dict, with ``samples`` logged. ``documents``: the prepared
    dataset's (``doc_id, task, task_doc_id``), whose doc ids the recording names; None: lm-eval's doc ids."""
    from lm_eval import simple_evaluate

    doc_ids = None if documents is None else {(row.task, int(row.task_doc_id)): int(row.doc_id)
                                              for row in documents.itertuples(index=False)}
    lm = routed_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, forwards=forwards,
                           doc_ids=doc_ids,
                           **({} if spec.get("add_bos_token") is None else {"add_bos_token": spec["add_bos_token"]}))
    options = {key: value for key, value in spec["options"].items() if key != "metadata"}  # the TaskManager's
    with task_data(), _without_env_info():
        manager = task_manager(spec)
        with forwards.attach(model):
            results = simple_evaluate(
                model=lm, tasks=[spec["task"]], task_manager=manager, num_fewshot=spec["num_fewshot"],
                limit=spec["limit"], fewshot_random_seed=spec["fewshot_seed"], random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, log_samples=True, cache_requests=False,
                use_cache=None, **options)
    return results


@contextlib.contextmanager
def _without_env_info():
    """``simple_evaluate`` without ``add_env_info``: it runs torch's collect_env (pip and conda in
    subprocesses, ~0.7 s a task) for results keys that task_metrics drops; provenance.json and
    system.json record the environment instead."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda storage: None
    try:
        yield
    finally:
        lm_eval.evaluator.add_env_info = original


def task_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """``metrics.json``'s lm-eval part: each task's (and group's) metrics and stderr as lm-eval reports
    them (``"acc,none"``, ``"acc_stderr,none"``), their direction, sample counts and task versions."""
    keep = ("results", "groups", "higher_is_better", "n-samples", "versions", "n-shot", "configs")
    out = {key: results[key] for key in keep if key in results}
    out["configs"] = {name: {k: v for k, v in config.items() if k in ("task", "output_type", "num_fewshot",
                                                                        "metric_list", "generation_kwargs")}
                      for name, config in out.get("configs", {}).items()}
    return _plain(out)


def headline_metrics(lm_eval: dict[str, Any], task: str) -> dict[str, Any]:
    """The task's (or group's) own metrics from lm-eval's results, as flat numbers: ``acc`` for lm-eval's
    ``"acc,none"`` (the unfiltered score), ``"exact_match,strict-match"`` keeps its filter; stderr
    keys as ``acc_stderr``."""
    reported = lm_eval.get("groups", {}).get(task) or lm_eval["results"][task]
    out = {}
    for key, value in reported.items():
        if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, _, kind = key.partition(",")
        out[metric if kind == "none" else key] = value
    return out


def primary_metric(info: dict[str, Any], headline: dict[str, Any]) -> tuple[str, bool]:
    """The metric the report compares an lm-eval dataset on: the first metric of its (first) task that
    lm-eval reported, and whether higher is better."""
    for task in info["tasks"].values():
        for metric, higher in task["higher_is_better"].items():
            if metric in headline:
                return metric, higher
    raise ValueError(f"lm-eval reported none of the metrics of task {info['lm_eval_task']!r}: {sorted(headline)}")


def _plain(value: Any) -> Any:
    """JSON-ready: numpy scalars to Python, the rest unchanged (lm-eval reports ``"N/A"`` stderr as text)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def sample_scores(results: dict[str, Any], documents: pd.DataFrame) -> pd.DataFrame:
    """``scores.parquet`` of an lm-eval dataset: one row per document with ``doc_id`` (the prepared
    dataset's), ``task``, ``task_doc_id`` (lm-eval's) and each metric's per-sample value as lm-eval
    computed it: a column per metric (``acc``) for lm-eval's unfiltered responses, ``metric,filter``
    (``exact_match,strict-match``) for a filter's; NaN where a task lacks the metric."""
    doc_ids = {(row.task, row.task_doc_id): row.doc_id for row in documents.itertuples(index=False)}
    rows: dict[int, dict[str, Any]] = {}
    for task, samples in results.get("samples", {}).items():
        metrics = list(results["higher_is_better"].get(task, {}))
        for sample in samples:
            key = (task, int(sample["doc_id"]))
            if key not in doc_ids:
                raise AssertionError(f"lm-eval scored document {key} that the prepared dataset does not list")
            row = rows.setdefault(doc_ids[key], {"doc_id": doc_ids[key], "task": task, "task_doc_id": key[1]})
            suffix = "" if sample.get("filter", "none") == "none" else f",{sample['filter']}"
            row.update({f"{name}{suffix}": float(sample[name]) for name in metrics if _is_number(sample.get(name))})
    return pd.DataFrame([rows[doc_id] for doc_id in sorted(rows)])


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | bool | np.number)
