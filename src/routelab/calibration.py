"""Collect router logits of the unpatched model on held-out text, for fitting the nulls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .evaluate import padded_batches


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
    import json

    from .io import atomic_path

    arrays = {f"layer_{i}": np.ascontiguousarray(layer, dtype=np.float32) for i, layer in enumerate(logits)}
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)


def load_router_logits(path) -> tuple[list[np.ndarray], dict]:
    """``(logits per layer, meta)`` written by :func:`save_router_logits`."""
    import json

    with np.load(path) as data:
        layers = sorted((name for name in data.files if name.startswith("layer_")), key=lambda n: int(n[6:]))
        if not layers or "meta" not in data.files:
            raise ValueError(f"{path}: not a router-logits file (needs layer_0.. arrays and meta); "
                             "write it with collect_router_logits.py")
        return [data[name] for name in layers], json.loads(str(data["meta"]))
