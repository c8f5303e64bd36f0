"""Null distributions of router logits: fit, save, load, and the p-values routers derive from them.

Four kinds (``NULL_METHODS``), one interface: ``num_experts``, ``num_layers``, ``check_model``,
``pvalues(logits [tokens, experts], layer, temperature) -> float32 [tokens, experts] in (0, 1]`` on the
logits' device, ``save(path)``; ``load_null(path)`` reads any of them back (the ``.npz`` stores ``kind``).

- ``kde`` (default): per layer, a Gaussian KDE of the logits of all experts pooled, tabulated as a
  survival function ``sf(x) = P(logit > x)``; ``p = sf(logit / temperature)``.
- ``empirical``: per layer, the pooled empirical survival function (fraction of calibration logits
  greater than x) tabulated at quantiles and interpolated between them.
- ``per_expert``: the same, but one table per (layer, expert), so an expert that is habitually loud is
  judged against its own history rather than the layer's.
- ``gaussian``: no calibration; each token's logits are standardised over experts and
  ``p = 1 - Phi(z / temperature)``.

None of these makes the experts' p-values independent tests of exchangeable nulls: BH on them is a
calibrated heuristic for choosing k, not an FDR guarantee.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .io import atomic_path

NULL_METHODS = ("kde", "empirical", "per_expert", "gaussian")
CALIBRATED_METHODS = ("kde", "empirical", "per_expert")


class NullMismatchError(ValueError):
    """A null fitted for a different model (layer or expert count differs)."""


def _check_counts(fitted: tuple[int, int], model_name: str, num_layers: int, num_experts: int) -> None:
    if (num_layers, num_experts) != fitted:
        raise NullMismatchError(
            f"null: fitted for {fitted[0]} MoE layers x {fitted[1]} experts (model {model_name!r}) but the "
            f"model has {num_layers} x {num_experts}; rerun calibrate_null for this model"
        )


def _save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _device_tables(cache: dict, device: torch.device, grid: np.ndarray,
                   sf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 copies of the tables on ``device``, made once per device (routing calls this per layer).

    ``sf`` is made non-increasing along its last axis (a running minimum: a survival function cannot
    rise; a table whose float rounding made it rise by a hair is read as flat there), so p never rises
    with the logit.
    """
    key = str(device)
    if key not in cache:
        sf = np.minimum.accumulate(np.asarray(sf, dtype=np.float32), axis=-1)
        cache[key] = (torch.as_tensor(grid, dtype=torch.float32, device=device).contiguous(),
                      torch.as_tensor(sf, dtype=torch.float32, device=device).contiguous())
    return cache[key]


@dataclass
class TabulatedNull:
    """Survival functions of router logits, one tabulated curve per MoE layer (kinds kde, empirical).

    ``grid`` and ``sf`` are ``[layers, points]``; ``grid`` rows do not decrease, ``sf`` rows do not
    increase, from ~1 to ~0. ``min_pvalue`` floors p so it stays in ``(0, 1]`` beyond the fitted range.
    """

    grid: np.ndarray
    sf: np.ndarray
    num_experts: int
    min_pvalue: float
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "kde"
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_layers(self) -> int:
        return int(self.grid.shape[0])

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Refuse to route a model this null was not fitted for."""
        _check_counts((self.num_layers, self.num_experts), self.meta.get("model", "?"), num_layers, num_experts)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return _device_tables(self._device_cache, device, self.grid, self.sf)

    # p is a non-increasing function of the logit, exactly in float32 (see _device_tables and
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
            raise ValueError(f"logits: expected shape [{len(layers)} layers, tokens, experts], got {tuple(logits.shape)}")
        x = logits if logits.dtype == torch.float32 else logits.float()
        if temperature != 1.0:  # x / 1 is x: skip a pass over the logits
            x = x / temperature
        grid, sf = self._tables(logits.device)
        if self.kind == "kde":  # evenly spaced grid: index arithmetic instead of a binary search
            key = (str(logits.device), tuple(layers))
            if key not in self._device_cache:
                self._device_cache[key] = UniformSegments(grid[layers], sf[layers])
            p = self._device_cache[key](x)
        else:
            p = interpolate_rows(x.reshape(len(layers), -1), grid[layers], sf[layers]).view(x.shape)
        return p.clamp_(min=self.min_pvalue, max=1.0)

    def save(self, path: str | os.PathLike) -> None:
        _save_npz(path, kind=self.kind, grid=self.grid, sf=self.sf, num_experts=self.num_experts,
                  min_pvalue=self.min_pvalue, meta=json.dumps(self.meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TabulatedNull":
        """Read a per-layer tabulated null (kde or empirical); ``load_null`` reads every kind."""
        null = load_null(path)
        if not isinstance(null, cls):
            raise ValueError(f"{path}: holds a {null.kind!r} null, not a per-layer tabulated one "
                             "('kde', 'empirical'); read it with routelab.nulls.load_null")
        return null


@dataclass
class PerExpertNull:
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
    def num_layers(self) -> int:
        return int(self.grid.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.grid.shape[1])

    def check_model(self, num_layers: int, num_experts: int) -> None:
        """Refuse to route a model this null was not fitted for."""
        _check_counts((self.num_layers, self.num_experts), self.meta.get("model", "?"), num_layers, num_experts)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return _device_tables(self._device_cache, device, self.grid, self.sf)

    def pvalues(self, logits: torch.Tensor, layer: int, temperature: float = 1.0) -> torch.Tensor:
        """``P(expert e's null logit > x[:, e])`` for ``logits`` ``[tokens, experts]``; float32, in (0, 1]."""
        if logits.shape[-1] != self.num_experts:
            raise NullMismatchError(f"null: fitted for {self.num_experts} experts but the logits have "
                                    f"{logits.shape[-1]}; rerun calibrate_null for this model")
        grid, sf = self._tables(logits.device)
        x = (logits.float() / temperature).t().contiguous()  # [experts, tokens]: one searchsorted row each
        return interpolate_rows(x, grid[layer], sf[layer]).clamp_(min=self.min_pvalue, max=1.0).t().contiguous()

    def save(self, path: str | os.PathLike) -> None:
        _save_npz(path, kind=self.kind, grid=self.grid, sf=self.sf, min_pvalue=self.min_pvalue,
                  meta=json.dumps(self.meta))


@dataclass
class GaussianNull:
    """Within-token null (kind gaussian): ``z = (x - mean) / std`` over the token's experts
    (population std), ``p = 1 - Phi(z / temperature)``. Needs no calibration.

    ``num_layers`` is None (any layer count). ``num_experts`` is None (works for any expert count)
    unless given, in which case ``check_model`` and routers check it. A token whose logits are all
    equal gets p = 0.5 everywhere. ``min_pvalue`` keeps p > 0 where ``Phi`` underflows.
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
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, correction=0, keepdim=True)
        # A std at the level of float rounding means "all equal": call it z = 0 rather than noise / noise.
        flat = std <= torch.finfo(torch.float32).eps * x.abs().amax(dim=-1, keepdim=True)
        z = torch.where(flat, 0.0, (x - mean) / torch.where(flat, 1.0, std))
        return torch.special.ndtr(-z / temperature).clamp_(min=self.min_pvalue, max=1.0)

    def save(self, path: str | os.PathLike) -> None:
        extra = {} if self.num_experts is None else {"num_experts": self.num_experts}
        _save_npz(path, kind=self.kind, min_pvalue=self.min_pvalue, meta=json.dumps(self.meta), **extra)


Null = TabulatedNull | PerExpertNull | GaussianNull


def _null_from_fields(kind: str, fields: dict[str, np.ndarray]) -> Null:
    """Build the null a saved file describes; raises KeyError for a missing field, ValueError for bad shapes."""
    meta = json.loads(str(fields["meta"]))
    if kind == "gaussian":
        num_experts = int(fields["num_experts"]) if "num_experts" in fields else None
        return GaussianNull(num_experts=num_experts, min_pvalue=float(fields["min_pvalue"]), meta=meta)
    grid, sf = fields["grid"], fields["sf"]
    ndim = 3 if kind == "per_expert" else 2
    if grid.ndim != ndim or grid.shape != sf.shape or grid.shape[-1] < 2:
        raise ValueError(f"grid {grid.shape} and sf {sf.shape} must be equal {ndim}-D shapes with >= 2 points")
    if kind == "per_expert":
        return PerExpertNull(grid=grid, sf=sf, min_pvalue=float(fields["min_pvalue"]), meta=meta)
    return TabulatedNull(grid=grid, sf=sf, num_experts=int(fields["num_experts"]),
                         min_pvalue=float(fields["min_pvalue"]), meta=meta, kind=kind)


def load_null(path: str | os.PathLike) -> Null:
    """Read a null of any kind saved by ``save``. A file without ``kind`` (older kde nulls) reads as kde."""
    path = Path(path)
    valid = f"valid kinds: {', '.join(NULL_METHODS)}"
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable null .npz ({exc}); {valid}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single array, not a null .npz with a 'kind' field; {valid}")
    with data:
        try:
            fields = {name: data[name] for name in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: corrupt null .npz ({exc}); {valid}") from None
    kind = str(fields["kind"]) if "kind" in fields else "kde"
    if kind not in NULL_METHODS:
        raise ValueError(f"{path}: unknown null kind {kind!r}; {valid}")
    try:
        return _null_from_fields(kind, fields)
    except KeyError as exc:
        raise ValueError(f"{path}: corrupt {kind!r} null, field {exc} is missing; {valid}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: corrupt {kind!r} null ({exc}); {valid}") from None


def interpolate_rows(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise ``np.interp`` on device: ``x`` ``[rows, n]``, ``xp``/``fp`` ``[rows, points]``.

    ``xp`` rows must not decrease; repeated knots (ties in the data) are allowed after the first pair.
    Beyond the ends the end values are returned, as ``np.interp`` does. Each result lies between its
    segment's end values, so rows of ``fp`` that do not increase give results that never increase with
    ``x``, exactly (routers rely on it).
    """
    right = torch.searchsorted(xp, x).clamp_(1, xp.shape[-1] - 1)
    left = right - 1
    x0, x1, y0, y1 = xp.gather(-1, left), xp.gather(-1, right), fp.gather(-1, left), fp.gather(-1, right)
    width = x1 - x0
    t = torch.where(width > 0, (x - x0) / torch.where(width > 0, width, 1.0), (x >= x1).to(x.dtype))
    # Kept between the segment's end values: float rounding could otherwise step past y1 by one ulp,
    # and with it a monotone ``fp`` would give a result that is not exactly monotone in ``x``.
    return (y0 + t.clamp_(0.0, 1.0) * (y1 - y0)).clamp_(torch.minimum(y0, y1), torch.maximum(y0, y1))


class UniformSegments:
    """:func:`interpolate` for knots ``xp`` evenly spaced (up to float rounding), without a binary
    search; built once per curve, then called on ``x`` of any shape (routing does so per layer).

    ``xp`` / ``fp`` are one curve ``[points]`` or several ``[curves, points]`` (the layers of a null,
    whose p-values are then computed in one call); with several, ``x``'s first axis runs over the
    curves (``[curves, ...]``) and each slice is interpolated on its own curve, exactly as one curve would.

    The segment of ``x`` is computed from the spacing and corrected by one step against the stored
    knots, so the result equals the ``searchsorted`` one exactly, including at the knots. Per segment
    ``j`` (knots ``j`` and ``j + 1``) a table row holds what :func:`interpolate_rows` computes per value
    (left and right knot, width, left value, rise and the end values' range), with the same float
    operations, so a call is two row lookups (``index_select``) and a few elementwise passes.
    """

    def __init__(self, xp: torch.Tensor, fp: torch.Tensor):
        self.curves = None if xp.dim() == 1 else xp.shape[0]
        xp, fp = xp.reshape(-1, xp.shape[-1]), fp.reshape(-1, fp.shape[-1])  # [curves, points]
        self.last = xp.shape[-1] - 1

        x0, x1, y0, y1 = (part.reshape(-1) for part in (xp[:, :-1], xp[:, 1:], fp[:, :-1], fp[:, 1:]))
        width = x1 - x0
        positive = width > 0
        self.all_positive = bool(positive.all())
        # One row per segment (all curves' segments in turn), read with one index_select per lookup:
        # the knots to correct the guess by, then what the interpolation needs.
        self.knots = torch.stack([x0, x1], dim=-1)
        self.segments = torch.stack([x0, torch.where(positive, width, 1.0), y0, y1 - y0, torch.minimum(y0, y1),
                                     torch.maximum(y0, y1), x1, positive.to(x0.dtype)], dim=-1)
        self.start, self.scale = xp[:, :1], self.last / (xp[:, -1:] - xp[:, :1])  # [curves, 1]
        # where each curve's segments start in the tables, for the guess and (one less) for the corrected segment
        self.offset = torch.arange(0, xp.shape[0] * self.last, self.last, dtype=torch.int32, device=xp.device)[:, None]
        self.offset_before = self.offset - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.curves is not None and (x.dim() == 0 or x.shape[0] != self.curves):
            raise ValueError(f"x: expected a first axis of {self.curves} (one slice per curve), got shape {tuple(x.shape)}")
        rows = x.reshape(1 if self.curves is None else self.curves, -1)  # [curves, values]

        def lookup(table: torch.Tensor, segment: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
            return table.index_select(0, (segment + offset).view(-1)).view(*rows.shape, table.shape[-1])

        # Segment j holds x in (knot j, knot j + 1] (searchsorted, side="left"; the first also what lies
        # below, the last what lies beyond): the guess is within one segment of it, and guess + [x > its
        # right knot] + [x > its left knot] - 1 is the segment (the - 1 is in offset_before).
        guess = ((rows - self.start) * self.scale).clamp_(0.0, float(self.last - 1)).floor_().int()
        knots = lookup(self.knots, guess, self.offset)
        segment = (guess + (rows > knots[..., 1])).add_(rows > knots[..., 0]).clamp_(1, self.last)
        x0, width, y0, rise, low, high, x1, positive = lookup(self.segments, segment, self.offset_before).unbind(-1)
        t = (rows - x0).div_(width)
        if not self.all_positive:  # repeated knots (ties in the data): a step at the knot
            t = torch.where(positive > 0, t, (rows >= x1).to(rows.dtype))
        return (y0 + t.clamp_(0.0, 1.0) * rise).clamp_(low, high).view(x.shape)


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``np.interp`` on device: ``x`` any shape, ``xp`` non-decreasing ``[points]``."""
    flat = x.reshape(1, -1)
    return interpolate_rows(flat, xp.reshape(1, -1), fp.reshape(1, -1)).reshape(x.shape)


def _layer_values(layer: int, values: Any, num_experts: int) -> np.ndarray:
    """One layer's calibration logits as float64, checked: finite, and ``[tokens, num_experts]`` if 2-D."""
    array = np.asarray(values, dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(array)))
    if bad:
        raise ValueError(f"calibration logits of layer {layer}: {bad} of {array.size} values are NaN or "
                         "infinite; check the model dtype (overflow) and the calibration inputs")
    if array.ndim == 2 and array.shape[1] != num_experts:
        raise ValueError(f"calibration logits of layer {layer}: shape {list(array.shape)} but num_experts is "
                         f"{num_experts}; valid: [tokens, {num_experts}]")
    if array.size < 2:
        raise ValueError(f"calibration logits of layer {layer}: {array.size} values; need at least 2")
    return array


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
    layer_logits = [_layer_values(layer, v, num_experts) for layer, v in enumerate(_non_empty(layer_logits))]
    grids, sfs, bandwidths = [], [], []
    for layer, values in enumerate(layer_logits):
        if np.ptp(values) == 0:
            raise ValueError(f"calibration logits of layer {layer}: all equal; a KDE needs spread (is the router trained?)")
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


def _check_quantiles(quantiles: int) -> None:
    if quantiles < 2:
        raise ValueError(f"quantiles: {quantiles!r} is too small; valid: an integer >= 2 (e.g. 4096)")


def _non_empty(layer_logits: list[np.ndarray]) -> list[np.ndarray]:
    if layer_logits is None or len(layer_logits) == 0:
        raise ValueError("calibration logits: no layers; need one array of logits per MoE layer")
    return list(layer_logits)


def fit_empirical_null(layer_logits: list[np.ndarray], num_experts: int, quantiles: int = 4096,
                       meta: dict[str, Any] | None = None) -> TabulatedNull:
    """Per layer, the empirical survival function of all experts' logits pooled (any shape), tabulated
    at ``quantiles`` order statistics; p is floored at ``1 / (n + 1)`` (n: the smallest layer sample)."""
    _check_quantiles(quantiles)
    tables, samples = [], []
    for layer, values in enumerate(_non_empty(layer_logits)):
        values = _layer_values(layer, values, num_experts)
        tables.append(ecdf_table(np.sort(values, axis=None), quantiles))
        samples.append(int(values.size))
    info = {**(meta or {}), "method": "empirical", "quantiles": quantiles, "samples_per_layer": samples}
    return TabulatedNull(grid=np.stack([g for g, _ in tables]), sf=np.stack([s for _, s in tables]),
                         num_experts=num_experts, min_pvalue=1.0 / (min(samples) + 1), meta=info, kind="empirical")


def fit_per_expert_null(layer_logits: list[np.ndarray], num_experts: int, quantiles: int = 4096,
                        meta: dict[str, Any] | None = None) -> PerExpertNull:
    """Per layer and expert, the empirical survival function of that expert's logits.

    ``layer_logits[layer]`` is ``[tokens, num_experts]``. Tables are ``[layers, experts, quantiles + 1]``;
    p is floored at ``1 / (tokens + 1)`` (the smallest layer's token count).
    """
    _check_quantiles(quantiles)
    grids, sfs, tokens = [], [], []
    for layer, values in enumerate(_non_empty(layer_logits)):
        values = _layer_values(layer, values, num_experts)
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


def fit_null(method: str, layer_logits: list[np.ndarray] | None, num_experts: int, *, grid_size: int = 2048,
             quantiles: int = 4096, meta: dict[str, Any] | None = None) -> Null:
    """Fit the null ``method`` names (one of ``NULL_METHODS``) from per-layer calibration logits.

    ``grid_size`` applies to kde, ``quantiles`` to empirical and per_expert; gaussian ignores
    ``layer_logits`` (pass None) and is built for ``num_experts``.
    """
    if method == "kde":
        return fit_kde_null(layer_logits, num_experts, grid_size, meta)
    if method == "empirical":
        return fit_empirical_null(layer_logits, num_experts, quantiles, meta)
    if method == "per_expert":
        return fit_per_expert_null(layer_logits, num_experts, quantiles, meta)
    if method == "gaussian":
        return GaussianNull(num_experts=num_experts, meta={**(meta or {}), "method": "gaussian"})
    raise ValueError(f"null method: {method!r} is not a null; choose one of {', '.join(NULL_METHODS)}")
