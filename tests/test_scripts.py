"""Every stage script runs by hand: --help works, and a bad argument ends with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "workflow" / "scripts").glob("*.py"))


def run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_stage_script_help(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "--" in result.stdout


def test_route_rejects_a_bad_routing_spec_naming_the_key(tmp_path):
    script = next(s for s in SCRIPTS if s.stem == "route")
    (tmp_path / "info.json").write_text("{}")
    result = run(script, "--model", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--routing", '{"name": "x", "method": "bh", "alpha": 2}')
    assert result.returncode == 2
    assert "alpha: 2 is out of range; valid: 0 < alpha <= 1" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_demo_model_rejects_unknown_setting(tmp_path):
    script = next(s for s in SCRIPTS if s.stem == "train_demo_model")
    result = run(script, "--out", str(tmp_path / "model"), "--settings", '{"layerz": 2}')
    assert result.returncode == 2 and "layerz" in result.stderr and "layers" in result.stderr
    assert not (tmp_path / "model").exists()
