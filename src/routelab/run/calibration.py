"""Stages collect_router_logits and calibrate_null: the unpatched model's router logits on held-out
text (the one model run of calibration), and the nulls fitted from them (no model runs)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from routelab.io.files import atomic_path, write_json
from routelab.model.loading import ModelPlacement, input_device
from routelab.routing.nulls import NULL_KINDS, calibrated_kinds, fit_null
from routelab.run.evaluate import padded_batches

log = logging.getLogger(__name__)


class ScoreCollector:
    """A recorder that keeps every layer's selection scores (what nulls are fitted on: the router logits of
    softmax families, ``sigmoid + bias`` of DeepSeek-V3-class ones) and, where the family's probabilities
    are not their softmax, logits whose softmax they are (what calibrated probability rules read)."""

    def __init__(self) -> None:
        self.valid: torch.Tensor | None = None
        self.scores: list[list[torch.Tensor]] = []
        self.softmax_logits: list[list[torch.Tensor]] = []

    def record(self, layer: int, router_logits: torch.Tensor, selection) -> None:
        while len(self.scores) <= layer:
            self.scores.append([])
            self.softmax_logits.append([])
        scores = router_logits if selection.scores is None else selection.scores
        self.scores[layer].append(scores[self.valid].float().cpu())
        if selection.softmax_logits is not None:
            self.softmax_logits[layer].append(selection.softmax_logits[self.valid].float().cpu())

    def result(self) -> CalibrationScores:
        """Everything collected, per layer ``[tokens, experts]`` (raises if nothing was)."""
        if not self.scores or not self.scores[0]:
            raise ValueError("calibration windows: empty; the calibration split has no tokens")
        softmax_logits = [torch.cat(layer).numpy() for layer in self.softmax_logits] if self.softmax_logits[0] else None
        return CalibrationScores([torch.cat(layer).numpy() for layer in self.scores], softmax_logits)


@dataclass
class CalibrationScores:
    """Per MoE layer ``[tokens, experts]`` float32: the selection scores, and (None for softmax families
    without a selection bias, where they are the scores themselves) logits whose softmax is the family's
    probabilities."""

    scores: list[np.ndarray]
    softmax_logits: list[np.ndarray] | None = None

    @property
    def probability_logits(self) -> list[np.ndarray]:
        """What calibrated probability rules read (as :func:`load_softmax_logits` reads it from the file)."""
        return self.scores if self.softmax_logits is None else self.softmax_logits


@torch.inference_mode()
def collect_router_logits(model, windows: pd.DataFrame, batch_size: int, pad_token_id: int,
                          max_per_layer: int, seed: int = 0, progress: bool = True) -> CalibrationScores:
    """The model's selection scores ``[tokens, experts]`` per MoE layer (padding excluded), subsampled by
    token to at most ``max_per_layer`` values per layer with a seeded generator.

    The model runs with its own top-k installed through routelab's router seam (which reproduces its
    native forward), so families that return no router logits, or rank by something other than them,
    are collected the same way.
    """
    from routelab.model.families import moe_shape
    from routelab.model.patching import install_router
    from routelab.routing import TopKRouter

    shape = moe_shape(model)
    device = input_device(model)
    collector = ScoreCollector()
    with install_router(model, TopKRouter(shape.num_experts, shape.top_k), recorder=collector):
        for _, inputs, mask in padded_batches(windows, batch_size, pad_token_id, device, "calibrate", progress):
            collector.valid = mask.reshape(-1).bool()
            model(input_ids=inputs, attention_mask=mask)
    collected = collector.result()
    rng = np.random.default_rng(seed)
    scores, softmax_logits = [], []
    for layer, values in enumerate(collected.scores):
        kept = slice(None)
        max_tokens = max(1, max_per_layer // values.shape[1])
        if values.shape[0] > max_tokens:
            kept = np.sort(rng.choice(values.shape[0], max_tokens, replace=False))
        scores.append(values[kept])
        if collected.softmax_logits is not None:
            softmax_logits.append(collected.softmax_logits[layer][kept])
    return CalibrationScores(scores, softmax_logits or None)


def save_router_logits(path, logits: list[np.ndarray], meta: dict,
                       softmax_logits: list[np.ndarray] | None = None) -> None:
    """Write per-layer selection scores ``[tokens, experts]`` (``layer_i``; the router logits of softmax
    families), optionally the logits whose softmax is the family's probabilities (``softmax_logits_i``),
    and ``meta`` (model, shape, calibration files) to one ``.npz`` (atomically): the input every null is
    fitted from, so the model runs once however many null models the routing configs use."""
    arrays = {f"layer_{i}": np.ascontiguousarray(layer, dtype=np.float32) for i, layer in enumerate(logits)}
    for i, layer in enumerate(softmax_logits or ()):
        arrays[f"softmax_logits_{i}"] = np.ascontiguousarray(layer, dtype=np.float32)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load_softmax_logits(path) -> list[np.ndarray]:
    """What calibrated probability rules read from a ``router_logits.npz``: per layer, logits whose softmax
    is the family's probabilities (the selection scores themselves for softmax families)."""
    logits, _ = load_router_logits(path)
    with np.load(path) as data:
        if "softmax_logits_0" not in data.files:
            return logits
        return [data[f"softmax_logits_{i}"] for i in range(len(logits))]


def load_router_logits(path) -> tuple[list[np.ndarray], dict]:
    """``(logits per layer, meta)`` written by :func:`save_router_logits`."""
    with np.load(path) as data:
        layers = sorted((name for name in data.files if name.startswith("layer_")), key=lambda n: int(n[6:]))
        if not layers or "meta" not in data.files:
            raise ValueError(f"{path}: not a router-logits file (needs layer_0.. arrays and meta); "
                             "write it with collect_router_logits.py")
        return [data[name] for name in layers], json.loads(str(data["meta"]))


def collect_calibration_logits(model_path: str | os.PathLike, calibration: Sequence[str | os.PathLike],
                               out: str | os.PathLike, max_per_layer: int, batch_size: int,
                               placement: ModelPlacement | None = None, seed: int = 0) -> list[np.ndarray]:
    """Stage collect_router_logits: run the model with its own routing over every dataset's calibration
    windows and save each MoE layer's selection scores (the router logits of softmax families) to ``out``
    (:func:`save_router_logits`); returns them."""
    from routelab.model.families import moe_shape
    from routelab.model.loading import load_tokenizer

    placement = placement or ModelPlacement()
    placement.pin()
    torch.manual_seed(seed)
    windows = pd.concat([pd.read_parquet(p) for p in calibration], ignore_index=True)
    model = placement.load(model_path)
    shape = moe_shape(model)
    tokenizer = load_tokenizer(model_path)
    collected = collect_router_logits(model, windows, batch_size, tokenizer.pad_token_id or 0, max_per_layer, seed=seed)
    logits = collected.scores
    save_router_logits(out, logits, {"model": str(model_path), "num_layers": shape.num_layers,
                                     "num_experts": shape.num_experts, "top_k": shape.top_k,
                                     "calibration_files": [str(p) for p in calibration]},
                       softmax_logits=collected.softmax_logits)
    log.info("saved selection scores of %d layers x %d experts (%d tokens per layer at most) from %d calibration "
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
