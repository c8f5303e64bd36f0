"""Null kinds: fitted from calibration logits against scipy, p-values in (0, 1] and monotone, saved and
loaded, refused for another model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.stats import false_discovery_control, gaussian_kde

from routelab.routing import BHRouter
from routelab.routing.nulls import (
    NULL_KINDS,
    GaussianNull,
    NullMismatchError,
    PerExpertNull,
    TabulatedNull,
    UniformSegments,
    fit_kde_layer,
    fit_kde_null,
    fit_null,
    interpolate,
    load_null,
)
from tests.support.routing import EXPERTS, LOCATION, SCALE, calibration_logits


def scott_bandwidth(values: np.ndarray) -> float:
    """Scott's rule as statsmodels states it: 1.059 * min(std, IQR / 1.349) * n^(-1/5)."""
    iqr = (np.percentile(values, 75) - np.percentile(values, 25)) / 1.349
    sigma = min(np.std(values, ddof=1), iqr) if iqr > 0 else np.std(values, ddof=1)
    return 1.059 * sigma * values.size ** -0.2


SAMPLES = {
    "normal": lambda rng: rng.normal(0.5, 1.3, size=2000),
    "bimodal": lambda rng: np.concatenate([rng.normal(-2, 0.5, size=1400), rng.normal(3, 1.0, size=600)]),
}


@pytest.fixture
def fitted_null():
    rng = np.random.default_rng(12)
    layers = [rng.normal(0, 1, size=(300, 8)), rng.normal(1, 2, size=(250, 8))]
    return fit_kde_null(layers, num_experts=8, grid_size=256, meta={"model": "tiny"})










@pytest.fixture(scope="module")
def layers():
    return calibration_logits(seed=21)


@pytest.fixture(scope="module")
def nulls(layers):
    return {method: fit_null(method, layers, EXPERTS, grid_size=512, quantiles=4096, meta={"model": "tiny"})
            for method in NULL_KINDS}


def query_logits(seed: int, layer_sample: np.ndarray) -> np.ndarray:
    """Logits to look up: random ones, calibration values themselves, and far beyond both ends."""
    rng = np.random.default_rng(seed)
    random = rng.normal(LOCATION, 2 * SCALE, size=(300, EXPERTS))
    beyond = np.stack([layer_sample.min(0) - 50, layer_sample.max(0) + 50])
    return np.concatenate([random, layer_sample[:200], beyond]).astype(np.float32)


def corrupt_files(tmp_path: Path, nulls) -> dict[str, Path]:
    files = {}
    files["garbage"] = tmp_path / "garbage.npz"
    files["garbage"].write_bytes(b"this is not a zip archive" * 10)
    nulls["per_expert"].save(tmp_path / "whole.npz")
    files["truncated"] = tmp_path / "truncated.npz"
    files["truncated"].write_bytes((tmp_path / "whole.npz").read_bytes()[:5000])
    files["unknown_kind"] = tmp_path / "unknown_kind.npz"
    np.savez(files["unknown_kind"], kind="spline", meta="{}")
    files["missing_field"] = tmp_path / "missing_field.npz"
    np.savez(files["missing_field"], kind="per_expert", grid=np.zeros((1, 2, 3)), min_pvalue=0.1, meta="{}")
    files["bad_shape"] = tmp_path / "bad_shape.npz"
    np.savez(files["bad_shape"], kind="kde", grid=np.zeros((2, 5)), sf=np.zeros((2, 4)), num_experts=4,
             min_pvalue=0.1, meta="{}")
    files["single_array"] = tmp_path / "single_array.npy"
    np.save(files["single_array"], np.zeros(3))
    return files


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


def test_empirical_pvalues_match_fraction_of_calibration_logits_above(layers, nulls):
    null = nulls["empirical"]
    for layer, sample in enumerate(layers):
        pooled = sample.ravel()
        x = query_logits(layer, sample)
        expected = np.maximum((pooled[None, :] > x.reshape(-1, 1)).mean(axis=1), 1 / (pooled.size + 1))
        got = null.pvalues(torch.from_numpy(x), layer).numpy().ravel()
        # Linear interpolation between kept order statistics: body knots are 2 / quantiles apart in p.
        np.testing.assert_allclose(got, expected, atol=2 / 4096 + 1 / pooled.size, rtol=0)
    assert null.min_pvalue == pytest.approx(1 / (2000 * EXPERTS + 1))


def test_empirical_pvalues_exact_at_calibration_values_when_all_are_kept():
    sample = np.random.default_rng(22).gamma(2.0, size=(100, 3)).astype(np.float32)
    null = fit_null("empirical", [sample], 3, quantiles=4096)  # 4096 > 300 values: every one is a knot
    x = torch.from_numpy(sample)
    expected = np.maximum((sample.ravel()[None, :] > sample.reshape(-1, 1)).mean(axis=1), 1 / 301)
    np.testing.assert_allclose(null.pvalues(x, 0).numpy().ravel(), expected, atol=1e-7, rtol=0)


def test_empirical_handles_ties_like_the_ecdf():
    # bf16-like logits: few distinct values, many ties.
    sample = np.random.default_rng(23).integers(-3, 4, size=(500, 4)).astype(np.float32)
    null = fit_null("empirical", [sample], 4, quantiles=64)
    x = np.arange(-5, 6, dtype=np.float32).reshape(-1, 1).repeat(4, 1)
    got = null.pvalues(torch.from_numpy(x), 0).numpy()[:, 0]
    expected = np.maximum((sample.ravel()[None, :] > x[:, :1]).mean(axis=1), 1 / 2001)
    np.testing.assert_allclose(got, expected, atol=1e-7, rtol=0)
    assert np.isfinite(got).all()


def test_per_expert_pvalues_match_scipy_ecdf_of_each_expert(layers, nulls):
    null = nulls["per_expert"]
    assert null.grid.shape == (2, EXPERTS, 4097)
    for layer, sample in enumerate(layers):
        x = query_logits(10 + layer, sample)
        got = null.pvalues(torch.from_numpy(x), layer).numpy()
        for expert in range(EXPERTS):
            reference = stats.ecdf(sample[:, expert].astype(np.float64)).sf.evaluate(x[:, expert].astype(np.float64))
            expected = np.maximum(reference, 1 / (sample.shape[0] + 1))
            # 4096 kept order statistics of 2000 tokens: every value is a knot, p is exact there and
            # between two neighbouring values the line is within one step (1 / tokens) of the ECDF.
            at_knots = np.isin(x[:, expert], sample[:, expert])
            np.testing.assert_allclose(got[at_knots, expert], expected[at_knots], atol=1e-6, rtol=0)
            np.testing.assert_allclose(got[:, expert], expected, atol=1 / 2000 + 1e-6, rtol=0,
                                       err_msg=f"{layer=} {expert=}")


def test_per_expert_interpolates_within_tolerance_when_tokens_exceed_quantiles():
    sample = calibration_logits(seed=24, tokens=20_000, layers=1)[0]
    null = fit_null("per_expert", [sample], EXPERTS, quantiles=256)
    x = query_logits(25, sample)
    got = null.pvalues(torch.from_numpy(x), 0).numpy()
    for expert in range(EXPERTS):
        expected = np.maximum(stats.ecdf(sample[:, expert]).sf.evaluate(x[:, expert]), 1 / 20_001)
        np.testing.assert_allclose(got[:, expert], expected, atol=2 / 256 + 1 / 20_000, rtol=0)


def test_per_expert_null_does_not_flag_a_habitually_loud_expert(nulls):
    # A token at every expert's own median: the pooled null calls the loud expert significant,
    # its own null calls it typical.
    median = torch.tensor(LOCATION, dtype=torch.float32).reshape(1, -1)
    assert nulls["empirical"].pvalues(median, 0)[0, 0] < 0.1
    assert nulls["per_expert"].pvalues(median, 0)[0, 0] == pytest.approx(0.5, abs=0.03)


def test_gaussian_pvalues_match_scipy_norm_sf_of_standardised_logits():
    null = GaussianNull()
    x = np.random.default_rng(26).normal(LOCATION, SCALE, size=(400, EXPERTS)).astype(np.float32)
    z = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)  # population std over experts
    for temperature in (1.0, 2.5):
        got = null.pvalues(torch.from_numpy(x), layer=7, temperature=temperature).numpy()
        np.testing.assert_allclose(got, stats.norm.sf(z / temperature), atol=1e-6, rtol=1e-4)


def test_gaussian_null_needs_no_calibration_and_fits_any_shape():
    null = GaussianNull()
    assert null.num_layers is None and null.num_experts is None
    null.check_model(16, 64)
    null.check_model(3, 5)
    equal = torch.full((2, 8), 1.7)
    assert (null.pvalues(equal, 0) == 0.5).all(), "all-equal logits: z = 0, not 0 / 0"
    huge = torch.tensor([[1000.0] + [0.0] * 63])
    assert null.pvalues(huge, 0, temperature=0.01)[0, 0] > 0, "p stays above 0 where Phi underflows"


@pytest.mark.parametrize("method", NULL_KINDS)
def test_save_load_round_trip(method, nulls, tmp_path):
    null = nulls[method]
    path = tmp_path / "calibration" / "null.npz"
    null.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["null.npz"], "no temporary files left behind"
    loaded = load_null(path)
    assert type(loaded) is type(null) and loaded.kind == null.kind == method
    assert (loaded.num_layers, loaded.num_experts) == (null.num_layers, null.num_experts)
    assert loaded.meta == null.meta and loaded.min_pvalue == null.min_pvalue
    logits = torch.from_numpy(calibration_logits(seed=27, tokens=50)[1])
    torch.testing.assert_close(loaded.pvalues(logits, 1), null.pvalues(logits, 1), atol=0, rtol=0)


def test_gaussian_without_expert_count_round_trips(tmp_path):
    GaussianNull(meta={"note": "any model"}).save(tmp_path / "null.npz")
    loaded = load_null(tmp_path / "null.npz")
    assert loaded.num_experts is None and loaded.meta == {"note": "any model"}


@pytest.mark.parametrize("method", NULL_KINDS)
def test_pvalues_in_unit_interval_and_non_increasing_in_each_experts_logit(method, nulls):
    null = nulls[method]
    sweep = torch.linspace(-40, 40, 2001)
    background = torch.from_numpy(calibration_logits(seed=28, tokens=1)[0]).expand(sweep.numel(), -1)
    for layer in range(2):
        for expert in range(EXPERTS):
            logits = background.clone()
            logits[:, expert] = sweep  # only this expert's logit moves (the gaussian null reads the others)
            p = null.pvalues(logits, layer)
            assert p.dtype == torch.float32 and p.shape == logits.shape
            assert ((p > 0) & (p <= 1)).all()
            assert (p[:, expert].diff() <= 0).all(), f"{layer=} {expert=}"
            if method != "gaussian":
                assert p[0, expert] == 1.0 and p[-1, expert] == pytest.approx(null.min_pvalue)


@pytest.mark.parametrize("method", ["kde", "empirical", "per_expert"])
def test_check_model_names_both_shapes(method, nulls):
    null = nulls[method]
    null.check_model(2, EXPERTS)
    with pytest.raises(NullMismatchError, match=rf"2 MoE layers x {EXPERTS} experts.*'tiny'.*16 x 64"):
        null.check_model(16, 64)
    with pytest.raises(NullMismatchError, match=rf"3 x {EXPERTS}"):
        null.check_model(3, EXPERTS)


def test_gaussian_check_model_checks_experts_only_when_built_for_a_count(nulls):
    null = nulls["gaussian"]
    assert null.num_experts == EXPERTS and null.num_layers is None
    null.check_model(40, EXPERTS)
    with pytest.raises(NullMismatchError, match=rf"{EXPERTS} experts.*3 x 64"):
        null.check_model(3, 64)


def test_per_expert_pvalues_refuse_logits_of_another_expert_count(nulls):
    with pytest.raises(NullMismatchError, match=rf"{EXPERTS} experts.*8"):
        nulls["per_expert"].pvalues(torch.zeros(4, 8), 0)


@pytest.mark.parametrize("method", NULL_KINDS)
def test_bh_router_routes_with_every_null_kind(method, nulls):
    router = BHRouter(EXPERTS, nulls[method], alpha=0.2, min_k=1, max_k=3)
    selection = router(torch.from_numpy(calibration_logits(seed=29, tokens=64)[0]), 0)
    assert selection.indices.shape == (64, 3) and selection.pvalues.shape == (64, EXPERTS)
    # k is scipy's BH count on the p-values the selection reports, clamped to [min_k, max_k].
    expected = (false_discovery_control(selection.pvalues.double().numpy(), axis=-1) <= 0.2).sum(-1).clip(1, 3)
    np.testing.assert_array_equal(selection.k.numpy(), expected)


@pytest.mark.parametrize("method", ["kde", "empirical", "per_expert"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_calibration_logits_name_the_layer(method, bad):
    layers = calibration_logits(seed=30, tokens=50, layers=3)
    layers[2][7, 1] = bad
    with pytest.raises(ValueError, match=r"layer 2: 1 of 300 values are NaN or infinite"):
        fit_null(method, layers, EXPERTS)


@pytest.mark.parametrize("method", ["kde", "empirical", "per_expert"])
def test_calibration_logits_of_another_expert_count_are_refused(method):
    with pytest.raises(ValueError, match=rf"layer 0: shape \[50, {EXPERTS}\] but num_experts is 8"):
        fit_null(method, calibration_logits(seed=31, tokens=50, layers=1), 8)


def test_fit_null_names_the_valid_methods():
    with pytest.raises(ValueError, match="'spline'.*kde, empirical, student_t, gmm, per_expert, gaussian"):
        fit_null("spline", calibration_logits(seed=32, tokens=10), EXPERTS)
    with pytest.raises(ValueError, match="quantiles: 1"):
        fit_null("empirical", calibration_logits(seed=32, tokens=10), EXPERTS, quantiles=1)
    with pytest.raises(ValueError, match="no layers"):
        fit_null("per_expert", [], EXPERTS)


def test_load_null_refuses_corrupt_and_unknown_files_naming_file_and_kinds(tmp_path, nulls):
    for path in corrupt_files(tmp_path, nulls).values():
        with pytest.raises(ValueError,
                           match=rf"{path.name}.*valid kinds: kde, empirical, student_t, gmm, per_expert, gaussian"):
            load_null(path)
    with pytest.raises(ValueError, match=r"unknown null kind 'spline'"):
        load_null(tmp_path / "unknown_kind.npz")
    with pytest.raises(ValueError, match=r"field 'sf' is missing"):
        load_null(tmp_path / "missing_field.npz")
    with pytest.raises(FileNotFoundError):
        load_null(tmp_path / "absent.npz")


def test_kde_null_saved_before_kinds_existed_still_loads(nulls, tmp_path):
    kde = nulls["kde"]
    np.savez(tmp_path / "old.npz", grid=kde.grid, sf=kde.sf, num_experts=kde.num_experts,
             min_pvalue=kde.min_pvalue, meta="{}")
    loaded = TabulatedNull.load(tmp_path / "old.npz")
    assert loaded.kind == "kde"
    np.testing.assert_array_equal(loaded.sf, kde.sf)


def test_tabulated_null_load_points_per_expert_files_to_load_null(nulls, tmp_path):
    nulls["per_expert"].save(tmp_path / "null.npz")
    with pytest.raises(ValueError, match="'per_expert' null.*load_null"):
        TabulatedNull.load(tmp_path / "null.npz")
    assert isinstance(load_null(tmp_path / "null.npz"), PerExpertNull)
    nulls["empirical"].save(tmp_path / "empirical.npz")
    assert TabulatedNull.load(tmp_path / "empirical.npz").kind == "empirical"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", NULL_KINDS)
def test_pvalues_on_cuda_match_cpu(method, nulls):
    logits = torch.from_numpy(calibration_logits(seed=33, tokens=500)[1])
    on_device = nulls[method].pvalues(logits.cuda(), 1)
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device.cpu(), nulls[method].pvalues(logits, 1), atol=1e-6, rtol=1e-5)
