"""Stages collect_router_logits and calibrate_null: the unpatched model's router logits on held-out
text (the one model run of calibration), and the nulls fitted from them (no model runs)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from routelab.io.files import atomic_path, write_json
from routelab.routing.nulls import NULL_KINDS, calibrated_kinds, fit_null
from routelab.run.evaluate import padded_batches

log = logging.getLogger(__name__)


@torch.inference_mode()
def collect_router_logits(model, windows: pd.DataFrame, batch_size: int, pad_token_id: int,
                          max_per_layer: int, seed: int = 0, progress: bool = True) -> list[np.ndarray]:
    """Router logits ``[tokens, experts]`` per MoE layer (padding excluded), subsampled by token to at
    most ``max_per_layer`` values per layer with a seeded generator."""
    device = next(model.parameters()).device
    per_layer: list[list[torch.Tensor]] = []
    for _, inputs, mask in padded_batches(windows, batch_size, pad_token_id, device, "calibrate", progress):
        out = model(input_ids=inputs, attention_mask=mask, output_router_logits=True)
        valid = mask.reshape(-1).bool()
        if not per_layer:
            per_layer = [[] for _ in out.router_logits]
        for store, logits in zip(per_layer, out.router_logits):
            store.append(logits[valid].float().cpu())
    if not per_layer:
        raise ValueError("calibration windows: empty; the calibration split has no tokens")
    rng = np.random.default_rng(seed)
    result = []
    for store in per_layer:
        logits = torch.cat(store).numpy()
        max_tokens = max(1, max_per_layer // logits.shape[1])
        if logits.shape[0] > max_tokens:
            logits = logits[np.sort(rng.choice(logits.shape[0], max_tokens, replace=False))]
        result.append(logits)
    return result


def save_router_logits(path, logits: list[np.ndarray], meta: dict) -> None:
    """Write per-layer router logits ``[tokens, experts]`` and ``meta`` (model, shape, calibration files)
    to one ``.npz`` (atomically): the input every null is fitted from, so the model runs once however
    many null models the routing configs use."""
    arrays = {f"layer_{i}": np.ascontiguousarray(layer, dtype=np.float32) for i, layer in enumerate(logits)}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load_router_logits(path) -> tuple[list[np.ndarray], dict]:
    """``(logits per layer, meta)`` written by :func:`save_router_logits`."""
    with np.load(path) as data:
        layers = sorted((name for name in data.files if name.startswith("layer_")), key=lambda n: int(n[6:]))
        if not layers or "meta" not in data.files:
            raise ValueError(f"{path}: not a router-logits file (needs layer_0.. arrays and meta); "
                             "write it with collect_router_logits.py")
        return [data[name] for name in layers], json.loads(str(data["meta"]))


def collect_calibration_logits(model_path: str | os.PathLike, calibration: Sequence[str | os.PathLike],
                               out: str | os.PathLike, max_per_layer: int, batch_size: int, dtype: str = "float32",
                               device: str = "auto", experts_implementation: str | None = None,
                               seed: int = 0) -> list[np.ndarray]:
    """Stage collect_router_logits: run the unpatched model over every dataset's calibration windows and
    save each MoE layer's router logits to ``out`` (:func:`save_router_logits`); returns them."""
    from routelab.model.families import moe_shape
    from routelab.model.gpus import pin_gpu
    from routelab.model.loading import load_model, load_tokenizer

    if device in ("auto", "cuda"):  # before CUDA starts: one free GPU per job (Snakemake pins none)
        pin_gpu()
    torch.manual_seed(seed)
    windows = pd.concat([pd.read_parquet(p) for p in calibration], ignore_index=True)
    model = load_model(model_path, dtype, device, experts_implementation)
    shape = moe_shape(model)
    tokenizer = load_tokenizer(model_path)
    logits = collect_router_logits(model, windows, batch_size, tokenizer.pad_token_id or 0, max_per_layer, seed=seed)
    save_router_logits(out, logits, {"model": str(model_path), "num_layers": shape.num_layers,
                                     "num_experts": shape.num_experts, "top_k": shape.top_k,
                                     "calibration_files": [str(p) for p in calibration]})
    log.info("saved router logits of %d layers x %d experts (%d tokens per layer at most) from %d calibration "
             "windows to %s", shape.num_layers, shape.num_experts, max(len(layer) for layer in logits), len(windows),
             out)
    return logits


def calibrate_null(logits_path: str | os.PathLike, method: str, out: str | os.PathLike, grid_size: int = 2048,
                   quantiles: int = 4096) -> dict[str, Any]:
    """Stage calibrate_null: fit the null ``method`` from the router logits at ``logits_path`` and write
    ``null.npz`` (read back by :func:`routelab.routing.nulls.load_null`) and a readable ``null.json`` into
    ``out``; returns the latter's content."""
    if method not in NULL_KINDS:
        raise ValueError(f"--method: {method!r} is not a null; calibrate one of {', '.join(calibrated_kinds())}")
    if not NULL_KINDS[method].calibrated:
        raise ValueError(f"--method: {method!r} needs no calibration ({NULL_KINDS[method].description}; route with "
                         f"it directly); calibrate one of {', '.join(calibrated_kinds())}")
    logits, meta = load_router_logits(logits_path)
    num_experts = meta["num_experts"]
    null = fit_null(method, logits, num_experts, grid_size=grid_size, quantiles=quantiles,
                    meta={"model": meta["model"], "num_layers": meta["num_layers"], "top_k": meta["top_k"],
                          "calibration_files": meta["calibration_files"], "router_logits": str(logits_path)})
    option = NULL_KINDS[method].table_option
    table_size = {option: {"grid_size": grid_size, "quantiles": quantiles}[option]} if option else {}
    out = Path(out)
    null.save(out / "null.npz")
    record = {
        **null.meta, "kind": null.kind, "num_experts": num_experts, **table_size,
        "min_pvalue": getattr(null, "min_pvalue", None),
        "layers": [{"layer": i, "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
                    "max": float(v.max()), "samples": int(v.size)} for i, v in enumerate(logits)],
    }
    write_json(out / "null.json", record)
    log.info("fitted %s null for %d layers x %d experts from %s", method, len(logits), num_experts, logits_path)
    return record
