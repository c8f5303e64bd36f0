#!/usr/bin/env python
"""Stage route: run the model with its router replaced on one dataset; evaluate and record routing.

Writes into ``--out`` (one run = one routing config x one dataset):

- ``metrics.json``     quality (token / word / byte perplexity, bits per byte; cloze acc) and speed;
- ``summary.json``     routing statistics (experts selected mean/std/min/max, ceiling and floor hits,
                       p-value mean/std, per-layer statistics, k histogram, expert counts);
- ``routing.parquet``  every (token, layer) decision: k, expert ids, weights;
- ``decisions.parquet`` full detail for every n-th token (all logits and p-values, BH thresholds and
                       passing rank; ``export_decisions.py`` turns it into JSON logs);
- ``scores.parquet``   per-document log-likelihood, token / word / byte counts, correctness;
- ``system.json``      wall time, tokens/s, peak memory (process RSS, CUDA), device and experts kernel
                       (kept apart so metrics.json and summary.json are identical across reruns);
- ``provenance.json``  routing spec, model, versions, seed, a hash of everything that determines the run.

With ``--shard I-of-N`` it evaluates only that shard's documents and writes ``routing.parquet``,
``decisions.parquet``, ``scores.parquet``, ``accumulators.npz`` (recorder state) and ``part.json``
(the rest), which ``gather_shards.py`` merges into the files above (see ``routelab.shards``).

With ``--checkpoint-every M`` completed work is saved every M batches to ``OUT.partial/`` and a rerun
resumes from it; an out-of-memory error exits with status 75 (retry with a smaller batch), any other
error makes retry attempts (``--attempt`` > 1) fail at once (see ``routelab.resume``).

    python workflow/scripts/route.py --model results/demo/model --data results/demo/data/code \
        --null results/demo/calibration/kde/null.npz --out results/demo/runs/bh/code \
        --routing '{"name": "bh", "method": "bh", "alpha": 0.05, "min_k": 1, "max_k": 8}'
"""

import argparse
import hashlib
import json
import logging
import platform
import resource
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import routelab
from routelab.cli import json_arg, run
from routelab.config import normalise_routing
from routelab.evaluate import Stopwatch, document_scores, score_windows
from routelab.gpus import pin_gpu
from routelab.io import atomic_path, read_json, write_json, write_parquet
from routelab.modeling import load_model, load_tokenizer
from routelab.nulls import fit_null, load_null
from routelab.patching import expert_flops_per_selection, install_router, model_routing_shape
from routelab.decisions import DecisionSampler
from routelab.recording import RecorderGroup, RoutingRecorder
from routelab.resume import (Checkpoint, FaultInjector, fingerprint, load_chunk_state, retry_guard,
                             save_chunk_state)
from routelab.routers import build_router
from routelab.shards import concat_parquet, run_metrics, run_summary, select_shard, write_run_records

log = logging.getLogger("route")


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def make_router(spec: dict, null_arg: str | None, model):
    """The configured router for ``model``, with its null loaded and checked against the model."""
    num_layers, num_experts, top_k, _ = model_routing_shape(model)
    null = None
    if spec.get("null_model"):
        if null_arg is None:
            raise ValueError(f"--null: routing method {spec['method']!r} needs a null: a null.npz from "
                             "calibrate_null, or 'gaussian' (no calibration)")
        null = fit_null("gaussian", None, num_experts) if null_arg == "gaussian" else load_null(null_arg)
        null.check_model(num_layers, num_experts)
    return build_router(spec, num_experts, top_k, null)


def provenance_record(args: argparse.Namespace, spec: dict, info: dict, model) -> dict:
    """What produced the run: inputs, versions, commit, and a hash of everything that determines it.

    The batch size changes scores only at float rounding level (and an out-of-memory retry lowers it), so
    it is recorded but not hashed: shards and retries of one config share one hash.
    """
    determining = {"routing": spec, "dataset": info, "model": str(args.model), "dtype": args.dtype,
                   "seed": args.seed, "sample_every": args.sample_every}
    return {"config_hash": hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest(),
            "routing": spec, "dataset_info": info, "model": str(args.model), "dtype": args.dtype,
            "batch_size": args.batch_size,
            "experts_implementation": model.config._experts_implementation, "seed": args.seed,
            "git_commit": git_commit(), "python": platform.python_version(),
            "versions": {"routelab": routelab.__version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__}}


def checkpoint_key(args: argparse.Namespace, spec: dict, data: Path) -> dict:
    """Everything that determines the recorded rows (not the batch size: see routelab.resume)."""
    return {"routing": spec, "model": fingerprint(args.model), "dtype": args.dtype, "device": args.device,
            "experts_implementation": args.experts_implementation, "null": fingerprint(args.null),
            "windows": fingerprint(data / "windows.parquet"), "documents": fingerprint(data / "documents.parquet"),
            "seed": args.seed, "sample_every": args.sample_every, "shard": args.shard,
            "routelab": routelab.__version__}


def evaluate_in_chunks(args: argparse.Namespace, model, router, pad_token_id: int, windows: pd.DataFrame,
                       checkpoint: Checkpoint, tokens_before: int) -> list:
    """Score and record ``windows`` in chunks of ``checkpoint_every`` batches, each saved to ``checkpoint``.

    Resumes after the saved chunks; returns all chunks, in order. ``tokens_before``: real tokens before
    the first window (a shard's offset), so every-n-th-token sampling matches an unsharded run.
    """
    num_layers, num_experts, _, _ = model_routing_shape(model)
    device = next(model.parameters()).device
    chunks = checkpoint.open()
    state, tokens_seen, seconds = load_chunk_state(chunks[-1]) if chunks else (None, tokens_before, 0.0)
    done = chunks[-1].end if chunks else 0
    if done:
        log.info("resuming from the checkpoint %s: windows 0-%d of %d are done", checkpoint.dir, done, len(windows))
    size = args.checkpoint_every * args.batch_size or len(windows)
    group, fault = RecorderGroup(), FaultInjector(args.batch_size)  # fault: a test hook, inert unless asked
    with install_router(model, router, group):
        for start in range(done, len(windows), size):
            end = min(start + size, len(windows))
            with checkpoint.write_chunk(start, end) as chunk_dir:
                # p-value moments over the tokens whose detail decisions.parquet keeps (the same counter)
                recorder = RoutingRecorder(num_layers, num_experts, router.min_k, router.max_k,
                                           path=chunk_dir / "routing.parquet", pvalue_every=args.sample_every)
                if state is not None:
                    recorder.load_state(state, device)
                sampler = DecisionSampler(chunk_dir / "decisions.parquet", num_experts, args.sample_every,
                                          alpha=getattr(router, "alpha", None))
                recorder.tokens_seen = sampler.tokens_seen = tokens_seen
                group.recorders = (fault, recorder, sampler)
                with Stopwatch() as clock:
                    window_scores = score_windows(model, windows.iloc[start:end], args.batch_size, pad_token_id,
                                                  group, progress=size >= len(windows))
                group.close()
                state, tokens_seen, seconds = recorder.state(), sampler.tokens_seen, seconds + clock.seconds
                save_chunk_state(chunk_dir, state, tokens_seen, seconds, window_scores)
            if size < len(windows):
                log.info("checkpoint: windows %d-%d of %d done (%.1f s so far)", start, end, len(windows), seconds)
    return checkpoint.chunks()


def main(args: argparse.Namespace) -> None:
    if args.device in ("auto", "cuda"):  # before CUDA starts: one free GPU per job (Snakemake pins none)
        pin_gpu()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = normalise_routing(args.routing, "--routing")
    for option, value, least in (("--batch-size", args.batch_size, 1), ("--checkpoint-every", args.checkpoint_every, 0),
                                 ("--attempt", args.attempt, 1)):
        if value < least:
            raise ValueError(f"{option}: {value} is not valid; need an integer >= {least}")
    data, out = Path(args.data), Path(args.out)
    info = read_json(data / "info.json")
    checkpoint = Checkpoint(out, checkpoint_key(args, spec, data))
    with retry_guard(checkpoint.failure_marker, args.attempt, args.batch_size):
        route(args, spec, info, data, out, checkpoint)
    checkpoint.remove()


def route(args: argparse.Namespace, spec: dict, info: dict, data: Path, out: Path, checkpoint: Checkpoint) -> None:
    windows, documents = pd.read_parquet(data / "windows.parquet"), pd.read_parquet(data / "documents.parquet")
    shard = {"tokens_before": 0}
    if args.shard:
        windows, shard = select_shard(windows, args.shard)
        log.info("shard %s: windows %d-%d, documents %d-%d", args.shard, *shard["windows"], *shard["documents"])
    if windows.empty:
        raise ValueError(f"--data: {data} has no evaluation windows")
    model = load_model(args.model, args.dtype, args.device, args.experts_implementation)
    tokenizer = load_tokenizer(args.model)
    num_layers, num_experts, top_k, norm_topk_prob = model_routing_shape(model)
    router = make_router(spec, args.null, model)
    log.info("routing %s on %s: %s (model top-k %d, norm_topk_prob %s; batch size %d)", spec["name"], data.name,
             router.describe(), top_k, norm_topk_prob, args.batch_size)

    chunks = evaluate_in_chunks(args, model, router, tokenizer.pad_token_id or 0, windows, checkpoint,
                                shard["tokens_before"])
    state, _, seconds = load_chunk_state(chunks[-1])
    window_scores = pd.concat([pd.read_parquet(c.path / "window_scores.parquet") for c in chunks], ignore_index=True)
    scores = document_scores(window_scores, documents)
    device = next(model.parameters()).device
    system = {"routing": spec["name"], "dataset": data.name, "wall_time_s": seconds,
              # Throughput counts every token the model processed (context included), not only scored ones.
              "tokens_per_s": int(windows["input_ids"].map(len).sum()) / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
              "device": str(device), "experts_implementation": model.config._experts_implementation}
    params = {k: v for k, v in router.describe().items() if k != "method"}
    if spec["method"] == "topk":
        params = {"k": router.max_k, "weights": router.weight_policy}
    if spec.get("null_model"):
        params["null_model"] = spec["null_model"]
    head = {"routing": spec["name"], "dataset": data.name, "method": spec["method"], "params": params,
            "num_layers": num_layers, "num_experts": num_experts, "model_top_k": top_k,
            "norm_topk_prob": norm_topk_prob}
    flops = expert_flops_per_selection(model)
    provenance = provenance_record(args, spec, info, model)
    concat_parquet([c.path / "routing.parquet" for c in chunks], out / "routing.parquet")
    concat_parquet([c.path / "decisions.parquet" for c in chunks], out / "decisions.parquet")
    write_parquet(out / "scores.parquet", scores)
    if args.shard:
        # A shard's part of the run; gather_shards.py merges the parts into the run's files.
        with atomic_path(out / "accumulators.npz") as tmp:
            np.savez(tmp, **state)
        write_json(out / "part.json", {**shard, "task": info["task"], "summary_head": head, "min_k": router.min_k,
                                       "max_k": router.max_k, "expert_flops_per_selection": flops,
                                       "system": system, "provenance": provenance})
        return
    summary = run_summary(head, state, router.min_k, router.max_k, flops)
    metrics = run_metrics(spec["name"], data.name, info["task"], scores)
    write_run_records(out, summary=summary, provenance=provenance, system=system, metrics=metrics,
                      k_hist=state["k_hist"])
    log.info("metrics %s", metrics)
    log.info("experts selected: mean %.3f std %.3f (min %d, max %d); ceiling %.1f%%, floor %.1f%%",
             summary["experts_mean"], summary["experts_std"], summary["experts_min"], summary["experts_max"],
             summary["ceiling_hit_rate"], summary["floor_hit_rate"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--data", required=True, help="prepared dataset directory (windows.parquet, ...)")
    parser.add_argument("--routing", type=json_arg, required=True, help="routing config as JSON (or @file.json)")
    parser.add_argument("--null", default=None,
                        help="p-value routers: null.npz from calibrate_null, or 'gaussian' (needs no calibration)")
    parser.add_argument("--out", required=True, help="run output directory")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="save completed work every N batches to OUT.partial/ and resume from it (0 = one chunk)")
    parser.add_argument("--shard", default=None,
                        help="evaluate only shard I-of-N (whole documents) and write its part for gather_shards.py")
    parser.add_argument("--attempt", type=int, default=1,
                        help="Snakemake's attempt number: a retry after a non-memory error exits at once")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--sample-every", type=int, default=100,
                        help="full routing detail for every n-th token into decisions.parquet (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    run(main, parser)
