"""Per-layer parametric nulls (kinds ``student_t`` and ``gmm``): a distribution fitted to each layer's pooled
logits, its survival function tabulated on an evenly spaced grid as ``kde``'s is, so p-values are read on the
device the same way.

- ``student_t``: a location-scale Student t fitted by maximum likelihood (``scipy.stats.t.fit``).
- ``gmm``: a 1-D Gaussian mixture fitted by EM, its number of components chosen by BIC.

The EM is written here because no dependency offers a Gaussian mixture (scipy has none; scikit-learn is not
a dependency). It is deterministic: the data are binned, the means start at quantiles, nothing is drawn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from routelab.routing.nulls.base import NullKind, layer_values, non_empty, register_null
from routelab.routing.nulls.tabulated import TabulatedNull

# t.fit evaluates the likelihood of all the values it is given tens of times: a larger layer is fitted on a
# seeded random subsample of this many values, so a layer takes well under a second whatever its size.
T_FIT_SAMPLES = 100_000
T_DF_BOUNDS = (0.1, 1e6)  # at 1e6 the t is the normal: logits with tails as light as the normal's stop there
GMM_MAX_COMPONENTS = 6
# EM runs on the logits binned into this many bins (occupied ones only), each bin carrying its count, mean
# and within-bin variance, so its iterations cost the same however large the calibration sample.
GMM_BINS = 2048
GMM_SD_FLOOR = 1e-2  # of the layer's sd: keeps a component from collapsing onto one repeated (bf16) value
EM_MAX_ITERATIONS = 1000
EM_TOLERANCE = 1e-10  # change of the mean log-likelihood per logit at which EM stops


@dataclass(frozen=True)
class Mixture:
    """A fitted 1-D Gaussian mixture: ``weights``, ``means``, ``sds`` ``[components]`` (ascending means) and
    the binned log-likelihood of the data it was fitted to."""

    weights: np.ndarray
    means: np.ndarray
    sds: np.ndarray
    log_likelihood: float
    iterations: int

    @property
    def components(self) -> int:
        return int(self.weights.size)

    def sf(self, x: np.ndarray) -> np.ndarray:
        """``P(X > x) = sum_k w_k Phi((mu_k - x) / sigma_k)``, float64, same shape as ``x``."""
        from scipy.special import ndtr  # here: scipy costs the route jobs' start-up nothing
        x = np.asarray(x, dtype=np.float64)
        tails = ndtr((self.means[:, None] - x.reshape(1, -1)) / self.sds[:, None])  # [components, values]
        return (self.weights @ tails).reshape(x.shape)

    def bic(self, samples: int) -> float:
        """Schwarz's criterion, ``-2 log L + (3 K - 1) log n`` (K - 1 weights, K means, K sds)."""
        return -2.0 * self.log_likelihood + (3 * self.components - 1) * np.log(samples)


def check_grid_size(grid_size: int) -> None:
    if grid_size < 2:
        raise ValueError(f"grid_size: {grid_size!r} is too small; valid: an integer >= 2 (e.g. 2048)")


def tabulate_survival(sf: Callable[[np.ndarray], np.ndarray], low: float, high: float, values: np.ndarray,
                      grid_size: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """A fitted survival function on ``grid_size`` evenly spaced points -> float32 ``(grid, sf)`` and the
    fitted ``sf`` at the grid's two ends.

    The grid runs from ``low`` to ``high`` (where the fit leaves ``min_pvalue / 2`` below and above),
    clipped to the calibration range widened by its own width on each side, so a fit with a tail near
    Cauchy's cannot spread the grid too thin to resolve the body. ``sf`` is evaluated at the float32 knots
    themselves, so the table is exact there, except the first knot, which carries 1 (the fit is within
    ``min_pvalue / 2`` of it unless clipped) so that logits below the grid get p = 1, as kde's do.
    """
    smallest, largest = float(values.min()), float(values.max())
    width = largest - smallest
    low, high = max(low, smallest - width), min(high, largest + width)
    assert low < high, (low, high)
    grid = np.linspace(low, high, grid_size).astype(np.float32)
    table = np.clip(sf(grid.astype(np.float64)), 0.0, 1.0)
    ends = [float(table[0]), float(table[-1])]
    table[0] = 1.0
    return grid, np.minimum.accumulate(table).astype(np.float32), ends  # a survival function never rises


def subsample(values: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """``values`` flattened, or ``max_samples`` of them drawn without replacement by a seeded generator
    (random rather than strided: a stride over ``[tokens, experts]`` would keep only some experts)."""
    flat = values.ravel()
    if flat.size <= max_samples:
        return flat
    return flat[np.sort(np.random.default_rng(seed).choice(flat.size, max_samples, replace=False))]


def inverse_df_optimizer(func: Callable[..., float], x0: np.ndarray, args: tuple = (), disp: int = 0) -> np.ndarray:
    """``t.fit``'s optimizer: L-BFGS-B over ``(1 / df, loc, log scale)`` with df in :data:`T_DF_BOUNDS`.

    In 1 / df the normal is a finite end (0) rather than df = infinity, where the likelihood is flat: the
    default (Nelder-Mead on the raw parameters) follows that flat direction for tens of seconds on
    light-tailed logits, and takes several times as many likelihood evaluations on heavy-tailed ones.
    """
    from scipy import optimize
    def objective(z: np.ndarray) -> float:
        return func(np.array([1 / z[0], z[1], np.exp(z[2])]), *args)

    start = np.array([1 / x0[0], x0[1], np.log(x0[2])])
    bounds = [(1 / T_DF_BOUNDS[1], 1 / T_DF_BOUNDS[0]), (None, None), (None, None)]
    z = optimize.minimize(objective, start, method="L-BFGS-B", bounds=bounds).x
    return np.array([1 / z[0], z[1], np.exp(z[2])])


def fit_student_t(values: np.ndarray, max_samples: int = T_FIT_SAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """Maximum-likelihood ``(df, loc, scale)`` of a location-scale Student t on ``values`` (any shape),
    fitted on at most ``max_samples`` of them (:func:`subsample`). Starts at df 10, the median, and the
    scale that gives a t with 10 df the sample's interquartile range."""
    from scipy import stats
    sample = subsample(np.asarray(values, dtype=np.float64), max_samples, seed)
    start_df = 10.0
    iqr_scale = stats.iqr(sample) / (2 * stats.t.ppf(0.75, start_df))
    scale = iqr_scale if iqr_scale > 0 else float(sample.std())  # IQR 0: over half the values tie
    df, loc, scale = stats.t.fit(sample, start_df, loc=float(np.median(sample)), scale=scale,
                                 optimizer=inverse_df_optimizer)
    return float(df), float(loc), float(scale)


def fit_student_t_layer(values: np.ndarray, grid_size: int, min_pvalue: float,
                        max_samples: int = T_FIT_SAMPLES) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One layer's fitted t, tabulated -> float32 ``(grid, sf)`` and the fit's parameters for ``meta``."""
    from scipy import stats
    df, loc, scale = fit_student_t(values, max_samples)
    fitted = stats.t(df, loc=loc, scale=scale)
    tail = min_pvalue / 2
    grid, sf, ends = tabulate_survival(fitted.sf, float(fitted.ppf(tail)), float(fitted.isf(tail)), values, grid_size)
    params = {"df": df, "loc": loc, "scale": scale, "fit_samples": int(min(values.size, max_samples)),
              "sf_at_grid_ends": ends}
    return grid, sf, params


def bin_values(values: np.ndarray, bins: int = GMM_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``values`` in ``bins`` equal-width bins over their range -> ``(means, counts, variances)`` of the
    occupied bins: what EM needs of each bin's values (exact for the M-step's sums)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    low, high = flat.min(), flat.max()
    index = np.minimum(((flat - low) * (bins / (high - low))).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    occupied = counts > 0
    means = np.bincount(index, weights=flat, minlength=bins)[occupied] / counts[occupied]
    dense = np.zeros(bins)
    dense[occupied] = means
    squares = np.bincount(index, weights=(flat - dense[index]) ** 2, minlength=bins)[occupied]
    return means, counts[occupied], squares / counts[occupied]


def weighted_quantiles(points: np.ndarray, counts: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles at ``levels`` of the data ``points`` (ascending) repeated ``counts`` times."""
    cumulative = np.cumsum(counts) / counts.sum()
    return points[np.minimum(np.searchsorted(cumulative, levels), points.size - 1)]


def fit_gaussian_mixture(points: np.ndarray, counts: np.ndarray, variances: np.ndarray, components: int,
                         sd_floor: float) -> Mixture:
    """EM for a ``components``-Gaussian mixture on binned data (:func:`bin_values`: bin means ``points``
    ascending, ``counts``, within-bin ``variances``).

    Initialisation: means at the ``(k + 1/2) / K`` quantiles, every sd the data's sd over K, equal weights.
    A bin's values share its responsibilities (computed at the bin mean); the M-step adds the within-bin
    variance, so its sums are those of the raw values. sds are floored at ``sd_floor``. Stops when the
    log-likelihood per value rises by less than :data:`EM_TOLERANCE`, or after :data:`EM_MAX_ITERATIONS`
    (components the data do not need converge slowly; their BIC is then that of the last iterate).
    """
    total = counts.sum()
    mean = (counts * points).sum() / total
    sd = np.sqrt((counts * ((points - mean) ** 2 + variances)).sum() / total)
    means = weighted_quantiles(points, counts, (np.arange(components) + 0.5) / components)
    sds = np.full(components, max(sd / components, sd_floor))
    weights = np.full(components, 1.0 / components)
    previous, iterations = -np.inf, 0
    while True:
        iterations += 1
        # E-step: log(w_k N(x_b; mu_k, sigma_k)) [components, bins], normalised per bin with the max taken out
        z = (points[None, :] - means[:, None]) / sds[:, None]
        joint = (np.log(weights / sds) - 0.5 * np.log(2 * np.pi))[:, None] - 0.5 * (z * z)
        top = joint.max(axis=0)
        scaled = np.exp(joint - top)
        density = scaled.sum(axis=0)  # [bins], times exp(-top)
        log_likelihood = float(counts @ (np.log(density) + top))
        if log_likelihood - previous < EM_TOLERANCE * total or iterations == EM_MAX_ITERATIONS:
            break
        previous = log_likelihood
        # M-step, on responsibilities times bin counts
        weighted = scaled * (counts / density)
        mass = np.maximum(weighted.sum(axis=1), np.finfo(np.float64).tiny)  # a starved component divides by ~0
        weights = mass / total
        means = (weighted @ points) / mass
        offset = points[None, :] - means[:, None]
        spread = (weighted @ variances + np.einsum("kb,kb->k", weighted, offset * offset)) / mass
        sds = np.maximum(np.sqrt(spread), sd_floor)
    order = np.argsort(means)
    return Mixture(weights[order], means[order], sds[order], log_likelihood, iterations)


def fit_gmm(values: np.ndarray, max_components: int = GMM_MAX_COMPONENTS) -> tuple[Mixture, list[tuple[float, int]]]:
    """The Gaussian mixture of ``values`` (any shape) with 1..``max_components`` components that has the
    smallest BIC (``n``: all values), and ``(BIC, EM iterations)`` of every candidate."""
    if max_components < 1:
        raise ValueError(f"max_components: {max_components!r}; valid: an integer >= 1 (e.g. 6)")
    if np.ptp(values) == 0:
        raise ValueError("values: all equal; a Gaussian mixture needs spread")
    points, counts, variances = bin_values(values)
    sd_floor = GMM_SD_FLOOR * float(np.std(values))
    fits = [fit_gaussian_mixture(points, counts, variances, k, sd_floor)
            for k in range(1, min(max_components, points.size) + 1)]
    candidates = [(mixture.bic(int(counts.sum())), mixture.iterations) for mixture in fits]
    return fits[int(np.argmin([bic for bic, _ in candidates]))], candidates


def fit_gmm_layer(values: np.ndarray, grid_size: int, min_pvalue: float,
                  max_components: int = GMM_MAX_COMPONENTS) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One layer's BIC-chosen mixture, tabulated -> float32 ``(grid, sf)`` and the fit for ``meta``.

    The grid's ends bound the mixture's ``min_pvalue / 2`` quantiles from outside: below
    ``min_k(mu_k - z sigma_k)`` and above ``max_k(mu_k + z sigma_k)``, with ``Phi(-z) = min_pvalue / 2``,
    lies at most that mass.
    """
    from scipy import stats
    mixture, candidates = fit_gmm(values, max_components)
    z = stats.norm.isf(min_pvalue / 2)
    low, high = float(np.min(mixture.means - z * mixture.sds)), float(np.max(mixture.means + z * mixture.sds))
    grid, sf, ends = tabulate_survival(mixture.sf, low, high, values, grid_size)
    params = {"components": mixture.components, "weights": mixture.weights.tolist(),
              "means": mixture.means.tolist(), "sds": mixture.sds.tolist(),
              "bic": {str(k): bic for k, (bic, _) in enumerate(candidates, start=1)},
              "em_iterations": {str(k): iterations for k, (_, iterations) in enumerate(candidates, start=1)},
              "sf_at_grid_ends": ends}
    return grid, sf, params


def fit_parametric_null(kind: str, fit_layer: Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]],
                        layer_logits: list[np.ndarray], num_experts: int, grid_size: int,
                        meta: dict[str, Any] | None, fit_info: dict[str, Any]) -> TabulatedNull:
    """Fit ``fit_layer`` to every layer's pooled logits and stack the tables into a ``kind`` null; p is
    floored at ``1 / (n + 1)`` (n: the smallest layer sample), as kde's is."""
    check_grid_size(grid_size)
    layer_logits = [layer_values(layer, v, num_experts) for layer, v in enumerate(non_empty(layer_logits))]
    for layer, values in enumerate(layer_logits):
        if np.ptp(values) == 0:
            raise ValueError(f"calibration logits of layer {layer}: all equal; a {kind} null needs spread "
                             "(is the router trained?)")
    samples = [int(v.size) for v in layer_logits]
    min_pvalue = 1.0 / (min(samples) + 1)
    grids, sfs, fits = [], [], []
    for layer, values in enumerate(layer_logits):
        grid, sf, params = fit_layer(values, grid_size, min_pvalue)
        grids.append(grid)
        sfs.append(sf)
        fits.append({"layer": layer, **params, "grid": [float(grid[0]), float(grid[-1])]})
    info = {**(meta or {}), "method": kind, **fit_info, "samples_per_layer": samples, "layer_fits": fits}
    return TabulatedNull(grid=np.stack(grids), sf=np.stack(sfs), num_experts=num_experts, min_pvalue=min_pvalue,
                         meta=info, kind=kind)


def fit_student_t_null(layer_logits: list[np.ndarray], num_experts: int, grid_size: int = 2048,
                       meta: dict[str, Any] | None = None, max_samples: int = T_FIT_SAMPLES) -> TabulatedNull:
    """Per layer, a location-scale Student t fitted by maximum likelihood to all experts' logits pooled
    (any shape), tabulated on ``grid_size`` points; ``meta["layer_fits"]`` holds each layer's df, loc, scale."""
    return fit_parametric_null(
        "student_t", lambda values, size, floor: fit_student_t_layer(values, size, floor, max_samples),
        layer_logits, num_experts, grid_size, meta,
        {"t_fit": {"optimizer": "L-BFGS-B over (1 / df, loc, log scale)", "df_bounds": list(T_DF_BOUNDS),
                   "max_samples": max_samples, "subsample": "seeded (0) random, without replacement"}})


def fit_gmm_null(layer_logits: list[np.ndarray], num_experts: int, grid_size: int = 2048,
                 meta: dict[str, Any] | None = None, max_components: int = GMM_MAX_COMPONENTS) -> TabulatedNull:
    """Per layer, a Gaussian mixture of all experts' logits pooled (any shape) with 1..``max_components``
    components chosen by BIC, tabulated on ``grid_size`` points; ``meta["layer_fits"]`` holds each layer's
    component count, weights, means, sds and the BIC of every candidate."""
    return fit_parametric_null(
        "gmm", lambda values, size, floor: fit_gmm_layer(values, size, floor, max_components),
        layer_logits, num_experts, grid_size, meta,
        {"gmm_fit": {"max_components": max_components, "em_bins": GMM_BINS, "sd_floor_of_layer_sd": GMM_SD_FLOOR,
                     "em_tolerance": EM_TOLERANCE, "em_max_iterations": EM_MAX_ITERATIONS}})


register_null(NullKind(
    "student_t", "per layer, a location-scale Student t fitted by maximum likelihood to all experts' logits pooled",
    calibrated=True, fit=lambda logits, experts, size, meta: fit_student_t_null(logits, experts, size, meta),
    load=TabulatedNull.from_fields, table_option="grid_size"))
register_null(NullKind(
    "gmm", "per layer, a Gaussian mixture (components chosen by BIC) of all experts' logits pooled",
    calibrated=True, fit=lambda logits, experts, size, meta: fit_gmm_null(logits, experts, size, meta),
    load=TabulatedNull.from_fields, table_option="grid_size"))
