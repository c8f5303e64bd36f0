"""Per-layer null distributions of router logits and the p-values routers derive from them.

``calibrate_null`` collects router logits of the unpatched model on held-out text, pools all experts
of a layer, and fits a Gaussian KDE (statsmodels, FFT on a grid, Scott bandwidth). The KDE is
tabulated as a survival function ``sf(x) = P(logit > x)`` on a grid, saved to ``null.npz``, and
interpolated on the model's device at routing time: ``p = sf(logit / temperature)``.

Because all experts of a layer share one pooled null, the p-values are not independent tests of
exchangeable nulls, and BH on them is a calibrated heuristic for choosing k, not an FDR guarantee.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .io import atomic_path


class NullMismatchError(ValueError):
    """A null fitted for a different model (layer or expert count differs)."""


@dataclass
class TabulatedNull:
    """Survival functions of router logits, one tabulated curve per MoE layer.

    ``grid`` and ``sf`` are ``[layers, points]``; ``grid`` rows increase, ``sf`` rows decrease from
    ~1 to ~0. ``min_pvalue`` floors p so it stays in ``(0, 1]`` beyond the fitted range.
    """

    grid: np.ndarray
    sf: np.ndarray
    num_experts: int
    min_pvalue: float
    meta: dict[str, Any] = field(default_factory=dict)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return int(self.grid.shape[0])

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Refuse to route a model this null was not fitted for."""
        if (num_layers, num_experts) != (self.num_layers, self.num_experts):
            raise NullMismatchError(
                f"null: fitted for {self.num_layers} MoE layers x {self.num_experts} experts "
                f"(model {self.meta.get('model', '?')!r}) but the model has {num_layers} x {num_experts}; "
                "rerun calibrate_null for this model"
            )

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (
                torch.as_tensor(self.grid, dtype=torch.float32, device=device).contiguous(),
                torch.as_tensor(self.sf, dtype=torch.float32, device=device).contiguous(),
            )
        return self._device_cache[key]

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``P(null logit > x)`` for every entry of ``logits`` ``[tokens, experts]``; float32, in (0, 1]."""
        grid, sf = self._tables(logits.device)
        x = (logits.float() / temperature).contiguous()
        return interpolate(x, grid[layer], sf[layer]).clamp_(min=self.min_pvalue, max=1.0)

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, grid=self.grid, sf=self.sf, num_experts=self.num_experts,
                         min_pvalue=self.min_pvalue, meta=json.dumps(self.meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TabulatedNull":
        with np.load(Path(path)) as data:
            return cls(grid=data["grid"], sf=data["sf"], num_experts=int(data["num_experts"]),
                       min_pvalue=float(data["min_pvalue"]), meta=json.loads(str(data["meta"])))


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` on device: ``x`` any shape, ``xp`` increasing ``[points]``."""
    flat = x.reshape(-1)
    right = torch.searchsorted(xp, flat).clamp_(1, xp.numel() - 1)
    left = right - 1
    x0, x1, y0, y1 = xp[left], xp[right], fp[left], fp[right]
    t = ((flat - x0) / (x1 - x0)).clamp_(0.0, 1.0)
    return (y0 + t * (y1 - y0)).reshape(x.shape)


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
    return grid, np.clip(sf, 0.0, 1.0), bw


def fit_kde_null(layer_logits: list[np.ndarray], num_experts: int, grid_size: int = 2048,
                 meta: dict[str, Any] | None = None) -> TabulatedNull:
    """Fit one KDE per layer from ``layer_logits[layer]`` (any shape, all experts pooled)."""
    grids, sfs, bandwidths = [], [], []
    for layer, values in enumerate(layer_logits):
        if np.ptp(np.asarray(values)) == 0:
            raise ValueError(f"calibration logits of layer {layer}: all equal; a KDE needs spread (is the router trained?)")
        grid, sf, bw = fit_kde_layer(values, grid_size)
        grids.append(grid)
        sfs.append(sf)
        bandwidths.append(bw)
    samples = min(int(np.asarray(v).size) for v in layer_logits)
    info = {**(meta or {}), "method": "kde", "bandwidths": bandwidths,
            "samples_per_layer": [int(np.asarray(v).size) for v in layer_logits]}
    return TabulatedNull(grid=np.stack(grids).astype(np.float32), sf=np.stack(sfs).astype(np.float32),
                         num_experts=num_experts, min_pvalue=1.0 / (samples + 1), meta=info)
