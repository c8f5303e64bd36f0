"""The within-token null (kind ``gaussian``): each token's logits standardised over its experts; needs
no calibration."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from routelab.routing.nulls.base import Null, NullKind, NullMismatchError, meta_of, register_null, save_npz


@dataclass
class GaussianNull(Null):
    """Within-token null (kind gaussian): ``z = (x - mean) / std`` over the token's experts
    (population std), ``p = 1 - Phi(z / temperature)``. Needs no calibration.

    ``num_layers`` is None (any layer count). ``num_experts`` is None (works for any expert count)
    unless given, in which case ``check_model`` and routers check it. A token whose logits are all
    equal gets p = 0.5 everywhere. ``min_pvalue`` keeps p > 0 where ``Phi`` underflows. ``-inf`` logits
    (experts outside the candidate groups) are left out of the mean and std and get p = 1.
    """

    num_experts: int | None = None
    min_pvalue: float = float(torch.finfo(torch.float32).tiny)
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "gaussian"
    monotone_in_logit: ClassVar[bool] = True  # one mean and std per token: p falls as the logit rises
    num_layers: ClassVar[None] = None

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Any layer count fits; the expert count only if this null was built for one."""
        if self.num_experts is not None and num_experts != self.num_experts:
            raise NullMismatchError(f"null: gaussian null built for any number of MoE layers x "
                                    f"{self.num_experts} experts but the model has {num_layers} x {num_experts}")

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``1 - Phi(z / temperature)`` of the within-token standardised ``logits`` ``[tokens, experts]``."""
        x = logits.float()
        # -inf marks an expert outside a group-limited family's candidates: standardise over the others
        # and give it p = 1.
        eligible = x > float("-inf")
        x = x.masked_fill(~eligible, 0.0)
        count = eligible.sum(dim=-1, keepdim=True).clamp_(min=1)
        mean = x.sum(dim=-1, keepdim=True) / count
        std = (((x - mean) * eligible).square().sum(dim=-1, keepdim=True) / count).sqrt()
        # A std at the level of float rounding means "all equal": call it z = 0 rather than noise / noise.
        flat = std <= torch.finfo(torch.float32).eps * x.abs().amax(dim=-1, keepdim=True)
        z = torch.where(flat, 0.0, (x - mean) / torch.where(flat, 1.0, std))
        p = torch.special.ndtr(-z / temperature).clamp_(min=self.min_pvalue, max=1.0)
        return p.masked_fill_(~eligible, 1.0)

    def save(self, path: str | os.PathLike) -> None:
        extra = {} if self.num_experts is None else {"num_experts": self.num_experts}
        save_npz(path, kind=self.kind, min_pvalue=self.min_pvalue, meta=json.dumps(self.meta), **extra)

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray]) -> GaussianNull:
        num_experts = int(fields["num_experts"]) if "num_experts" in fields else None
        return cls(num_experts=num_experts, min_pvalue=float(fields["min_pvalue"]), meta=meta_of(fields))


register_null(NullKind(
    "gaussian", "within-token standardised logits against the standard normal, no calibration", calibrated=False,
    fit=lambda logits, experts, size, meta: GaussianNull(num_experts=experts, meta={**meta, "method": "gaussian"}),
    load=GaussianNull.from_fields))
