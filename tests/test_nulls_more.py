"""Every null kind against numpy/scipy references; one interface: p-values, storage, shape checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.stats import false_discovery_control

from routelab.nulls import (NULL_METHODS, GaussianNull, NullMismatchError, PerExpertNull, TabulatedNull,
                            fit_null, load_null)
from routelab.routers import BHRouter

EXPERTS = 6
# Expert 0 is habitually loud, expert 5 is quiet and wide; the rest are standard normal.
LOCATION = np.array([3.0, 0.0, 0.0, 0.0, 0.0, -1.0])
SCALE = np.array([0.5, 1.0, 1.0, 1.0, 1.0, 2.0])


def calibration_logits(seed: int, tokens: int = 2000, layers: int = 2) -> list[np.ndarray]:
    """``[tokens, experts]`` float32 logits per layer (float32: the dtype routing looks them up in)."""
    rng = np.random.default_rng(seed)
    return [(LOCATION + layer + SCALE * rng.standard_normal((tokens, EXPERTS))).astype(np.float32)
            for layer in range(layers)]


@pytest.fixture(scope="module")
def layers():
    return calibration_logits(seed=21)


@pytest.fixture(scope="module")
def nulls(layers):
    return {method: fit_null(method, layers, EXPERTS, grid_size=512, quantiles=4096, meta={"model": "tiny"})
            for method in NULL_METHODS}


def query_logits(seed: int, layer_sample: np.ndarray) -> np.ndarray:
    """Logits to look up: random ones, calibration values themselves, and far beyond both ends."""
    rng = np.random.default_rng(seed)
    random = rng.normal(LOCATION, 2 * SCALE, size=(300, EXPERTS))
    beyond = np.stack([layer_sample.min(0) - 50, layer_sample.max(0) + 50])
    return np.concatenate([random, layer_sample[:200], beyond]).astype(np.float32)


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


@pytest.mark.parametrize("method", NULL_METHODS)
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


@pytest.mark.parametrize("method", NULL_METHODS)
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


@pytest.mark.parametrize("method", NULL_METHODS)
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
    with pytest.raises(ValueError, match="'spline'.*kde, empirical, per_expert, gaussian"):
        fit_null("spline", calibration_logits(seed=32, tokens=10), EXPERTS)
    with pytest.raises(ValueError, match="quantiles: 1"):
        fit_null("empirical", calibration_logits(seed=32, tokens=10), EXPERTS, quantiles=1)
    with pytest.raises(ValueError, match="no layers"):
        fit_null("per_expert", [], EXPERTS)


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


def test_load_null_refuses_corrupt_and_unknown_files_naming_file_and_kinds(tmp_path, nulls):
    for name, path in corrupt_files(tmp_path, nulls).items():
        with pytest.raises(ValueError, match=rf"{path.name}.*valid kinds: kde, empirical, per_expert, gaussian"):
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
@pytest.mark.parametrize("method", NULL_METHODS)
def test_pvalues_on_cuda_match_cpu(method, nulls):
    logits = torch.from_numpy(calibration_logits(seed=33, tokens=500)[1])
    on_device = nulls[method].pvalues(logits.cuda(), 1)
    assert on_device.device.type == "cuda"
    torch.testing.assert_close(on_device.cpu(), nulls[method].pvalues(logits, 1), atol=1e-6, rtol=1e-5)


def test_calibrate_null_script_refuses_gaussian_before_reading_logits(tmp_path):
    script = Path(__file__).parents[1] / "workflow" / "scripts" / "calibrate_null.py"
    done = subprocess.run([sys.executable, str(script), "--logits", "none.npz",
                           "--out", str(tmp_path / "out"), "--method", "gaussian"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "'gaussian' needs no calibration" in done.stderr and "kde, empirical, per_expert" in done.stderr
    assert not (tmp_path / "out").exists()


def test_router_logits_file_round_trips_layers_and_meta(tmp_path):
    from routelab.calibration import load_router_logits, save_router_logits

    layers = calibration_logits(seed=34, tokens=30, layers=12)  # 12 layers: order must be numeric, not text
    meta = {"model": "m", "num_layers": 12, "num_experts": EXPERTS, "top_k": 2, "calibration_files": ["a.parquet"]}
    save_router_logits(tmp_path / "router_logits.npz", layers, meta)
    loaded, loaded_meta = load_router_logits(tmp_path / "router_logits.npz")
    assert loaded_meta == meta and len(loaded) == 12
    for original, back in zip(layers, loaded):
        np.testing.assert_array_equal(back, original.astype(np.float32))


def test_a_file_without_router_logits_is_refused_naming_it(tmp_path):
    from routelab.calibration import load_router_logits

    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a router-logits file"):
        load_router_logits(tmp_path / "other.npz")
