"""Per-layer statistics of the calibration split's router logits that calibrated rules are set up from.

The calibration logits are those ``collect_router_logits`` saves (one ``[tokens, experts]`` array per
MoE layer, the unpatched model's); each statistic is computed in float32 like routing itself, in
chunks of tokens so a real model's calibration split (millions of rows) needs little memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from routelab.routing.contract import RouterConfigError, softmax_float32

CHUNK = 1 << 16  # tokens per softmax: bounded memory whatever the calibration split's size


def layer_probs(logits: np.ndarray, layer: int, num_experts: int) -> Iterator[torch.Tensor]:
    """The float32 router probabilities of one layer's calibration logits, chunk by chunk."""
    array = np.asarray(logits)
    if array.ndim != 2 or array.shape[1] != num_experts or array.shape[0] == 0:
        raise RouterConfigError(f"calibration logits of layer {layer}: shape {list(array.shape)}; need "
                                f"[tokens >= 1, {num_experts}] (were they collected from this model?)")
    if not np.isfinite(array).all():
        raise RouterConfigError(f"calibration logits of layer {layer}: NaN or infinite values; recollect them")
    for start in range(0, array.shape[0], CHUNK):
        yield softmax_float32(torch.from_numpy(np.ascontiguousarray(array[start : start + CHUNK], np.float32)))


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats of each row of ``probs`` ``[tokens, experts]`` (0 log 0 = 0), float32."""
    return torch.special.entr(probs).sum(dim=-1)


def layer_entropies(logits: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """Router entropy of every calibration token of one layer, float64 ``[tokens]``."""
    return np.concatenate([router_entropy(p).double().numpy() for p in layer_probs(logits, layer, num_experts)])


def second_to_first(logits: np.ndarray, layer: int, num_experts: int) -> np.ndarray:
    """``w_2 / w_1`` (second largest over largest router probability) of every calibration token, float64."""
    parts = []
    for probs in layer_probs(logits, layer, num_experts):
        top = torch.topk(probs, 2, dim=-1).values.double()
        parts.append((top[:, 1] / top[:, 0]).numpy())
    return np.concatenate(parts)


def check_layer_count(calibration: Sequence[np.ndarray], what: str) -> list[np.ndarray]:
    layers = list(calibration)
    if not layers:
        raise RouterConfigError(f"{what}: the calibration logits hold no MoE layer")
    return layers
