"""The public API and the package's shape: every listed name imports from where it is said to live,
the Snakefile's modules start no heavy library, and imports run one way, from stages down to leaves."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys

import pytest

import routelab
from tests.support import REPO

PACKAGE = REPO / "src" / "routelab"

# What each part of the package may import (besides itself): leaves import no other part, every stage
# only the parts below it. A cycle, or an import back up, fails the test.
MAY_IMPORT = {
    "io": set(), "choices": set(), "config": {"choices", "download"}, "catalogue": set(), "cli": set(),
    "tracking": {"io"}, "download": {"io"},
    "routing": {"io", "choices"},
    "demo": {"io", "tracking"},
    "model": {"io", "routing", "download"},
    "record": {"io", "routing"},
    "data": {"io", "demo", "download", "model"},
    "run": {"io", "choices", "config", "tracking", "download", "routing", "model", "record", "data"},
    "plot": {"io", "catalogue"},
    "report": {"io", "choices", "config", "catalogue", "plot", "run"},
    "schema": {"io", "routing", "model"},
}


def part_of(path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0].removesuffix(".py")


def routelab_imports(path) -> set[str]:
    """The parts of routelab a module imports (at the top or inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("routelab."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "routelab":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("routelab."))
    return found


def test_imports_run_one_way_from_stages_down_to_leaves():
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE]
    assert {part_of(p) for p in modules} == set(MAY_IMPORT)
    for module in modules:
        part = part_of(module)
        wrong = routelab_imports(module) - {part} - MAY_IMPORT[part]
        assert not wrong, f"{module.relative_to(REPO)} imports {sorted(wrong)}, above or beside {part!r}"


def test_the_dependency_order_has_no_cycle():
    order, placed = [], set()
    while len(placed) < len(MAY_IMPORT):
        ready = [part for part, needs in MAY_IMPORT.items() if part not in placed and needs <= placed]
        assert ready, f"a cycle among {sorted(set(MAY_IMPORT) - placed)}"
        placed.update(ready)
        order.extend(ready)


def test_the_package_uses_absolute_imports_only():
    for module in PACKAGE.rglob("*.py"):
        relative = [n for n in ast.walk(ast.parse(module.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, module


@pytest.mark.parametrize("name", list(routelab.API))
def test_every_public_name_is_defined_where_the_api_says(name):
    value = getattr(routelab, name)
    module = importlib.import_module(routelab.API[name])
    assert getattr(module, name) is value
    owner = getattr(value, "__module__", None)
    if owner is not None and not isinstance(value, dict):
        assert owner == routelab.API[name] or owner.startswith(routelab.API[name]), (name, owner)


def test_the_api_is_listed_in_the_docs():
    text = (REPO / "docs" / "api.md").read_text()
    missing = [name for name in routelab.API if not re.search(rf"`{name}[`(]", text)]
    assert not missing, missing


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'build_rooter'"):
        routelab.build_rooter  # noqa: B018


def test_the_snakefiles_imports_start_no_heavy_library():
    code = ("import sys, routelab, routelab.config, routelab.catalogue, routelab.download, routelab.run.resume, "
            "routelab.run.shards\n"
            "heavy = ('torch', 'transformers', 'pandas', 'matplotlib', 'pyarrow')\n"
            "print(','.join(m for m in heavy if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the Snakefile would import {result.stdout.strip()}"
