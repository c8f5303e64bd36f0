"""Per-layer tabulated nulls (kinds ``kde`` and ``empirical``): one survival-function curve per MoE layer.
:class:`TabulatedNull` also holds the parametric kinds' tables (:mod:`.parametric`).

- ``kde`` (the default): per layer, a Gaussian KDE of the logits of all experts pooled, tabulated as a
  survival function ``sf(x) = P(logit > x)`` on an evenly spaced grid; ``p = sf(logit / temperature)``.
- ``empirical``: per layer, the pooled empirical survival function (fraction of calibration logits
  greater than x) tabulated at order statistics and interpolated between them.

Pooling the experts of a layer makes BH on these p-values a calibrated heuristic for choosing k, not
an FDR guarantee: the experts' p-values are not independent tests of exchangeable nulls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from routelab.routing.nulls.base import (
    NULL_KINDS,
    NullKind,
    TabulatedCurves,
    check_quantiles,
    check_table_shapes,
    layer_values,
    load_null,
    meta_of,
    non_empty,
    register_null,
    save_npz,
)
from routelab.routing.nulls.interpolation import UniformSegments, evenly_spaced, interpolate_rows


@dataclass
class TabulatedNull(TabulatedCurves):
    """Survival functions of router logits, one tabulated curve per MoE layer (kinds kde, empirical,
    student_t, gmm).

    ``grid`` and ``sf`` are ``[layers, points]``; ``grid`` rows do not decrease, ``sf`` rows do not
    increase, from ~1 to ~0. ``min_pvalue`` floors p so it stays in ``(0, 1]`` beyond the fitted range.
    Layers whose grid is evenly spaced (kde's, the parametric kinds') are read by index arithmetic
    (:class:`UniformSegments`) instead of a binary search; the grid itself says which, so no kind has to.
    """

    grid: np.ndarray
    sf: np.ndarray
    num_experts: int
    min_pvalue: float
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "kde"
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)
    _evenly_spaced: np.ndarray = field(init=False, repr=False, compare=False)  # bool [layers]

    def __post_init__(self):
        self._evenly_spaced = evenly_spaced(self.grid)

    # p is a non-increasing function of the logit, exactly in float32 (see TabulatedCurves._tables and
    # interpolate_rows), the same for every expert and token: sorting a token's logits sorts its
    # p-values, and ``p <= c`` is ``logit >= x(c)`` for a cut x(c) found once per layer (routers use both).
    monotone_in_logit = True
    pointwise_in_logit = True

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``P(null logit > x)`` for every entry of ``logits`` ``[tokens, experts]``; float32, in (0, 1]."""
        return self.pvalues_layers(logits.unsqueeze(0), [layer], temperature)[0]

    def pvalues_layers(self, logits: torch.Tensor, layers: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
        """:meth:`pvalues` of several layers in one call, equal to them exactly: ``logits`` ``[len(layers),
        tokens, experts]``, slice ``i`` against layer ``layers[i]``'s curve (recorders ask for a few sampled
        tokens of every layer at once, where a call per layer would cost more than the arithmetic)."""
        layers = [int(layer) for layer in layers]
        if logits.dim() != 3 or logits.shape[0] != len(layers):
            raise ValueError(f"logits: expected shape [{len(layers)} layers, tokens, experts], "
                             f"got {tuple(logits.shape)}")
        x = logits if logits.dtype == torch.float32 else logits.float()
        if temperature != 1.0:  # x / 1 is x: skip a pass over the logits
            x = x / temperature
        grid, sf = self._tables(logits.device)
        if self._evenly_spaced[layers].all():  # index arithmetic instead of a binary search
            key = (str(logits.device), tuple(layers))
            if key not in self._device_cache:
                self._device_cache[key] = UniformSegments(grid[layers], sf[layers])
            p = self._device_cache[key](x)
        else:
            p = interpolate_rows(x.reshape(len(layers), -1), grid[layers], sf[layers]).view(x.shape)
        return p.clamp_(min=self.min_pvalue, max=1.0)

    def save(self, path: str | os.PathLike) -> None:
        save_npz(path, kind=self.kind, grid=self.grid, sf=self.sf, num_experts=self.num_experts,
                 min_pvalue=self.min_pvalue, meta=json.dumps(self.meta))

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray]) -> TabulatedNull:
        """The null a saved ``.npz`` holds (its arrays by name)."""
        grid, sf = check_table_shapes(fields, ndim=2)
        return cls(grid=grid, sf=sf, num_experts=int(fields["num_experts"]), min_pvalue=float(fields["min_pvalue"]),
                   meta=meta_of(fields), kind=str(fields["kind"]) if "kind" in fields else "kde")

    @classmethod
    def load(cls, path: str | os.PathLike) -> TabulatedNull:
        """Read a per-layer tabulated null (kde, empirical, student_t, gmm); ``load_null`` reads every kind."""
        null = load_null(path)
        if not isinstance(null, cls):
            tabulated = ", ".join(repr(name) for name, kind in NULL_KINDS.items() if kind.load == cls.from_fields)
            raise ValueError(f"{path}: holds a {null.kind!r} null, not a per-layer tabulated one "
                             f"({tabulated}); read it with routelab.routing.nulls.load_null")
        return null


def fit_kde_layer(logits: np.ndarray, grid_size: int, cut: float = 4.0) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian KDE of one layer's pooled logits -> ``(grid, survival function, bandwidth)``.

    The data are linearly binned onto ``grid_size`` points (statsmodels' ``fast_linbin``, as its FFT
    KDE does) and the survival function of that binned KDE is computed exactly on the grid as
    ``sum_j w_j * Phi((c_j - x) / h)`` with one FFT convolution, so a million logits take well under
    a second. Bandwidth: Scott's rule (statsmodels ``bw_scott``).
    """
    from scipy.signal import fftconvolve
    from scipy.special import ndtr
    from statsmodels.nonparametric.bandwidths import bw_scott
    from statsmodels.nonparametric.linbin import fast_linbin

    values = np.asarray(logits, dtype=np.float64).ravel()
    if values.size < 2 or not np.all(np.isfinite(values)):
        raise ValueError("calibration logits: need at least 2 finite values per layer")
    bw = float(bw_scott(values))
    low, high = values.min() - cut * bw, values.max() + cut * bw
    grid = np.linspace(low, high, grid_size)
    weights = fast_linbin(values, low, high, grid_size)
    weights = weights / weights.sum()
    step = grid[1] - grid[0]
    offsets = np.arange(-(grid_size - 1), grid_size) * step  # c_j - x_i for every grid pair
    kernel = ndtr(offsets / bw)
    # sf[i] = sum_j w_j * Phi((c_j - x_i) / h): a correlation of the weights with the kernel.
    sf = fftconvolve(weights[::-1], kernel, mode="valid")[::-1]
    # FFT round-off (~1e-16) can make the tail wiggle; a survival function never rises.
    return grid, np.minimum.accumulate(np.clip(sf, 0.0, 1.0)), bw


def fit_kde_null(layer_logits: list[np.ndarray], num_experts: int, grid_size: int = 2048,
                 meta: dict[str, Any] | None = None) -> TabulatedNull:
    """Fit one KDE per layer from ``layer_logits[layer]`` (any shape, all experts pooled)."""
    layer_logits = [layer_values(layer, v, num_experts) for layer, v in enumerate(non_empty(layer_logits))]
    grids, sfs, bandwidths = [], [], []
    for layer, values in enumerate(layer_logits):
        if np.ptp(values) == 0:
            raise ValueError(f"calibration logits of layer {layer}: all equal; a KDE needs spread "
                             "(is the router trained?)")
        grid, sf, bw = fit_kde_layer(values, grid_size)
        grids.append(grid)
        sfs.append(sf)
        bandwidths.append(bw)
    samples = [int(v.size) for v in layer_logits]
    info = {**(meta or {}), "method": "kde", "bandwidths": bandwidths, "samples_per_layer": samples}
    return TabulatedNull(grid=np.stack(grids).astype(np.float32), sf=np.stack(sfs).astype(np.float32),
                         num_experts=num_experts, min_pvalue=1.0 / (min(samples) + 1), meta=info)


def quantile_ranks(n: int, quantiles: int) -> np.ndarray:
    """Sorted ranks (0-based, repeats allowed) of the order statistics an empirical table keeps.

    Half are evenly spaced over the sample; half are log-spaced towards the largest value, because
    the small p-values BH compares with ``alpha * i / N`` live in the upper tail: there the table
    keeps each of the top order statistics, so p is exact down to ``1 / n``.
    """
    body = np.linspace(0, n - 1, quantiles - quantiles // 2)
    tail = n - np.geomspace(1, max(n / 2, 1), quantiles // 2)  # distance 1 from the top is the maximum
    return np.sort(np.rint(np.concatenate([body, tail])).astype(np.int64).clip(0, n - 1))


def ecdf_table(sorted_values: np.ndarray, quantiles: int) -> tuple[np.ndarray, np.ndarray]:
    """Tabulated empirical survival function of one ascending sample -> float32 ``(grid, sf)``,
    ``[quantiles + 1]`` each.

    Knots are order statistics (as float32, the routing dtype); ``sf`` at a knot is the exact fraction
    of the sample greater than it. A first knot one float32 step below the minimum carries ``sf = 1``,
    so logits below the sample get p = 1 and the first interval is never empty.
    """
    n = sorted_values.size
    knots = sorted_values[quantile_ranks(n, quantiles)].astype(np.float32)
    grid = np.concatenate([[np.nextafter(knots[0], np.float32(-np.inf))], knots]).astype(np.float32)
    greater = n - np.searchsorted(sorted_values, grid.astype(np.float64), side="right")
    return grid, (greater / n).astype(np.float32)


def fit_empirical_null(layer_logits: list[np.ndarray], num_experts: int, quantiles: int = 4096,
                       meta: dict[str, Any] | None = None) -> TabulatedNull:
    """Per layer, the empirical survival function of all experts' logits pooled (any shape), tabulated
    at ``quantiles`` order statistics; p is floored at ``1 / (n + 1)`` (n: the smallest layer sample)."""
    check_quantiles(quantiles)
    tables, samples = [], []
    for layer, values in enumerate(non_empty(layer_logits)):
        values = layer_values(layer, values, num_experts)
        tables.append(ecdf_table(np.sort(values, axis=None), quantiles))
        samples.append(int(values.size))
    info = {**(meta or {}), "method": "empirical", "quantiles": quantiles, "samples_per_layer": samples}
    return TabulatedNull(grid=np.stack([g for g, _ in tables]), sf=np.stack([s for _, s in tables]),
                         num_experts=num_experts, min_pvalue=1.0 / (min(samples) + 1), meta=info, kind="empirical")


register_null(NullKind(
    "kde", "per layer, a Gaussian KDE of all experts' logits pooled", calibrated=True,
    fit=lambda logits, experts, size, meta: fit_kde_null(logits, experts, size, meta),
    load=TabulatedNull.from_fields, table_option="grid_size"))
register_null(NullKind(
    "empirical", "per layer, the empirical distribution of all experts' logits pooled", calibrated=True,
    fit=lambda logits, experts, size, meta: fit_empirical_null(logits, experts, size, meta),
    load=TabulatedNull.from_fields, table_option="quantiles"))
