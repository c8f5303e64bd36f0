"""The parametric nulls (student_t, gmm): fits against known distributions and scipy's maximum likelihood,
tabulated p-values against the fitted survival function, saved and loaded, routed by BH, refused on bad
calibration logits, fitted by the calibrate_null job."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from routelab.routing import BHRouter
from routelab.routing.nulls import (
    NULL_KINDS,
    TabulatedNull,
    evenly_spaced,
    fit_gmm,
    fit_gmm_null,
    fit_null,
    fit_student_t,
    fit_student_t_null,
    interpolate_rows,
    load_null,
)
from tests.support.routing import EXPERTS, calibration_logits, scipy_bh_rejections

T_TRUTH = {"df": 4.0, "loc": 0.5, "scale": 1.3}
MIXTURE_TRUTH = {"weights": [0.7, 0.3], "means": [-1.0, 2.5], "sds": [0.6, 1.0]}
TOKENS = 25_000  # x 8 experts: 200k logits per layer, twice t's fit subsample
WIDTH = 8


def t_layer(seed: int) -> np.ndarray:
    """``[TOKENS, WIDTH]`` logits drawn from the known t."""
    values = stats.t.rvs(T_TRUTH["df"], loc=T_TRUTH["loc"], scale=T_TRUTH["scale"], size=TOKENS * WIDTH,
                         random_state=np.random.default_rng(seed))
    return values.reshape(TOKENS, WIDTH).astype(np.float32)


def mixture_layer(seed: int) -> np.ndarray:
    """``[TOKENS, WIDTH]`` logits drawn from the known two-component mixture."""
    rng = np.random.default_rng(seed)
    second = rng.random(TOKENS * WIDTH) < MIXTURE_TRUTH["weights"][1]
    values = np.where(second, rng.normal(MIXTURE_TRUTH["means"][1], MIXTURE_TRUTH["sds"][1], second.size),
                      rng.normal(MIXTURE_TRUTH["means"][0], MIXTURE_TRUTH["sds"][0], second.size))
    return values.reshape(TOKENS, WIDTH).astype(np.float32)


def mixture_sf(x: np.ndarray, weights, means, sds) -> np.ndarray:
    """Reference: ``sum_k w_k P(N(mu_k, sigma_k) > x)`` by scipy.stats.norm."""
    return sum(w * stats.norm.sf(x, loc=mu, scale=sd) for w, mu, sd in zip(weights, means, sds))


def fitted_sf(null: TabulatedNull, layer: int):
    """The survival function the layer's fit in ``null.meta`` states, by scipy."""
    fit = null.meta["layer_fits"][layer]
    if null.kind == "student_t":
        return lambda x: stats.t.sf(x, fit["df"], loc=fit["loc"], scale=fit["scale"])
    return lambda x: mixture_sf(x, fit["weights"], fit["means"], fit["sds"])


@pytest.fixture(scope="module")
def t_null():
    return fit_student_t_null([t_layer(1), t_layer(2)], WIDTH, grid_size=2048, meta={"model": "tiny"})


@pytest.fixture(scope="module")
def gmm_null():
    return fit_gmm_null([mixture_layer(3), mixture_layer(4)], WIDTH, grid_size=2048, meta={"model": "tiny"})


@pytest.fixture(scope="module")
def nulls(t_null, gmm_null):
    return {"student_t": t_null, "gmm": gmm_null}


def query_logits(null: TabulatedNull, layer: int, seed: int) -> np.ndarray:
    """float32 logits ``[tokens, WIDTH]`` over the whole grid, between its knots, and beyond both ends."""
    grid = null.grid[layer].astype(np.float64)
    spread = np.random.default_rng(seed).uniform(grid[0] - 5, grid[-1] + 5, size=(400, WIDTH))
    dense = np.linspace(grid[0], grid[-1], 40 * WIDTH).reshape(-1, WIDTH)
    return np.concatenate([spread, dense]).astype(np.float32)


def test_student_t_fit_recovers_the_known_t(t_null):
    for layer in range(2):
        fit = t_null.meta["layer_fits"][layer]
        # 100k subsampled values: the standard errors are ~0.04 (df), ~0.005 (loc, scale)
        assert fit["df"] == pytest.approx(T_TRUTH["df"], abs=0.25), fit
        assert fit["loc"] == pytest.approx(T_TRUTH["loc"], abs=0.02), fit
        assert fit["scale"] == pytest.approx(T_TRUTH["scale"], abs=0.02), fit
        assert fit["fit_samples"] == 100_000
    assert t_null.meta["t_fit"]["max_samples"] == 100_000 and t_null.meta["samples_per_layer"] == [200_000] * 2


def test_student_t_fit_is_at_least_as_likely_as_scipys_default_fit():
    sample = t_layer(5).ravel()[:20_000].astype(np.float64)  # below the subsample size: fitted whole
    ours = fit_student_t(sample)
    default = stats.t.fit(sample)  # Nelder-Mead from scipy's own start
    assert stats.t.nnlf(ours, sample) <= stats.t.nnlf(default, sample) + 1e-6 * sample.size
    np.testing.assert_allclose(ours, default, rtol=2e-3)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_pvalues_match_the_fitted_survival_function(kind, nulls):
    null = nulls[kind]
    for layer in range(2):
        x = query_logits(null, layer, seed=10 + layer)
        expected = np.clip(fitted_sf(null, layer)(x.astype(np.float64)), null.min_pvalue, 1.0)
        got = null.pvalues(torch.from_numpy(x), layer).numpy().astype(np.float64)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        tail = expected > 10 * null.min_pvalue
        tail &= x > np.quantile(x, 0.5)  # relative accuracy where BH's small p-values live
        np.testing.assert_allclose(got[tail], expected[tail], rtol=1e-3)
        assert null.meta["layer_fits"][layer]["sf_at_grid_ends"][1] < null.min_pvalue  # floored beyond the grid


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_pvalues_divide_the_logits_by_the_temperature(kind, nulls):
    null = nulls[kind]
    x = query_logits(null, 1, seed=12)
    expected = np.clip(fitted_sf(null, 1)(x.astype(np.float64) / 2.5), null.min_pvalue, 1.0)
    np.testing.assert_allclose(null.pvalues(torch.from_numpy(x), 1, temperature=2.5).numpy(), expected,
                               atol=1e-4, rtol=0)


def test_gmm_bic_picks_two_components_close_to_the_truth(gmm_null):
    for layer in range(2):
        fit = gmm_null.meta["layer_fits"][layer]
        assert fit["components"] == 2, fit["bic"]
        assert min(fit["bic"], key=fit["bic"].get) == "2" and list(fit["bic"]) == ["1", "2", "3", "4", "5", "6"]
        # 200k values: the standard errors are ~0.001 (weights), ~0.005 (means, sds)
        np.testing.assert_allclose(fit["weights"], MIXTURE_TRUTH["weights"], atol=0.005)
        np.testing.assert_allclose(fit["means"], MIXTURE_TRUTH["means"], atol=0.03)
        np.testing.assert_allclose(fit["sds"], MIXTURE_TRUTH["sds"], atol=0.02)


def test_gmm_bic_picks_one_component_for_a_single_normal():
    values = np.random.default_rng(6).normal(0.4, 1.7, size=200_000)
    mixture, candidates = fit_gmm(values)
    assert mixture.components == 1 and len(candidates) == 6
    assert mixture.means[0] == pytest.approx(values.mean(), abs=1e-3)
    assert mixture.sds[0] == pytest.approx(values.std(), rel=1e-3)


def test_gmm_fit_is_the_maximum_likelihood_mixture():
    # Reference: the two-component likelihood of the raw values maximised by L-BFGS-B from the truth.
    values = mixture_layer(7).ravel()[:50_000].astype(np.float64)

    def negative_log_likelihood(theta):
        weight = 1 / (1 + np.exp(-theta[0]))
        density = (weight * stats.norm.pdf(values, theta[1], np.exp(theta[3]))
                   + (1 - weight) * stats.norm.pdf(values, theta[2], np.exp(theta[4])))
        return -np.log(density).sum()

    start = [np.log(0.7 / 0.3), -1.0, 2.5, np.log(0.6), np.log(1.0)]
    theta = optimize.minimize(negative_log_likelihood, start, method="L-BFGS-B").x
    reference = {"weights": [1 / (1 + np.exp(-theta[0])), 1 / (1 + np.exp(theta[0]))], "means": theta[1:3],
                 "sds": np.exp(theta[3:5])}
    mixture, _ = fit_gmm(values, max_components=2)
    assert mixture.components == 2
    np.testing.assert_allclose(mixture.weights, reference["weights"], atol=2e-3)
    np.testing.assert_allclose(mixture.means, reference["means"], atol=5e-3)
    np.testing.assert_allclose(mixture.sds, reference["sds"], atol=5e-3)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_save_load_round_trip_gives_identical_pvalues(kind, nulls, tmp_path):
    null = nulls[kind]
    null.save(tmp_path / "null.npz")
    loaded = load_null(tmp_path / "null.npz")
    assert type(loaded) is TabulatedNull and loaded.kind == kind
    assert loaded.meta == null.meta and loaded.min_pvalue == null.min_pvalue
    assert TabulatedNull.load(tmp_path / "null.npz").kind == kind
    logits = torch.from_numpy(query_logits(null, 0, seed=13))
    for layer in range(2):
        assert torch.equal(loaded.pvalues(logits, layer), null.pvalues(logits, layer))


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_pvalues_in_unit_interval_never_rising_with_the_logit(kind, nulls):
    null = nulls[kind]
    assert null.monotone_in_logit and null.pointwise_in_logit
    sweep = torch.linspace(-1e3, 1e3, 200_000).reshape(-1, WIDTH)
    for layer in range(2):
        p = null.pvalues(sweep, layer).reshape(-1)
        assert p.dtype == torch.float32 and ((p > 0) & (p <= 1)).all()
        assert (p.diff() <= 0).all()
        assert p[0] == 1.0 and p[-1] == pytest.approx(null.min_pvalue, rel=1e-6)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_pvalues_read_the_evenly_spaced_grid_exactly_as_the_binary_search(kind, nulls):
    null = nulls[kind]
    assert evenly_spaced(null.grid).all()
    x = torch.from_numpy(query_logits(null, 1, seed=14))
    grid, sf = null._tables(x.device)
    reference = interpolate_rows(x.reshape(1, -1), grid[1:2], sf[1:2]).view(x.shape).clamp(null.min_pvalue, 1.0)
    assert torch.equal(null.pvalues(x, 1), reference)


def test_evenly_spaced_tells_linspace_grids_from_order_statistics():
    layers = calibration_logits(seed=18, tokens=300)
    assert evenly_spaced(fit_null("kde", layers, EXPERTS, grid_size=256).grid).tolist() == [True, True]
    assert evenly_spaced(fit_null("empirical", layers, EXPERTS, quantiles=256).grid).tolist() == [False, False]
    grid = np.stack([np.linspace(-3, 5, 101), np.linspace(100, 100.5, 101)]).astype(np.float32)
    assert evenly_spaced(grid).tolist() == [True, True]  # float32 rounding of the knots is allowed
    grid[1, 50] += 0.3 * (0.5 / 100)  # a knot 0.3 steps off its place
    assert evenly_spaced(grid).tolist() == [True, False]
    assert not evenly_spaced(np.zeros((1, 5))).any(), "a grid of one repeated value is not evenly spaced"


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_logits_get_the_pvalues_of_their_values(kind, dtype, nulls):
    null = nulls[kind]
    x = torch.from_numpy(query_logits(null, 0, seed=15)).clamp(-60000, 60000).to(dtype)
    p = null.pvalues(x, 0)
    assert p.dtype == torch.float32 and p.shape == x.shape
    expected = np.clip(fitted_sf(null, 0)(x.double().numpy()), null.min_pvalue, 1.0)
    np.testing.assert_allclose(p.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
@pytest.mark.parametrize("alpha,min_k,max_k", [(0.05, 1, 8), (0.2, 2, 5), (0.5, 1, 3)])
def test_bh_on_a_parametric_null_counts_as_scipy(kind, alpha, min_k, max_k, nulls):
    null = nulls[kind]
    rng = np.random.default_rng(16)
    # null-like logits with a few strong experts per token
    logits = t_layer(17)[:500] if kind == "student_t" else mixture_layer(17)[:500]
    strong = rng.random(logits.shape) < rng.uniform(0, 0.5, size=(500, 1))
    logits = np.where(strong, logits + rng.uniform(3, 12, size=logits.shape), logits).astype(np.float32)
    x = torch.from_numpy(logits)
    router = BHRouter(WIDTH, null, alpha=alpha, min_k=min_k, max_k=max_k)
    pvalues = null.pvalues(x, 1).double().numpy()
    expected = scipy_bh_rejections(pvalues, alpha)
    counted = router.count_from_logits(x, 1)
    assert counted is not None, "BH should count on the logits (a pointwise null)"
    # tokens whose p-value sits within float rounding of a BH cut i * alpha / N are left out
    decided = ~np.isclose(pvalues[..., None], np.arange(1, WIDTH + 1) * alpha / WIDTH, rtol=1e-6,
                          atol=0).any(axis=(-1, -2))
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(counted.numpy()[decided], expected[decided])
    selection = router(x, 1)
    np.testing.assert_array_equal(selection.k.numpy()[decided], expected.clip(min_k, max_k)[decided])
    assert len(np.unique(expected)) > 2, "the sample should exercise several counts"


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_logits_name_the_layer(kind, bad):
    layers = calibration_logits(seed=30, tokens=50, layers=3)
    layers[2][7, 1] = bad
    with pytest.raises(ValueError, match=r"layer 2: 1 of 300 values are NaN or infinite"):
        fit_null(kind, layers, EXPERTS)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_constant_calibration_logits_name_the_layer(kind):
    layers = calibration_logits(seed=31, tokens=50, layers=3)
    layers[1][:] = 0.25
    with pytest.raises(ValueError, match=rf"layer 1: all equal; a {kind} null needs spread"):
        fit_null(kind, layers, EXPERTS)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_bad_table_sizes_and_shapes_are_refused(kind):
    with pytest.raises(ValueError, match=r"grid_size: 1 is too small; valid: an integer >= 2"):
        fit_null(kind, calibration_logits(seed=32, tokens=50), EXPERTS, grid_size=1)
    with pytest.raises(ValueError, match=rf"layer 0: shape \[50, {EXPERTS}\] but num_experts is 8"):
        fit_null(kind, calibration_logits(seed=32, tokens=50, layers=1), 8)


def test_a_near_cauchy_fit_keeps_its_grid_near_the_calibration_range():
    values = stats.t.rvs(1.0, size=(2000, 4), random_state=np.random.default_rng(33))
    null = fit_null("student_t", [values], 4, grid_size=512)
    width = np.ptp(values)
    low, high = null.meta["layer_fits"][0]["grid"]
    assert values.min() - width - 1e-3 * width <= low and high <= values.max() + width + 1e-3 * width
    assert null.meta["layer_fits"][0]["df"] == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_fit_null_goes_through_the_registry(kind):
    registered = NULL_KINDS[kind]
    assert registered.calibrated and registered.table_option == "grid_size"
    layers = calibration_logits(seed=34, tokens=500)
    null = fit_null(kind, layers, EXPERTS, grid_size=300, meta={"model": "tiny"})
    assert null.kind == kind and null.grid.shape == null.sf.shape == (2, 300)
    assert null.meta["method"] == kind and null.meta["model"] == "tiny"
    assert null.min_pvalue == pytest.approx(1 / (500 * EXPERTS + 1))
    null.check_model(2, EXPERTS)


@pytest.mark.parametrize("kind", ["student_t", "gmm"])
def test_calibrate_null_writes_the_null_and_its_fitted_parameters(kind, tmp_path):
    from routelab.run.calibration import calibrate_null, save_router_logits

    layers = calibration_logits(seed=35, tokens=400)
    save_router_logits(tmp_path / "router_logits.npz", layers,
                       {"model": "tiny", "num_layers": 2, "num_experts": EXPERTS, "top_k": 2,
                        "calibration_files": ["c.parquet"]})
    record = calibrate_null(tmp_path / "router_logits.npz", kind, tmp_path / kind, grid_size=256)
    written = json.loads((tmp_path / kind / "null.json").read_text())
    assert written == record and written["kind"] == kind and written["grid_size"] == 256
    assert [fit["layer"] for fit in written["layer_fits"]] == [0, 1]
    keys = {"student_t": {"df", "loc", "scale"}, "gmm": {"components", "weights", "means", "sds", "bic"}}[kind]
    assert keys <= set(written["layer_fits"][0])
    null = load_null(tmp_path / kind / "null.npz")
    direct = fit_null(kind, layers, EXPERTS, grid_size=256)
    logits = torch.from_numpy(calibration_logits(seed=36, tokens=20)[0])
    assert null.kind == kind and torch.equal(null.pvalues(logits, 0), direct.pvalues(logits, 0))
