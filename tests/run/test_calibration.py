"""The calibration stages: the router-logits file and the calibrate_null job."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.support import REPO
from tests.support.routing import EXPERTS, calibration_logits


@pytest.fixture(scope="module")
def layers():
    return calibration_logits(seed=21)


def test_calibrate_null_script_refuses_gaussian_before_reading_logits(tmp_path):
    script = REPO / "workflow" / "scripts" / "calibrate_null.py"
    done = subprocess.run([sys.executable, str(script), "--logits", "none.npz",
                           "--out", str(tmp_path / "out"), "--method", "gaussian"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "'gaussian' needs no calibration" in done.stderr
    assert "kde, empirical, student_t, gmm, per_expert" in done.stderr
    assert not (tmp_path / "out").exists()


def test_router_logits_file_round_trips_layers_and_meta(tmp_path):
    from routelab.run.calibration import load_router_logits, save_router_logits

    layers = calibration_logits(seed=34, tokens=30, layers=12)  # 12 layers: order must be numeric, not text
    meta = {"model": "m", "num_layers": 12, "num_experts": EXPERTS, "top_k": 2, "calibration_files": ["a.parquet"]}
    save_router_logits(tmp_path / "router_logits.npz", layers, meta)
    loaded, loaded_meta = load_router_logits(tmp_path / "router_logits.npz")
    assert loaded_meta == meta and len(loaded) == 12
    for original, back in zip(layers, loaded):
        np.testing.assert_array_equal(back, original.astype(np.float32))


def test_a_file_without_router_logits_is_refused_naming_it(tmp_path):
    from routelab.run.calibration import load_router_logits

    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a router-logits file"):
        load_router_logits(tmp_path / "other.npz")
