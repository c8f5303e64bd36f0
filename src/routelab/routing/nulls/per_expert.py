"""The per-expert null (kind ``per_expert``): one empirical survival function per (layer, expert), so
an expert that is habitually loud is judged against its own history rather than the layer's."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from routelab.routing.nulls.base import (
    NullKind,
    NullMismatchError,
    TabulatedCurves,
    check_quantiles,
    check_table_shapes,
    layer_values,
    meta_of,
    non_empty,
    register_null,
    save_npz,
)
from routelab.routing.nulls.interpolation import interpolate_rows
from routelab.routing.nulls.tabulated import ecdf_table


@dataclass
class PerExpertNull(TabulatedCurves):
    """Empirical survival function of each expert's own logits, per layer (kind per_expert).

    ``grid`` and ``sf`` are ``[layers, experts, points]``, ``grid`` non-decreasing and ``sf``
    non-increasing along the last axis. ``min_pvalue`` floors p at ``1 / (tokens + 1)``.
    """

    grid: np.ndarray
    sf: np.ndarray
    min_pvalue: float
    meta: dict[str, Any] = field(default_factory=dict)
    kind: ClassVar[str] = "per_expert"
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return int(self.grid.shape[1])

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``P(expert e's null logit > x[:, e])`` for ``logits`` ``[tokens, experts]``; float32, in (0, 1]."""
        if logits.shape[-1] != self.num_experts:
            raise NullMismatchError(f"null: fitted for {self.num_experts} experts but the logits have "
                                    f"{logits.shape[-1]}; rerun calibrate_null for this model")
        grid, sf = self._tables(logits.device)
        x = (logits.float() / temperature).t().contiguous()  # [experts, tokens]: one searchsorted row each
        return interpolate_rows(x, grid[layer], sf[layer]).clamp_(min=self.min_pvalue, max=1.0).t().contiguous()

    def save(self, path: str | os.PathLike) -> None:
        save_npz(path, kind=self.kind, grid=self.grid, sf=self.sf, min_pvalue=self.min_pvalue,
                 meta=json.dumps(self.meta))

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray]) -> PerExpertNull:
        grid, sf = check_table_shapes(fields, ndim=3)
        return cls(grid=grid, sf=sf, min_pvalue=float(fields["min_pvalue"]), meta=meta_of(fields))


def fit_per_expert_null(layer_logits: list[np.ndarray], num_experts: int, quantiles: int = 4096,
                        meta: dict[str, Any] | None = None) -> PerExpertNull:
    """Per layer and expert, the empirical survival function of that expert's logits.

    ``layer_logits[layer]`` is ``[tokens, num_experts]``. Tables are ``[layers, experts, quantiles + 1]``;
    p is floored at ``1 / (tokens + 1)`` (the smallest layer's token count).
    """
    check_quantiles(quantiles)
    grids, sfs, tokens = [], [], []
    for layer, values in enumerate(non_empty(layer_logits)):
        values = layer_values(layer, values, num_experts)
        if values.ndim != 2 or values.shape[0] < 2:
            raise ValueError(f"calibration logits of layer {layer}: shape {list(values.shape)}; a per-expert "
                             f"null needs [tokens >= 2, {num_experts}]")
        columns = np.sort(values, axis=0).T  # [experts, tokens], each row ascending
        layer_tables = [ecdf_table(np.ascontiguousarray(row), quantiles) for row in columns]
        grids.append(np.stack([g for g, _ in layer_tables]))
        sfs.append(np.stack([s for _, s in layer_tables]))
        tokens.append(int(values.shape[0]))
    info = {**(meta or {}), "method": "per_expert", "quantiles": quantiles, "tokens_per_layer": tokens}
    return PerExpertNull(grid=np.stack(grids), sf=np.stack(sfs), min_pvalue=1.0 / (min(tokens) + 1), meta=info)


register_null(NullKind(
    "per_expert", "per layer and expert, the empirical distribution of that expert's logits", calibrated=True,
    fit=lambda logits, experts, size, meta: fit_per_expert_null(logits, experts, size, meta),
    load=PerExpertNull.from_fields, table_option="quantiles"))
