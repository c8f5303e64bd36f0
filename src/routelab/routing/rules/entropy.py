"""``entropy``: entropy-adaptive k, more experts for tokens whose router distribution is less certain
(the entropy-based adaptive-k rule of the sbm-efficient MoE work: the router's entropy decides how
many of the top experts a token uses, by a ladder of thresholds)."""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import numpy as np
import torch

from routelab.routing.contract import (
    WEIGHTS,
    Alternatives,
    Param,
    Router,
    RouterConfigError,
    register_router,
    same_k,
    softmax_float32,
)
from routelab.routing.counting import top_logit_order
from routelab.routing.statistics import check_layer_count, layer_entropies, router_entropy

KS = Param("ks", list, None, "the ladder of k values, ascending; null = 1, 2, 4, ... up to the model's top-k",
           minimum=1, model_top_k=True, item_type=int, expert_count=True)
THRESHOLDS = Param("thresholds", list, None, "router entropies in nats, ascending, one fewer than ks: a token whose "
                   "entropy exceeds i of them gets ks[i] experts", minimum=0, item_type=float)
QUANTILES = Param("quantiles", list, None, "thresholds fitted per layer as these quantiles (ascending, in (0, 1)) "
                  "of the calibration split's router entropy; null with thresholds null = evenly spaced",
                  exclusive_minimum=0, maximum=1, item_type=float, calibrated=True)


def ladder(top_k: int) -> list[int]:
    """1, 2, 4, ... up to ``top_k`` (included even when not a power of two): the default ks."""
    ks = [1 << i for i in range(top_k.bit_length()) if 1 << i < top_k]
    return [*ks, top_k]


def check_ascending(key: str, values: list, strictly: bool = True) -> None:
    pairs = zip(values, values[1:])
    if not all(a < b if strictly else a <= b for a, b in pairs):
        raise RouterConfigError(f"{key}: {values!r} is not valid; valid: {'strictly ' if strictly else ''}ascending")


@register_router
class EntropyRouter(Router):
    """``k = ks[#{i : H > t_i}]`` with ``H`` the entropy (nats) of the token's router probabilities and
    ``t`` ascending thresholds: ``thresholds`` given, or per layer the ``quantiles`` of the calibration
    split's entropies (default: ``len(ks) - 1`` evenly spaced quantiles, so each k of the ladder goes to
    about as many calibration tokens). The experts are the token's ``k`` most probable.
    """

    method = "entropy"
    summary = "entropy-adaptive k: a ladder of k values chosen by the entropy of the token's router distribution"
    params = (KS, WEIGHTS, THRESHOLDS, QUANTILES)
    alternatives = (Alternatives(("thresholds", "quantiles"), {}),)  # neither: evenly spaced quantiles

    def __init__(self, num_experts: int, ks: int | list[int], weights: str = "model",
                 thresholds: list[float] | None = None, quantiles: list[float] | None = None,
                 calibration: Sequence[np.ndarray] | None = None):
        if isinstance(ks, Integral) and not isinstance(ks, bool):  # the model's top-k: the default ladder
            ks = ladder(int(ks))
        ks = KS.check(ks)
        check_ascending("ks", ks)
        if ks[-1] > num_experts:
            raise RouterConfigError(f"ks: {ks!r} is not valid; each k must be <= {num_experts} (the model's experts)")
        super().__init__(num_experts, max_k=ks[-1], min_k=ks[0], weights=weights)
        self.ks = ks
        if thresholds is not None and quantiles is not None:
            raise RouterConfigError(f"entropy: give only one of thresholds and quantiles (got thresholds="
                                    f"{thresholds!r}, quantiles={quantiles!r})")
        if thresholds is None and quantiles is None:
            quantiles = [i / len(ks) for i in range(1, len(ks))]
        given = thresholds if thresholds is not None else quantiles
        key = "thresholds" if thresholds is not None else "quantiles"
        if len(given) != len(ks) - 1:
            raise RouterConfigError(f"{key}: {given!r} has {len(given)} values; need len(ks) - 1 = {len(ks) - 1} "
                                    f"(ks = {ks})")
        self.quantiles = None if quantiles is None else QUANTILES.check(quantiles) if quantiles else []
        self.thresholds = None
        if thresholds is not None:
            self.thresholds = THRESHOLDS.check(thresholds) if thresholds else []
            check_ascending("thresholds", self.thresholds, strictly=False)
            self.layer_thresholds = None
        else:
            check_ascending("quantiles", self.quantiles)
            if calibration is None:
                raise RouterConfigError("entropy: quantiles need the calibration split's router logits")
            layers = check_layer_count(calibration, "entropy quantiles")
            self.layer_thresholds = [np.quantile(layer_entropies(values, layer, num_experts), self.quantiles).tolist()
                                     for layer, values in enumerate(layers)]
        self._tables: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def describe(self):
        described = super().describe()
        if self.layer_thresholds is not None:
            described["thresholds"] = self.layer_thresholds  # fitted, one ascending list per layer
        return described

    def check_layers(self, num_layers):
        if self.layer_thresholds is not None and len(self.layer_thresholds) != num_layers:
            raise RouterConfigError(f"entropy: thresholds were calibrated for {len(self.layer_thresholds)} MoE layers "
                                    f"but the model has {num_layers}; recollect the calibration logits")

    def _table(self, device: torch.device, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), layer if self.layer_thresholds is not None else -1)
        if key not in self._tables:
            thresholds = self.thresholds if self.layer_thresholds is None else self.layer_thresholds[layer]
            self._tables[key] = (torch.tensor(thresholds, dtype=torch.float32, device=device),
                                 torch.tensor(self.ks, dtype=torch.long, device=device))
        return self._tables[key]

    def rank(self, logits, layer, probs=None):
        order = top_logit_order(logits, self.max_k)
        if self.min_k == self.max_k:  # a one-rung ladder
            return order, same_k(logits, self.max_k), None
        probs = softmax_float32(logits) if probs is None else probs
        thresholds, ks = self._table(logits.device, layer)
        step = (router_entropy(probs).unsqueeze(-1) > thresholds).sum(dim=-1)
        return order, ks.index_select(0, step), None
