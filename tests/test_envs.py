"""Conda environments (--sdm conda): every rule that runs a command names an existing env file, and the
env pins exact versions that satisfy pyproject.toml. conda itself is not needed to check this."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = sorted((REPO / "workflow" / "rules").glob("*.smk"))
# Run by Snakemake itself (outside the jobs' environment), not by any rule's command.
OUTSIDE_THE_ENV = {"snakemake", "snakemake-executor-plugin-slurm"}


def rule_blocks(path: Path) -> dict[str, str]:
    """{rule name: its text} of a .smk file; a rule (also one nested in an ``if``) ends at the next line
    indented no deeper than its ``rule`` line."""
    lines = path.read_text().splitlines()
    blocks = {}
    for i, line in enumerate(lines):
        match = re.match(r"(\s*)(?:local)?rule (\w+):", line)
        if not match:
            continue
        indent, end = len(match.group(1)), i + 1
        while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
            end += 1
        blocks[match.group(2)] = "\n".join(lines[i:end])
    return blocks


def conda_env(block: str) -> str | None:
    match = re.search(r"^\s+conda:\s*\n\s+\"([^\"]+)\"", block, flags=re.M)
    return match.group(1) if match else None


def pip_pins(env: dict) -> dict[str, Requirement]:
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return {Requirement(line).name.lower(): Requirement(line) for line in pip}


def test_every_rule_with_a_command_names_an_existing_env_file():
    checked = 0
    for path in RULE_FILES:
        for name, block in rule_blocks(path).items():
            if not re.search(r"^\s+(shell|script|notebook|wrapper):", block, flags=re.M):
                continue
            env = conda_env(block)
            assert env is not None, f"rule {name} ({path.name}) has no conda: directive"
            env_file = (path.parent / env).resolve()
            assert env_file.is_file() and env_file.parent == REPO / "envs", f"rule {name}: {env} -> {env_file}"
            checked += 1
    assert checked >= 7  # train, prepare, calibrate, route, plot, aggregate, report, ...


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_exact_versions_within_pyproject_ranges(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert env["channels"] and "defaults" not in env["channels"], env["channels"]
    assert any(str(d).startswith("python=3.11") for d in env["dependencies"])
    pins = pip_pins(env)
    for requirement in pins.values():
        (spec,) = requirement.specifier  # exactly one, and it is ==
        assert spec.operator == "==", f"{env_file.name}: {requirement} is not pinned exactly"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        required = Requirement(line)
        if required.name in OUTSIDE_THE_ENV:
            continue
        assert required.name.lower() in pins, f"{env_file.name} misses {required.name} (pyproject.toml)"
        pinned = next(iter(pins[required.name.lower()].specifier)).version
        assert required.specifier.contains(pinned), f"{env_file.name}: {required.name}=={pinned} is outside {line}"


def test_tracking_env_is_routelab_plus_the_tracking_extra():
    base = pip_pins(yaml.safe_load((REPO / "envs" / "routelab.yaml").read_text()))
    tracking = pip_pins(yaml.safe_load((REPO / "envs" / "tracking.yaml").read_text()))
    assert {name: str(req) for name, req in tracking.items() if name in base} == {n: str(r) for n, r in base.items()}
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["tracking"]
    for line in extra:
        required = Requirement(line)
        pinned = next(iter(tracking[required.name.lower()].specifier)).version
        assert required.specifier.contains(pinned), f"tracking.yaml: {required.name}=={pinned} is outside {line}"


def test_post_deploy_script_installs_routelab_from_the_checkout():
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        # Snakemake runs <env>.post-deploy.sh after creating <env>.yaml.
        script = env_file.with_name(env_file.stem + ".post-deploy.sh").read_text()
        assert "pip install --no-deps -e ." in script, env_file.name
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        # A path here would be resolved from .snakemake/conda/, where Snakemake copies the env file.
        assert not [line for line in pip if line.startswith(("-e", ".", "/"))], pip
