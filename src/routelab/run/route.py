"""Stage route: one routing config on one dataset, evaluated and recorded (the pipeline's GPU job).

:func:`run_route` takes a :class:`RouteJob` (what ``workflow/scripts/route.py`` parses its arguments
into) and writes into ``job.out``:

- ``metrics.json``     quality (token / word / byte perplexity, bits per byte; cloze acc);
- ``summary.json``     routing statistics (experts selected mean/std/min/max, ceiling and floor hits,
                       p-value mean/std, per-layer statistics, k histogram, expert counts);
- ``routing.parquet``  every (token, layer) decision: k, expert ids, weights;
- ``decisions.parquet`` full detail for every n-th token (all logits and p-values, BH thresholds and
                       passing rank);
- ``explorer.parquet`` the same detail for every token of the first ``explorer_documents`` documents
                       (the report's token explorer);
- ``scores.parquet``   per-document log-likelihood, token / word / byte counts, correctness;
- ``system.json``      wall time, tokens/s, peak memory (process RSS, CUDA), device and experts kernel
                       (kept apart so metrics.json and summary.json are identical across reruns);
- ``provenance.json``  routing spec, model, versions, seed, a hash of everything that determines the run;
- ``tracking/``        the same as tracking files (:mod:`routelab.tracking`).

A prepared lm-eval task (``source: lm_eval``) is run by lm-eval's evaluator instead
(:mod:`routelab.run.tasks`): the same files, with lm-eval's metrics and per-sample scores (docs/tasks.md).

With ``shard`` (``I-of-N``) it evaluates only that shard's documents and writes the shard's part
(the three logs, ``scores.parquet``, ``accumulators.npz``, ``part.json``)
for the gather_shards job (:mod:`routelab.run.shards`). With ``checkpoint_every`` it saves completed
work every that many batches and a rerun resumes from it; an out-of-memory error exits for a retry
with a smaller batch, any other error makes retries fail at once (:mod:`routelab.run.resume`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import routelab
from routelab.config import normalise_routing
from routelab.data.prepare import load_lm_eval_tokenizer
from routelab.io.files import atomic_path, read_json, write_json, write_parquet
from routelab.io.parquet import concat_parquet
from routelab.model.families import MoEShape, moe_shape
from routelab.model.loading import ModelPlacement, input_device, load_tokenizer
from routelab.model.patching import install_router
from routelab.record import DecisionSampler, Recording, RoutingRecorder
from routelab.routing import Router, build_router, router_class
from routelab.routing.nulls import NULL_KINDS, fit_null, load_null
from routelab.run.calibration import load_softmax_logits
from routelab.run.evaluate import Stopwatch, document_scores, score_windows
from routelab.run.generation import ForwardLog, check_causal
from routelab.run.records import ROUTING_LOGS, run_metrics, run_summary, write_run_records
from routelab.run.resume import (
    PREVIOUS_EXIT_ENV,
    Checkpoint,
    choose_batch_size,
    chunk_batch_size,
    fingerprint,
    load_chunk_state,
    record_attempt,
    retry_guard,
    save_chunk_state,
)
from routelab.run.shards import select_shard
from routelab.run.tasks import evaluate_task, headline_metrics, primary_metric, sample_scores, task_metrics

log = logging.getLogger("route")


@dataclass(frozen=True)
class RouteJob:
    """Everything one route job is given. ``routing``: the routing config (defaults are filled in);
    ``null``: a ``null.npz`` from calibrate_null, a kind that needs no calibration (``gaussian``), or
    None for rules without a null; ``calibration_logits``: the ``router_logits.npz`` of
    collect_router_logits, for rules set up from the calibration split (``Router.uses_calibration``);
    ``batch_size``: windows per forward pass; ``checkpoint_every``:
    batches per saved chunk (0: one chunk); ``attempt``: Snakemake's attempt number; ``sample_every``:
    every n-th real token's detail goes to decisions.parquet (0: none); ``explorer_documents``: every token's
    detail of documents 0 .. n-1 goes to explorer.parquet, the report's token explorer; ``placement``: how the model
    is loaded and placed (checked when it is made, before any work); ``threads``: torch's CPU
    threads (None: torch's default)."""

    model: str
    data: Path
    routing: dict[str, Any]
    out: Path
    null: str | None = None
    calibration_logits: str | None = None
    batch_size: int = 16
    checkpoint_every: int = 0
    shard: str | None = None
    attempt: int = 1
    placement: ModelPlacement = field(default_factory=ModelPlacement)
    sample_every: int = 100
    explorer_documents: int = 3
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        for option, value, least in (("batch_size", self.batch_size, 1), ("checkpoint_every", self.checkpoint_every, 0),
                                     ("attempt", self.attempt, 1), ("sample_every", self.sample_every, 0),
                                     ("explorer_documents", self.explorer_documents, 0)):
            if value < least:
                raise ValueError(f"{option}: {value} is not valid; need an integer >= {least}")
        routing = normalise_routing(self.routing, "--routing")
        router_class(routing["method"]).check_values(routing)  # before any model is loaded
        object.__setattr__(self, "routing", routing)
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))


def run_route(job: RouteJob) -> None:
    """Run ``job``: resume from its checkpoint, evaluate and record, write the run's files (or the shard's
    part), then delete the checkpoint."""
    job.placement.pin()
    if job.threads:
        torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    info = read_json(job.data / "info.json")
    checkpoint = Checkpoint(job.out, checkpoint_key(job))
    saved = checkpoint.chunks()
    batch_size, why = choose_batch_size(checkpoint.root, chunk_batch_size(saved[-1]) if saved else None, job.batch_size,
                                        job.attempt, os.environ.get(PREVIOUS_EXIT_ENV))
    log.info("%s", why)
    job = replace(job, batch_size=batch_size)
    with retry_guard(checkpoint.failure_marker, job.attempt, job.batch_size):
        record_attempt(checkpoint.root, job.attempt, job.batch_size)
        _route(job, info, checkpoint)
    checkpoint.remove()


_loaded: dict[str, Any] = {}


def load_model_once(job: RouteJob):
    """``job``'s model, loaded once per process for the runs of one route job on several datasets
    (route_jobs: per_routing): install_router puts every module back as it was when a run ends, so the
    next run sees the model as loaded, and loading it again would only cost time."""
    key = repr((job.placement, str(job.model)))
    if key not in _loaded:
        _loaded.clear()  # one model at a time
        _loaded[key] = job.placement.load(job.model)
    return _loaded[key]


def checkpoint_key(job: RouteJob) -> dict[str, Any]:
    """Everything that determines the recorded rows (not the batch size: see routelab.run.resume)."""
    return {"routing": job.routing, "model": fingerprint(job.model), "dtype": job.placement.dtype,
            "device": job.placement.device, "experts_implementation": job.placement.experts_implementation,
            "null": fingerprint(job.null),
            "calibration_logits": fingerprint(job.calibration_logits),
            "windows": fingerprint(job.data / "windows.parquet"),
            "documents": fingerprint(job.data / "documents.parquet"),
            "seed": job.seed, "sample_every": job.sample_every, "explorer_documents": job.explorer_documents,
            "shard": job.shard, "routelab": routelab.__version__}


def make_router(job: RouteJob, shape: MoEShape) -> Router:
    """The configured router for a model of ``shape``, with its null loaded and checked against the model."""
    null = None
    if job.routing.get("null_model"):
        built = [name for name, kind in NULL_KINDS.items() if not kind.calibrated]
        if job.null is None:
            raise ValueError(f"--null: routing method {job.routing['method']!r} needs a null: a null.npz from "
                             f"calibrate_null, or one that needs no calibration ({', '.join(built)})")
        null = fit_null(job.null, None, shape.num_experts) if job.null in built else load_null(job.null)
        null.check_model(shape.num_layers, shape.num_experts)
    calibration = None
    if router_class(job.routing["method"]).uses_calibration(job.routing):
        if job.calibration_logits is None:
            raise ValueError(f"--calibration-logits: routing {job.routing['name']!r} fits its rule to the calibration "
                             "split; give the router_logits.npz of collect_router_logits")
        calibration = load_softmax_logits(job.calibration_logits)
    router = build_router(job.routing, shape.num_experts, shape.top_k, null, calibration)
    router.check_layers(shape.num_layers)
    return router


def make_recorders(job: RouteJob, shape: MoEShape, router: Router, chunk_dir: Path) -> list:
    """The recorders of one chunk, the routing log (with the running counts) first: it, the sampled
    detail log (whose tokens its p-value moments are over) and the explorer's documents' detail."""
    return [RoutingRecorder(shape.num_layers, shape.num_experts, router.min_k, router.max_k,
                            path=chunk_dir / "routing.parquet", pvalue_every=job.sample_every),
            DecisionSampler(chunk_dir / "decisions.parquet", shape.num_experts, job.sample_every,
                            alpha=router.bh_level),
            DecisionSampler(chunk_dir / "explorer.parquet", shape.num_experts, 0, alpha=router.bh_level,
                            documents=range(job.explorer_documents))]


def evaluate_in_chunks(job: RouteJob, model, shape: MoEShape, router: Router, pad_token_id: int,
                       windows: pd.DataFrame, checkpoint: Checkpoint, tokens_before: int) -> list:
    """Score and record ``windows`` in chunks of ``checkpoint_every`` batches, each saved to ``checkpoint``.

    Resumes after the saved chunks; returns all chunks, in order. ``tokens_before``: real tokens before
    the first window (a shard's offset), so every-n-th-token sampling matches an unsharded run.
    """
    device = input_device(model)
    chunks = checkpoint.open()
    state, tokens_seen, seconds = load_chunk_state(chunks[-1]) if chunks else (None, tokens_before, 0.0)
    done = chunks[-1].end if chunks else 0
    if done:
        log.info("resuming from the checkpoint %s: windows 0-%d of %d are done", checkpoint.dir, done, len(windows))
    size = job.checkpoint_every * job.batch_size or len(windows)
    for start in range(done, len(windows), size):
        end = min(start + size, len(windows))
        with checkpoint.write_chunk(start, end) as chunk_dir:
            recorders = make_recorders(job, shape, router, chunk_dir)
            if state is not None:
                recorders[0].load_state(state, device)
            recording = Recording(*recorders, tokens_seen=tokens_seen)
            with install_router(model, router, recording), Stopwatch() as clock:
                window_scores = score_windows(model, windows.iloc[start:end], job.batch_size, pad_token_id,
                                              recording, progress=size >= len(windows))
            recording.close()
            state, tokens_seen, seconds = recorders[0].state(), recording.tokens_seen, seconds + clock.seconds
            save_chunk_state(chunk_dir, state, tokens_seen, seconds, window_scores, job.batch_size)
        if size < len(windows):
            log.info("checkpoint: windows %d-%d of %d done (%.1f s so far)", start, end, len(windows), seconds)
    return checkpoint.chunks()


def _route(job: RouteJob, info: dict[str, Any], checkpoint: Checkpoint) -> None:
    if info["task"] == "lm_eval":
        _route_task(job, info, checkpoint)
        return
    windows, documents = pd.read_parquet(job.data / "windows.parquet"), pd.read_parquet(job.data / "documents.parquet")
    shard = {"tokens_before": 0}
    if job.shard:
        windows, shard = select_shard(windows, job.shard)
        log.info("shard %s: windows %d-%d, documents %d-%d", job.shard, *shard["windows"], *shard["documents"])
    if windows.empty:
        raise ValueError(f"--data: {job.data} has no evaluation windows")
    model = load_model_once(job)
    tokenizer = load_tokenizer(job.model)
    shape = moe_shape(model)
    router = make_router(job, shape)
    spec = job.routing
    log.info("routing %s on %s: %s (model top-k %d, norm_topk_prob %s; batch size %d)", spec["name"], job.data.name,
             router.describe(), shape.top_k, shape.norm_topk_prob, job.batch_size)

    chunks = evaluate_in_chunks(job, model, shape, router, tokenizer.pad_token_id or 0, windows, checkpoint,
                                shard["tokens_before"])
    state, _, seconds = load_chunk_state(chunks[-1])
    window_scores = pd.concat([pd.read_parquet(c.path / "window_scores.parquet") for c in chunks], ignore_index=True)
    scores = document_scores(window_scores, documents)
    system = system_record(job, model, windows, seconds)
    head = summary_head(job, router, shape)
    provenance = provenance_record(job, info, model, [(c.start, c.end, chunk_batch_size(c)) for c in chunks])
    out = job.out
    for name in ROUTING_LOGS:
        concat_parquet([c.path / name for c in chunks], out / name)
    write_parquet(out / "scores.parquet", scores)
    if job.shard:
        # A shard's part of the run; the gather_shards job merges the parts into the run's files.
        with atomic_path(out / "accumulators.npz") as tmp:
            np.savez(tmp, **state)
        write_json(out / "part.json", {**shard, "task": info["task"], "summary_head": head, "min_k": router.min_k,
                                       "max_k": router.max_k,
                                       "expert_flops_per_selection": shape.expert_flops_per_selection,
                                       "system": system, "provenance": provenance})
        return
    summary = run_summary(head, state, router.min_k, router.max_k, shape.expert_flops_per_selection)
    metrics = run_metrics(spec["name"], job.data.name, info["task"], scores)
    write_run_records(out, summary=summary, provenance=provenance, system=system, metrics=metrics,
                      k_hist=state["k_hist"])
    log.info("metrics %s", metrics)
    log.info("experts selected: mean %.3f std %.3f (min %d, max %d); ceiling %.1f%%, floor %.1f%%",
             summary["experts_mean"], summary["experts_std"], summary["experts_min"], summary["experts_max"],
             summary["ceiling_hit_rate"], summary["floor_hit_rate"])


def _route_task(job: RouteJob, info: dict[str, Any], checkpoint: Checkpoint) -> None:
    """An lm-eval dataset: lm-eval's evaluator on the routed model, every forward it makes recorded (in one
    piece: lm-eval's evaluation has no resumable chunks)."""
    if job.shard:
        raise ValueError(f"--shard: {job.shard}: an lm-eval task ({info['lm_eval_task']}) runs in one job; "
                         "remove `shards` from its dataset entry")
    if info["generates"]:
        check_causal(router_class(job.routing["method"]), f"lm-eval task {info['lm_eval_task']!r} (it generates)")
    model = load_model_once(job)
    # as lm-eval loads it from a path: add_bos_token set on the tokenizer, not only on its encode calls
    tokenizer = load_lm_eval_tokenizer(job.model, info["spec"]["add_bos_token"])
    shape = moe_shape(model)
    router = make_router(job, shape)
    spec = job.routing
    log.info("routing %s on lm-eval task %s: %s (batch size %d)", spec["name"], info["lm_eval_task"],
             router.describe(), job.batch_size)
    checkpoint.open()
    documents = pd.read_parquet(job.data / "documents.parquet")
    parts = checkpoint.dir / "lm_eval"
    shutil.rmtree(parts, ignore_errors=True)  # an interrupted attempt's logs: lm-eval starts over
    parts.mkdir()
    recorders = make_recorders(job, shape, router, parts)
    forwards = ForwardLog(Recording(*recorders))
    with install_router(model, router, forwards.recording), Stopwatch() as clock:
        results = evaluate_task(model, tokenizer, info["spec"], forwards, job.batch_size, job.seed, documents)
    forwards.recording.close()
    state = recorders[0].state()
    out = job.out
    for name in ROUTING_LOGS:
        concat_parquet([parts / name], out / name)
    write_parquet(out / "scores.parquet", sample_scores(results, documents))
    head = summary_head(job, router, shape)
    summary = run_summary(head, state, router.min_k, router.max_k, shape.expert_flops_per_selection)
    lm_eval = task_metrics(results)
    headline = headline_metrics(lm_eval, info["lm_eval_task"])
    primary, higher_is_better = primary_metric(info, headline)
    metrics = {"routing": spec["name"], "dataset": job.data.name, "task": "lm_eval",
               "lm_eval_task": info["lm_eval_task"], "primary_metric": primary,
               "primary_higher_is_better": higher_is_better, **headline, "lm_eval": lm_eval}
    tokens = forwards.tokens["prefill"] + forwards.tokens["decode"]
    system = {**system_record(job, model, None, clock.seconds, tokens), **forwards.throughput()}
    provenance = provenance_record(job, info, model)
    provenance["versions"]["lm_eval"] = __import__("lm_eval").__version__
    write_run_records(out, summary=summary, provenance=provenance, system=system, metrics=metrics,
                      k_hist=state["k_hist"])
    log.info("metrics %s", {key: value for key, value in metrics.items() if key != "lm_eval"})


def summary_head(job: RouteJob, router: Router, shape: MoEShape) -> dict[str, Any]:
    """What summary.json (and a shard's part.json) says of the run before its statistics: the routing
    config and its resolved parameters, the dataset, the model's MoE shape."""
    params = {key: value for key, value in router.describe().items() if key != "method"}
    return {"routing": job.routing["name"], "dataset": job.data.name, "method": job.routing["method"],
            "params": params, "num_layers": shape.num_layers, "num_experts": shape.num_experts,
            "model_top_k": shape.top_k, "norm_topk_prob": shape.norm_topk_prob, "router_score": shape.router_score}


def system_record(job: RouteJob, model, windows: pd.DataFrame | None, seconds: float,
                  tokens: int | None = None) -> dict[str, Any]:
    """``system.json``: compute time, throughput (every token the model processed, context included, not
    only scored ones), peak memory, device and experts kernel."""
    device = input_device(model)
    return {"routing": job.routing["name"], "dataset": job.data.name, "wall_time_s": seconds,
            "tokens_per_s": (int(windows["input_ids"].map(len).sum()) if tokens is None else tokens) / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "device": str(device), "experts_implementation": model.config._experts_implementation}


def provenance_record(job: RouteJob, info: dict[str, Any], model,
                      chunks: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """What produced the run: inputs, versions, commit, and a hash of everything that determines it.

    The batch size changes scores only at float rounding level (and an out-of-memory retry lowers it), so
    it is recorded but not hashed: shards and retries of one config share one hash. ``chunks``: (first
    window, end window, batch size) of each saved chunk; where the batch size changed between them
    (an out-of-memory retry), ``batch_sizes`` lists them.
    """
    determining = {"routing": job.routing, "dataset": info, "model": str(job.model), "dtype": job.placement.dtype,
                   "seed": job.seed, "sample_every": job.sample_every}
    return {"config_hash": hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest(),
            "routing": job.routing, "dataset_info": info, "model": str(job.model), "dtype": job.placement.dtype,
            "batch_size": job.batch_size, "null": job.null, "calibration_logits": job.calibration_logits,
            "experts_implementation": model.config._experts_implementation, "seed": job.seed,
            "git_commit": git_commit(), "python": platform.python_version(),
            "versions": {"routelab": routelab.__version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            **({"batch_sizes": [{"windows": [start, end], "batch_size": size} for start, end, size in chunks]}
               if chunks and len({size for _, _, size in chunks}) > 1 else {}),
            **({"device_map": {name: str(device) for name, device in model.hf_device_map.items()}}
               if getattr(model, "hf_device_map", None) else {})}


def git_commit() -> str | None:
    """The commit of the routelab checkout, None outside one."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
