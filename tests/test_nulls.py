"""Null distributions against numpy/scipy references: interpolation, KDE survival function, storage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import gaussian_kde

from routelab.nulls import (NullMismatchError, TabulatedNull, UniformSegments, fit_kde_layer, fit_kde_null,
                            fit_null, interpolate)


@pytest.mark.parametrize("seed", range(5))
def test_interpolate_matches_numpy_interp(seed):
    rng = np.random.default_rng(seed)
    xp = np.sort(rng.uniform(-5, 5, size=rng.integers(2, 50))).astype(np.float32)
    xp = np.unique(xp)
    fp = rng.normal(size=xp.size).astype(np.float32)
    # Points inside, outside on both sides (np.interp clamps to the end values) and on the knots.
    x = np.concatenate([rng.uniform(-8, 8, size=500), xp, [xp[0] - 100, xp[-1] + 100]]).astype(np.float32)
    got = interpolate(torch.from_numpy(x).reshape(1, -1), torch.from_numpy(xp), torch.from_numpy(fp))
    expected = np.interp(x.astype(np.float64), xp.astype(np.float64), fp.astype(np.float64))
    np.testing.assert_allclose(got.numpy().reshape(-1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_uniform_segments_lookup_equals_the_binary_search_exactly(seed):
    # The kde null's fast path must give bit-identical p-values to searchsorted interpolation:
    # on the knots, one float step either side of them, between them and beyond both ends.
    rng = np.random.default_rng(seed)
    points = int(rng.integers(2, 3000))
    low, high = sorted(rng.normal(0, 5, size=2))
    xp = torch.linspace(float(low), float(high), points)
    if seed % 2 and points > 3:  # a repeated knot (ties in the data): a step there
        xp[points // 2] = xp[points // 2 - 1]
    fp = torch.from_numpy(np.sort(rng.uniform(size=points))[::-1].copy()).float()
    x = torch.cat([torch.from_numpy(rng.uniform(low - 1, high + 1, size=4000)).float(), xp,
                   torch.nextafter(xp, torch.tensor(-np.inf)), torch.nextafter(xp, torch.tensor(np.inf)),
                   torch.tensor([low - 100.0, high + 100.0])])
    expected = interpolate(x, xp, fp)
    got = UniformSegments(xp, fp)(x.reshape(-1, 2) if x.numel() % 2 == 0 else x).reshape(-1)
    assert torch.equal(got, expected), (got - expected).abs().max()


def test_uniform_segments_of_several_curves_equal_each_curve_alone():
    # One lookup over the stacked curves of several layers (the recorders' batched p-values) must give
    # what each curve's own lookup and the binary search give, bit for bit, including a repeated knot.
    rng = np.random.default_rng(7)
    xp = torch.stack([torch.linspace(-3.0, 4.0, 300), torch.linspace(-1.0, 9.0, 300), torch.linspace(0.5, 0.75, 300)])
    xp[1, 150] = xp[1, 149]
    fp = torch.from_numpy(np.sort(rng.uniform(size=(3, 300)), axis=-1)[:, ::-1].copy()).float()
    x = torch.from_numpy(rng.uniform(-5, 11, size=(3, 40, 7))).float()
    x[:, 0, :3] = xp[:, [0, 150, 299]]  # on the knots
    got = UniformSegments(xp, fp)(x)
    for curve in range(3):
        alone = UniformSegments(xp[curve], fp[curve])(x[curve])
        assert torch.equal(got[curve], alone)
        assert torch.equal(alone, interpolate(x[curve], xp[curve], fp[curve]))
    with pytest.raises(ValueError, match=r"x: expected a first axis of 3 \(one slice per curve\), got shape \(2, 40\)"):
        UniformSegments(xp, fp)(x[:2, :, 0])


@pytest.mark.parametrize("kind", ["kde", "empirical"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_pvalues_of_several_layers_in_one_call_equal_one_call_per_layer(kind, temperature):
    rng = np.random.default_rng(3)
    layers = [rng.normal(loc, 1.0, size=(200, 6)).astype(np.float32) for loc in (0.0, 1.0, -0.5)]
    null = fit_null(kind, layers, 6)
    logits = torch.from_numpy(rng.normal(0.2, 1.5, size=(2, 9, 6))).float()
    chosen = [2, 0]
    got = null.pvalues_layers(logits, chosen, temperature)
    expected = torch.stack([null.pvalues(logits[i], layer, temperature) for i, layer in enumerate(chosen)])
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match=r"logits: expected shape \[3 layers, tokens, experts\], got \(2, 9, 6\)"):
        null.pvalues_layers(logits, [0, 1, 2])


def test_interpolate_keeps_shape_and_clamps():
    xp, fp = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 0.5, 0.0])
    x = torch.tensor([[-1.0, 0.0, 0.25], [1.5, 2.0, 9.0]])
    # Hand: clamp left -> 1, knot -> 1, 0.25 of the way to 0.5 -> 0.875, 1.5 -> 0.25, knot -> 0, clamp right -> 0.
    expected = torch.tensor([[1.0, 1.0, 0.875], [0.25, 0.0, 0.0]])
    torch.testing.assert_close(interpolate(x, xp, fp), expected, atol=0, rtol=0)


def scott_bandwidth(values: np.ndarray) -> float:
    """Scott's rule as statsmodels states it: 1.059 * min(std, IQR / 1.349) * n^(-1/5)."""
    iqr = (np.percentile(values, 75) - np.percentile(values, 25)) / 1.349
    sigma = min(np.std(values, ddof=1), iqr) if iqr > 0 else np.std(values, ddof=1)
    return 1.059 * sigma * values.size ** -0.2


SAMPLES = {
    "normal": lambda rng: rng.normal(0.5, 1.3, size=2000),
    "bimodal": lambda rng: np.concatenate([rng.normal(-2, 0.5, size=1400), rng.normal(3, 1.0, size=600)]),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_fit_kde_layer_survival_matches_scipy_gaussian_kde(name):
    values = SAMPLES[name](np.random.default_rng(11))
    grid, sf, bw = fit_kde_layer(values, grid_size=2048)
    assert bw == pytest.approx(scott_bandwidth(values), rel=1e-9)
    assert np.all(np.diff(grid) > 0) and np.all(np.diff(sf) <= 0)
    # cut = 4 bandwidths beyond the data: the KDE mass outside the grid is below Phi(-4) / n-ish.
    assert sf[0] == pytest.approx(1.0, abs=1e-6) and sf[-1] == pytest.approx(0.0, abs=1e-6)
    # Same bandwidth in scipy's parametrisation: kernel sd = bw_method * sample sd (ddof=1).
    reference = gaussian_kde(values, bw_method=bw / np.std(values, ddof=1))
    for x in np.quantile(values, [0.001, 0.05, 0.25, 0.5, 0.75, 0.95, 0.999]).tolist() + [values.max() + bw]:
        expected = reference.integrate_box_1d(x, np.inf)
        assert np.interp(x, grid, sf) == pytest.approx(expected, abs=1e-5), x  # FFT binning error ~1e-6


def test_fit_kde_layer_rejects_bad_values():
    with pytest.raises(ValueError, match="finite"):
        fit_kde_layer(np.array([0.0, np.nan, 1.0]), 64)
    with pytest.raises(ValueError, match="at least 2"):
        fit_kde_layer(np.array([1.0]), 64)


@pytest.fixture
def fitted_null():
    rng = np.random.default_rng(12)
    layers = [rng.normal(0, 1, size=(300, 8)), rng.normal(1, 2, size=(250, 8))]
    return fit_kde_null(layers, num_experts=8, grid_size=256, meta={"model": "tiny"})


def test_fit_kde_null_metadata(fitted_null):
    assert fitted_null.num_layers == 2 and fitted_null.grid.shape == fitted_null.sf.shape == (2, 256)
    assert fitted_null.meta["samples_per_layer"] == [2400, 2000]
    assert fitted_null.min_pvalue == pytest.approx(1 / 2001)  # 1 / (smallest pooled sample + 1)
    assert fitted_null.meta["model"] == "tiny"


def test_tabulated_null_save_load_round_trip(fitted_null, tmp_path):
    path = tmp_path / "sub" / "null.npz"
    fitted_null.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["null.npz"], "no temporary files left behind"
    loaded = TabulatedNull.load(path)
    np.testing.assert_array_equal(loaded.grid, fitted_null.grid)
    np.testing.assert_array_equal(loaded.sf, fitted_null.sf)
    assert loaded.grid.dtype == fitted_null.grid.dtype
    assert loaded.num_experts == 8 and loaded.min_pvalue == fitted_null.min_pvalue
    assert loaded.meta == fitted_null.meta
    logits = torch.randn(20, 8)
    torch.testing.assert_close(loaded.pvalues(logits, 1), fitted_null.pvalues(logits, 1), atol=0, rtol=0)


def test_check_model_names_the_counts(fitted_null):
    fitted_null.check_model(2, 8)
    with pytest.raises(NullMismatchError, match=r"2 MoE layers x 8 experts.*'tiny'.*16 x 64"):
        fitted_null.check_model(16, 64)
    with pytest.raises(NullMismatchError, match=r"2 x 4"):
        fitted_null.check_model(2, 4)


def test_pvalues_in_unit_interval_and_non_increasing(fitted_null):
    logits = torch.linspace(-30, 30, 4001).reshape(-1, 1).expand(-1, 8).contiguous()
    for layer in range(2):
        p = fitted_null.pvalues(logits, layer)[:, 0]
        assert p.dtype == torch.float32
        assert ((p > 0) & (p <= 1)).all()
        assert (p.diff() <= 0).all()
        assert p[0] == 1.0 and p[-1] == pytest.approx(fitted_null.min_pvalue)
    # Reference: the tabulated curve through np.interp, floored at min_pvalue.
    x = np.random.default_rng(13).normal(0, 3, size=(50, 8)).astype(np.float32)
    expected = np.clip(np.interp(x, fitted_null.grid[1], fitted_null.sf[1]), fitted_null.min_pvalue, 1.0)
    np.testing.assert_allclose(fitted_null.pvalues(torch.from_numpy(x), 1).numpy(), expected, atol=1e-6)
    # Temperature divides the logit before the lookup.
    expected_t = np.clip(np.interp(x / 2.5, fitted_null.grid[1], fitted_null.sf[1]), fitted_null.min_pvalue, 1.0)
    np.testing.assert_allclose(fitted_null.pvalues(torch.from_numpy(x), 1, temperature=2.5).numpy(), expected_t,
                               atol=1e-6)
