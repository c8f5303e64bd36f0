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

import pandas as pd
import torch

import routelab
from routelab.cli import json_arg, run
from routelab.config import normalise_routing
from routelab.evaluate import Stopwatch, document_scores, score_windows
from routelab.io import atomic_path, read_json, write_json, write_parquet
from routelab.modeling import load_model, load_tokenizer
from routelab.nulls import fit_null, load_null
from routelab.patching import expert_flops_per_selection, install_router, model_routing_shape
from routelab.quality import quality_metrics
from routelab.decisions import DecisionSampler
from routelab.recording import RecorderGroup, RoutingRecorder
from routelab.routers import build_router

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
    """What produced the run: inputs, versions, commit, and a hash of everything that determines it."""
    determining = {"routing": spec, "dataset": info, "model": str(args.model), "dtype": args.dtype,
                   "batch_size": args.batch_size, "seed": args.seed, "sample_every": args.sample_every}
    return {"config_hash": hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest(),
            "routing": spec, "dataset_info": info, "model": str(args.model), "dtype": args.dtype,
            "experts_implementation": model.config._experts_implementation, "seed": args.seed,
            "git_commit": git_commit(), "python": platform.python_version(),
            "versions": {"routelab": routelab.__version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__}}


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = normalise_routing(args.routing, "--routing")
    data = Path(args.data)
    info = read_json(data / "info.json")
    windows, documents = pd.read_parquet(data / "windows.parquet"), pd.read_parquet(data / "documents.parquet")
    model = load_model(args.model, args.dtype, args.device, args.experts_implementation)
    tokenizer = load_tokenizer(args.model)
    num_layers, num_experts, top_k, norm_topk_prob = model_routing_shape(model)
    router = make_router(spec, args.null, model)
    log.info("routing %s on %s: %s (model top-k %d, norm_topk_prob %s)", spec["name"], data.name,
             router.describe(), top_k, norm_topk_prob)

    out = Path(args.out)
    with atomic_path(out / "routing.parquet") as parquet_tmp, atomic_path(out / "decisions.parquet") as sample_tmp:
        recorder = RoutingRecorder(num_layers, num_experts, router.min_k, router.max_k, path=parquet_tmp)
        sampler = DecisionSampler(sample_tmp, num_experts, args.sample_every, alpha=getattr(router, "alpha", None))
        recorders = RecorderGroup(recorder, sampler)
        with install_router(model, router, recorders), Stopwatch() as clock:
            window_scores = score_windows(model, windows, args.batch_size, tokenizer.pad_token_id or 0, recorders)
        recorders.close()

    scores = document_scores(window_scores, documents)
    metrics = {"routing": spec["name"], "dataset": data.name, "task": info["task"],
               **quality_metrics(scores, info["task"])}
    device = next(model.parameters()).device
    system = {"routing": spec["name"], "dataset": data.name, "wall_time_s": clock.seconds,
              # Throughput counts every token the model processed (context included), not only scored ones.
              "tokens_per_s": int(windows["input_ids"].map(len).sum()) / clock.seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
              "device": str(device), "experts_implementation": model.config._experts_implementation}
    params = {k: v for k, v in router.describe().items() if k != "method"}
    if spec["method"] == "topk":
        params = {"k": router.max_k, "weights": router.weight_policy}
    if spec.get("null_model"):
        params["null_model"] = spec["null_model"]
    summary = {"routing": spec["name"], "dataset": data.name, "method": spec["method"], "params": params,
               "num_layers": num_layers, "num_experts": num_experts, "model_top_k": top_k,
               "norm_topk_prob": norm_topk_prob, **recorder.summary()}
    flops = expert_flops_per_selection(model)
    summary["active_expert_flops_per_token"] = flops * summary["experts_mean"] * num_layers
    summary["active_expert_flops_vs_topk"] = summary["experts_mean"] / top_k
    provenance = provenance_record(args, spec, info, model)
    write_parquet(out / "scores.parquet", scores)
    write_json(out / "summary.json", summary)
    write_json(out / "provenance.json", provenance)
    write_json(out / "system.json", system)
    write_json(out / "metrics.json", metrics)
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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--experts-implementation", default=None)
    parser.add_argument("--sample-every", type=int, default=100,
                        help="full routing detail for every n-th token into decisions.parquet (0 = none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    run(main, parser)
